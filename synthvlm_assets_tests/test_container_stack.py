"""The compose deployment for real: the project's images built from this checkout, the stack brought up
with the CPU compose file (docker/compose.yaml alone: no GPU request anywhere), caption files dropped into
the S3 inbox, and the sensor, the automation and DockerRunLauncher taking them through curation, judge,
synthesis, scoring and selection (tiny models) into SeaweedFS, each run in a container of its own. Then a
run container is killed mid-step (the run fails, its `gpu` slot is freed, a re-execution finishes and no
partial output was ever visible), and `docker/stack.sh down -v` with a run container alive leaves no
container, volume or network.

Needs a Docker engine (skipped, with the reason, only when none can be reached); base images are local
stand-ins built from Debian's packages (scripts/build_base_images.sh) and the images install from a local
wheelhouse (docker/build.sh), so nothing is pulled from a registry. The commands are docs/deployment.md's.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO
from .test_automation import PER_SHARD
from .test_deployment import captions

PROJECT = "synthvlmtest"
STANDINS = {
    "SYNTHVLM_PYTHON_IMAGE": "synthvlm-standin/python:3.11-bookworm",
    "SYNTHVLM_POSTGRES_IMAGE": "synthvlm-standin/postgres:15-bookworm",
    "SYNTHVLM_SEAWEEDFS_IMAGE": "synthvlm-standin/seaweedfs:4.48",
}
CODE_IMAGE, WORKER_IMAGE = "synthvlm-code:0.1.0", "synthvlm-worker:0.1.0"
MAX_WORKER_BYTES, MAX_CODE_BYTES = 8e9, 1.5e9
SHARD_ROWS = 12
FIXED_NAMES = {"network": "synthvlm", "volumes": {"synthvlm-dagster-storage", "synthvlm-cache"}}
RUN_LABEL = "synthvlm.stack=synthvlm"
REPORT = REPO / "build" / "container_test_report.json"
WHEELHOUSE = REPO / "build" / "wheelhouse"
# Peak disk use of building the images from nothing (docker/build.sh code worker with a wheelhouse), in GB,
# measured with the free space sampled each second (docs/deployment.md): with a margin.
BUILD_NEEDS_GB = {"wheelhouse": 3.5, "docker": 17.0, "docker_cached": 3.0}


def _docker_reachable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"no Docker engine reachable ({done.stderr.strip()[:200]})"
    return None


_why_not = _docker_reachable()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=f"container stack test: {_why_not}")


def sh(*args: str, env: dict | None = None, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout, cwd=REPO
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Stack:
    """docker/stack.sh over docker/compose.yaml (CPU) with a throwaway env file, and the webserver's GraphQL."""

    def __init__(self, tmp: Path) -> None:
        self.web_port, self.s3_port = free_port(), free_port()
        self.access_key, self.secret_key = "synthvlm", secrets.token_hex(16)
        self.env_file = tmp / "stack.env"
        values = {
            "POSTGRES_PASSWORD": secrets.token_hex(16), "DAGSTER_PG_USER": "dagster", "DAGSTER_PG_DB": "dagster",
            "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "SYNTHVLM_GPU_COUNT": "1", "SYNTHVLM_BUCKET": "synthvlm", "SYNTHVLM_SHARD_ROWS": str(SHARD_ROWS),
            "SYNTHVLM_SELECT_K": "20", "SYNTHVLM_SDXL_MODEL": "tiny", "SYNTHVLM_CLIP_MODEL": "tiny",
            "SYNTHVLM_CLIP_PRETRAINED": "none", "SYNTHVLM_JUDGE_MODEL": "tiny",
            "SYNTHVLM_CODE_IMAGE": CODE_IMAGE, "SYNTHVLM_WORKER_IMAGE": WORKER_IMAGE,
            "SYNTHVLM_WEB_PORT": str(self.web_port), "SYNTHVLM_S3_PORT": str(self.s3_port), **STANDINS,
        }  # fmt: skip
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        # Compose gives the calling environment precedence over the env file: the stack's values go in both, or
        # credentials another test exported (the S3 tests' AWS_ACCESS_KEY_ID) would configure SeaweedFS.
        self.env = {**values, "SYNTHVLM_ENV_FILE": str(self.env_file), "COMPOSE_PROJECT_NAME": PROJECT}

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return sh("docker/stack.sh", *args, env=self.env, timeout=timeout)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.web_port}/graphql", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            doc = json.loads(r.read())
        assert "errors" not in doc, doc["errors"]
        return doc["data"]

    def web_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/server_info", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def runs(self) -> list[dict]:
        q = """{ runsOrError(limit: 500) { ... on Runs { results { runId status jobName tags { key value }
                 assetSelection { path } stepStats { stepKey status } } } } }"""
        runs = self.graphql(q)["runsOrError"]["results"]
        for r in runs:
            r["tags"] = {t["key"]: t["value"] for t in r["tags"]}
        return runs

    def run(self, run_id: str) -> dict:
        return next(r for r in self.runs() if r["runId"] == run_id)

    def materialized(self, asset: str) -> list[dict]:
        q = """query($path: [String!]!) { assetOrError(assetKey: {path: $path}) {
                 ... on Asset { assetMaterializations(limit: 1000) { partition runId } } } }"""
        return self.graphql(q, {"path": [asset]})["assetOrError"].get("assetMaterializations") or []

    def gpu_slots(self) -> dict:
        q = '{ instance { concurrencyLimit(concurrencyKey: "gpu") { slotCount claimedSlots { runId stepKey } } } }'
        return self.graphql(q)["instance"]["concurrencyLimit"]

    def reexecute_from_failure(self, run_id: str) -> str:
        q = """mutation($id: String!) {
               launchPipelineReexecution(reexecutionParams: {parentRunId: $id, strategy: FROM_FAILURE}) {
                 __typename ... on LaunchRunSuccess { run { runId } } ... on Error { message } } }"""
        result = self.graphql(q, {"id": run_id})["launchPipelineReexecution"]
        assert result["__typename"] == "LaunchRunSuccess", result
        return result["run"]["runId"]

    # -- SeaweedFS, from the host ----------------------------------------------------------------------
    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key,
                                 client_kwargs={"endpoint_url": f"http://127.0.0.1:{self.s3_port}"})  # fmt: skip

    def root(self):
        from synthvlm_assets.storage import StorageRoot

        return StorageRoot("s3://synthvlm/synthvlm", f"http://127.0.0.1:{self.s3_port}",
                           storage_options={"key": self.access_key, "secret": self.secret_key})  # fmt: skip

    def put_captions(self, name: str, rows: list[dict]) -> None:
        fs = self.fs()
        tmp = f"synthvlm/inbox/_{name}"  # hidden while uploading: the sensor skips names starting with '_'
        fs.pipe_file(tmp, "".join(json.dumps(r) + "\n" for r in rows).encode())
        fs.mv(tmp, f"synthvlm/inbox/{name}")

    def run_containers(self) -> list[str]:
        return sh("docker", "ps", "-aq", "--filter", f"label={RUN_LABEL}").stdout.split()


def _leftovers() -> dict:
    containers = sh("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split()
    containers += sh("docker", "ps", "-aq", "--filter", f"label={RUN_LABEL}").stdout.split()
    volumes = set(sh("docker", "volume", "ls", "-q").stdout.split())
    volumes = {v for v in volumes if v in FIXED_NAMES["volumes"] or v.startswith(f"{PROJECT}_")}
    networks = [n for n in sh("docker", "network", "ls", "--format", "{{.Name}}").stdout.split()
                if n == FIXED_NAMES["network"] or n.startswith(f"{PROJECT}_")]  # fmt: skip
    return {"containers": containers, "volumes": sorted(volumes), "networks": networks}


def _say(request, message: str) -> None:
    """A line on the terminal whatever pytest captures (image sizes and timings belong in the CI log)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\n{message}", flush=True)


@pytest.fixture(scope="module")
def report(request):
    doc: dict = {}
    yield doc
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(doc, indent=2))
    _say(request, f"container stack: {json.dumps(doc)}")


def _disk_shortfall() -> str | None:
    """Why the images cannot be built on this disk, or None. Building the worker needs the wheelhouse, pip's
    unpacked wheels, the installed layer and the builder's copy of it at once (measured in docs/deployment.md);
    a filled wheelhouse or an existing worker image (its dependency layer cached) needs much less."""
    docker_root = Path(sh("docker", "info", "-f", "{{.DockerRootDir}}").stdout.strip())
    wheels_gb = 0.0 if any(WHEELHOUSE.glob(".filled-*")) else BUILD_NEEDS_GB["wheelhouse"]
    cached = sh("docker", "image", "inspect", WORKER_IMAGE, check=False).returncode == 0
    docker_gb = BUILD_NEEDS_GB["docker_cached" if cached else "docker"]
    wheelhouse = WHEELHOUSE if WHEELHOUSE.exists() else REPO
    if not docker_root.exists():  # a remote engine: only the wheelhouse is here
        need = {str(wheelhouse): wheels_gb}
    elif os.stat(docker_root).st_dev == os.stat(wheelhouse).st_dev:
        need = {str(docker_root): wheels_gb + docker_gb}
    else:
        need = {str(wheelhouse): wheels_gb, str(docker_root): docker_gb}
    short = [
        f"{where}: {free:.1f} GB free, needs {gb:.0f} GB"
        for where, gb in need.items()
        if (free := shutil.disk_usage(where).free / 1e9) < gb
    ]
    return "; ".join(short) or None


@pytest.fixture(scope="module")
def images(report, request):
    """Build the stand-in base images and the project's images (code, worker) from this checkout. With
    SYNTHVLM_CONTAINER_TEST_CLEANUP=1 (CI) the project's images and the wheelhouse go afterwards: ~11 GB that
    the rest of the suite (SeaweedFS among it) may need on a small disk."""
    assert shutil.which("docker-compose") or sh("docker", "compose", "version", check=False).returncode == 0, (
        "a Docker engine is here but no Compose (v2 plugin or v1 docker-compose): apt-get install docker-compose"
    )
    if (shortfall := _disk_shortfall()) is not None:
        # The machine, not the project: a build that fills the disk fails every test after it too.
        pytest.skip(f"container stack test: not enough disk to build the images ({shortfall})")
    t0 = time.monotonic()
    sh("bash", "scripts/build_base_images.sh", timeout=900)
    t1 = time.monotonic()
    env = {
        "SYNTHVLM_WHEELHOUSE": str(WHEELHOUSE),
        "SYNTHVLM_PYTHON_IMAGE": STANDINS["SYNTHVLM_PYTHON_IMAGE"],
        "SYNTHVLM_CODE_IMAGE": CODE_IMAGE,
        "SYNTHVLM_WORKER_IMAGE": WORKER_IMAGE,
        # The checkout by default; a commit (git archive) with SYNTHVLM_CONTAINER_TEST_REF.
        "SYNTHVLM_BUILD_REF": os.environ.get("SYNTHVLM_CONTAINER_TEST_REF", ""),
    }
    built = sh("bash", "docker/build.sh", "code", "worker", env=env, timeout=1800)
    t2 = time.monotonic()
    sizes = {
        tag: int(sh("docker", "image", "inspect", "-f", "{{.Size}}", tag).stdout) for tag in (CODE_IMAGE, WORKER_IMAGE)
    }
    report.update(
        base_images_s=round(t1 - t0),
        project_images_s=round(t2 - t1),
        build_log=built.stdout.strip().splitlines(),
        image_gb={tag: round(size / 1e9, 2) for tag, size in sizes.items()},
    )
    _say(request, f"image sizes: code {sizes[CODE_IMAGE] / 1e9:.2f} GB, worker {sizes[WORKER_IMAGE] / 1e9:.2f} GB")
    yield sizes
    if os.environ.get("SYNTHVLM_CONTAINER_TEST_CLEANUP") == "1":
        sh("docker", "image", "rm", "-f", CODE_IMAGE, WORKER_IMAGE, check=False)
        shutil.rmtree(WHEELHOUSE, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(images, tmp_path_factory, report):
    left = _leftovers()
    assert not any(left.values()), (
        f"a synthvlm stack (or a test's leftovers) is on this Docker engine: {left}; "
        f"`COMPOSE_PROJECT_NAME=... docker/stack.sh down -v` it first"
    )
    stack = Stack(tmp_path_factory.mktemp("stack"))
    t0 = time.monotonic()
    try:
        stack.compose("up")
        wait_for(stack.web_up, 300, "the webserver on 127.0.0.1")
        report["stack_up_s"] = round(time.monotonic() - t0)
        yield stack
    finally:
        if any(_leftovers().values()):  # a failed test: take it down anyway (test_down checks it otherwise)
            logs = sh("docker/stack.sh", "logs", "--tail", "60", "daemon", env=stack.env, check=False)
            print(logs.stdout[-6000:])
            sh("docker/stack.sh", "down", "-v", env=stack.env, check=False)


def test_images_fit_their_budgets(images):
    assert images[WORKER_IMAGE] <= MAX_WORKER_BYTES, f"worker image {images[WORKER_IMAGE] / 1e9:.2f} GB > 8 GB"
    assert images[CODE_IMAGE] <= MAX_CODE_BYTES, f"code-location image {images[CODE_IMAGE] / 1e9:.2f} GB > 1.5 GB"
    # Non-root processes; no vLLM, lmms-eval or KenLM in the worker.
    for tag in (CODE_IMAGE, WORKER_IMAGE):
        assert sh("docker", "image", "inspect", "-f", "{{.Config.User}}", tag).stdout.strip() == "1000", tag
    probe = "import importlib.util as u; print([m for m in ('vllm', 'lmms_eval', 'kenlm', 'torch') if u.find_spec(m)])"
    assert sh("docker", "run", "--rm", WORKER_IMAGE, "python", "-c", probe).stdout.strip() == "['torch']"


def _wait_chain(stack: Stack, shards: list[str], timeout: float) -> None:
    def done() -> bool:
        for asset in PER_SHARD:
            have = {m["partition"] for m in stack.materialized(asset)}
            if not set(shards) <= have:
                return False
        return True

    wait_for(done, timeout, f"every per-shard asset of {shards}", interval=5)


def _shards_of(stack: Stack, file_name: str, count: int) -> list[str]:
    from synthvlm_assets.shards import file_tag

    tag = file_tag(f"s3://synthvlm/inbox/{file_name}")  # shard keys: <file tag>-<start>-<end>

    def found():
        keys = sorted(
            {m["partition"] for m in stack.materialized("raw_caption_pool") if m["partition"].startswith(tag)}
        )
        return keys if len(keys) == count else None

    return wait_for(found, 600, f"{count} shard(s) of {file_name} registered and loaded", interval=5)


def test_caption_file_to_selected_dataset_in_run_containers(stack, report):
    """Sensor -> automation -> DockerRunLauncher: a caption file in the inbox becomes shards, each shard's
    chain runs, and the selection publishes SynthVLM-100K, every run in a container of its own."""
    t0 = time.monotonic()
    stack.put_captions("pool-a.jsonl", captions(2 * SHARD_ROWS, seed=1))
    shards = _shards_of(stack, "pool-a.jsonl", 2)
    _wait_chain(stack, shards, 900)
    scored_runs = {m["runId"] for m in stack.materialized("image_scores")}
    wait_for(lambda: any(r["status"] == "SUCCESS" and r["runId"] not in scored_runs
                         for m in stack.materialized("synthvlm_100k") for r in [stack.run(m["runId"])]), 600,
             "synthvlm_100k materialized by a run after the scores")  # fmt: skip
    wait_for(
        lambda: all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in stack.runs()), 300, "every run finished"
    )
    report["pipeline_s"] = round(time.monotonic() - t0)

    runs = stack.runs()
    assert runs and all(r["status"] == "SUCCESS" for r in runs), [(r["runId"], r["status"]) for r in runs]
    containers = [r["tags"].get("docker/container_id") for r in runs]
    assert all(containers) and len(set(containers)) == len(runs), "each run in a container of its own"
    assert {r["tags"].get("dagster/image") for r in runs} == {WORKER_IMAGE}
    report["phase1_runs"] = len(runs)
    # Materializations: one per asset and shard (however the runs grouped them).
    for asset in PER_SHARD:
        per_partition = [m["partition"] for m in stack.materialized(asset) if m["partition"] in shards]
        assert sorted(per_partition) == shards, (asset, per_partition)
    # Run containers are removed when their run ends.
    wait_for(lambda: not stack.run_containers(), 60, "finished run containers removed")

    # In SeaweedFS: every shard's outputs published complete, and the selected dataset.
    root = stack.root()
    for shard in shards:
        for prefix in (f"sdxl_images/{shard}", f"image_scores/{shard}"):
            assert root.manifest(prefix) is not None, prefix
    dataset = root.manifest("synthvlm_100k")  # the switch readers follow: {version, prefix, records}
    assert dataset and dataset["records"] > 0, dataset
    records = json.loads(root.read_bytes(f"{dataset['prefix']}/synthvlm_100k.json"))
    assert len(records) == dataset["records"]


def _verify_published(root, prefix: str) -> dict:
    """A published partition: its manifest, and every file it lists present with the recorded sha256."""
    manifest = root.manifest(prefix)
    assert manifest is not None, f"{prefix}: no manifest"
    files = dict(manifest.get("files", {}))
    if "tar" in manifest:
        files["tar"] = manifest["tar"]
    for name, f in files.items():
        assert hashlib.sha256(root.read_bytes(f["key"])).hexdigest() == f["sha256"], (prefix, name)
    return manifest


def test_killed_run_container_fails_frees_its_slot_and_reexecutes(stack, report):
    """A run container killed mid-step (as an OOM kill or a crash would): the run is marked failed, its
    `gpu` slot freed, nothing of the step is published, and a re-execution from failure completes."""
    stack.put_captions("pool-b.jsonl", captions(SHARD_ROWS, seed=2))

    def gpu_step_running():
        for r in stack.runs():
            if r["status"] == "STARTED":
                for s in r["stepStats"]:
                    if s["stepKey"] == "sdxl_images" and s["status"] == "IN_PROGRESS":
                        return r
        return None

    victim = wait_for(gpu_step_running, 900, "a run with sdxl_images in progress", interval=0.5)
    (shard,) = _shards_of(stack, "pool-b.jsonl", 1)
    container = victim["tags"]["docker/container_id"]
    slots = stack.gpu_slots()
    assert victim["runId"] in {s["runId"] for s in slots["claimedSlots"]}, slots
    sh("docker", "kill", container)
    killed_at = time.monotonic()

    wait_for(lambda: stack.run(victim["runId"])["status"] == "FAILURE", 90, "the killed run marked failed")
    report["kill_to_failed_s"] = round(time.monotonic() - killed_at)
    wait_for(lambda: victim["runId"] not in {s["runId"] for s in stack.gpu_slots()["claimedSlots"]}, 90,
             "the dead run's gpu slot freed")  # fmt: skip
    report["kill_to_slot_freed_s"] = round(time.monotonic() - killed_at)
    assert report["kill_to_slot_freed_s"] <= 60, report
    root = stack.root()
    steps = {s["stepKey"]: s["status"] for s in stack.run(victim["runId"])["stepStats"]}
    assert steps.get("sdxl_images") != "SUCCESS", steps
    assert root.manifest(f"sdxl_images/{shard}") is None, "a killed step's output is visible"
    assert shard not in {m["partition"] for m in stack.materialized("sdxl_images")}
    assert not any(container.startswith(c) for c in stack.run_containers()), (
        "the killed run's container is still there"
    )

    rerun = stack.reexecute_from_failure(victim["runId"])
    wait_for(lambda: stack.run(rerun)["status"] in ("SUCCESS", "FAILURE"), 900, "the re-execution")
    assert stack.run(rerun)["status"] == "SUCCESS"
    assert stack.run(rerun)["tags"]["docker/container_id"] != container
    _verify_published(root, f"sdxl_images/{shard}")
    _verify_published(root, f"image_scores/{shard}")
    assert shard in {m["partition"] for m in stack.materialized("image_scores")}
    report["reexecution_s"] = round(time.monotonic() - killed_at)


def test_down_with_a_live_run_container_leaves_nothing(stack, report):
    """`docker/stack.sh down -v` while the daemon's run container is alive: no container, volume or network."""
    stack.put_captions("pool-c.jsonl", captions(SHARD_ROWS, seed=3))
    wait_for(lambda: stack.run_containers(), 600, "a live run container", interval=1)
    t0 = time.monotonic()
    stack.compose("down", "-v")
    report["down_s"] = round(time.monotonic() - t0)
    left = _leftovers()
    assert not any(left.values()), left
