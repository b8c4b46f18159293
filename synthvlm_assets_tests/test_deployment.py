"""The whole asset graph as deployed: Dagster's storage in a real PostgreSQL, artifacts in a real
S3-compatible store (SeaweedFS), runs queued through the instance and started by `dagster-daemon`
(QueuedRunCoordinator + DefaultRunLauncher): every run and every step is a process of its own, and
everything they share crosses PostgreSQL or S3. Tiny preset (random models, CPU)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import s3fs
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from synthvlm_assets.defs.build import MAIN_JOB, Settings
from synthvlm_assets.query import connect
from synthvlm_assets.query import STEPS

from .conftest import REPO, SeaweedFS
from .test_graph import reference

PER_SHARD = list(STEPS)  # the per-shard chain, in order
GPU_STEPS = {"judged_captions", "sdxl_images", "image_scores"}
CHECKS_PER_SHARD = 1 + 1 + 1 + 2 + 3 + 2  # raw, curated, pair filters, judge, images, scores
SHARD_ROWS = 12
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def captions(n: int, seed: int) -> list[dict]:
    """Plain English captions that pass the paper's filters, with a few exact and near duplicates."""
    rng = random.Random(seed)
    subjects = [
        "A brown dog",
        "Two children",
        "An old man",
        "A red bus",
        "A small cat",
        "A group of people",
        "A woman",
        "A horse",
    ]
    verbs = ["is standing", "is sitting", "is waiting", "is resting", "is playing", "is walking"]
    places = [
        "next to a wooden fence",
        "on a busy city street",
        "in a green park",
        "near the river bank",
        "inside a bright kitchen",
    ]
    rows = [
        {"id": f"{seed}-{i}", "caption": f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(places)}."}
        for i in range(n)
    ]
    for i in range(0, n, 5):  # duplicates: dedup has something to remove, across shards too
        rows[i + 1 if i + 1 < n else i]["caption"] = rows[i]["caption"].replace("'", "’")
    return rows


class Deployment:
    """PostgreSQL + SeaweedFS + `dagster-daemon run` over the production code location
    (`synthvlm_assets.definitions`), configured through SYNTHVLM_* variables like a deployment."""

    def __init__(self, home: Path, pg, store: SeaweedFS) -> None:
        self.home, self.store = home, store
        self.bucket = store.make_bucket()
        self.root_uri = f"s3://{self.bucket}/synthvlm"
        (home / "dagster.yaml").write_text(yaml.safe_dump({
            "storage": pg.dagster_storage(),
            "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                                "config": {"dequeue_interval_seconds": 1}},
            "run_launcher": {"module": "dagster.core.launcher", "class": "DefaultRunLauncher"},
            # One "GPU": the gpu pool admits one sdxl_images/image_scores step at a time across runs.
            # Op granularity (as on Kubernetes) with a run buffer of 1: both runs start, and the
            # second one's GPU step waits for the slot, claimed in PostgreSQL across processes.
            "concurrency": {"runs": {"max_concurrent_runs": 3},
                            "pools": {"default_limit": 1, "granularity": "op", "op_granularity_run_buffer": 1}},
            "telemetry": {"enabled": False},
        }))  # fmt: skip
        self.workspace = home / "workspace.yaml"
        module = {"module_name": "synthvlm_assets.definitions", "working_directory": str(REPO)}
        module["location_name"] = "synthvlm_assets"
        self.workspace.write_text(yaml.safe_dump({"load_from": [{"python_module": module}]}))
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_PASSWORD": pg.password,
            "AWS_ACCESS_KEY_ID": store.access_key,
            "AWS_SECRET_ACCESS_KEY": store.secret_key,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "SYNTHVLM_STORAGE_ROOT": self.root_uri,
            "SYNTHVLM_S3_ENDPOINT_URL": store.endpoint,
            "SYNTHVLM_INPUT_URI": f"s3://{self.bucket}/inbox",
            "SYNTHVLM_SHARD_ROWS": str(SHARD_ROWS),
            "SYNTHVLM_JUDGE_MODEL": "tiny",
            "SYNTHVLM_SDXL_MODEL": "tiny",
            "SYNTHVLM_CLIP_MODEL": "tiny",
            "SYNTHVLM_SELECT_K": "10",
        }
        self.settings = Settings.from_env(self.env)
        self.fs = s3fs.S3FileSystem(**store.storage_options(), skip_instance_cache=True)
        self.instance = DagsterInstance.from_config(str(home))
        self.bin = Path(sys.executable).parent
        self.daemon_log = open(home / "daemon.log", "wb")
        self.daemon = subprocess.Popen(
            [str(self.bin / "dagster-daemon"), "run", "-w", str(self.workspace)],
            env=self.env, cwd=home, stdout=self.daemon_log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def put_captions(self, key: str, rows: list[dict]) -> str:
        self.fs.pipe_file(f"{self.bucket}/{key}", "".join(json.dumps(r) + "\n" for r in rows).encode())
        return f"s3://{self.bucket}/{key}"

    def launch(self, job: str, partitions: list[str | None], ops: list[str] | None = None) -> list[str]:
        """Submit one run per partition with `dagster job launch`: into the instance's queue, from
        which the daemon starts them (nothing executes in the launching process)."""
        run_ids, procs = [], []
        for partition in partitions:
            run_ids.append(str(uuid.uuid4()))
            tags = json.dumps({"dagster/partition": partition} if partition else {})
            args = [
                str(self.bin / "dagster"),
                "job",
                "launch",
                "-w",
                str(self.workspace),
                "-j",
                job,
                "--tags",
                tags,
                "--run-id",
                run_ids[-1],
            ]
            args += ["--op-selection", ",".join(ops)] if ops else []
            procs.append(
                subprocess.Popen(
                    args, env=self.env, cwd=self.home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out[-3000:]
        return run_ids

    def wait(self, run_ids: list[str], timeout: float = 900) -> dict[str, DagsterRunStatus]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.daemon.poll() is None, f"dagster-daemon exited: {self.log_tail()}"
            statuses = {r: self.instance.get_run_by_id(r).status for r in run_ids}
            if all(s in FINISHED for s in statuses.values()):
                return statuses
            time.sleep(0.5)
        raise AssertionError(f"runs not finished after {timeout} s: {statuses}\n{self.log_tail()}")

    def automation_runs(self, n: int, timeout: float = 240) -> list[str]:
        """The runs the automation sensor requested, once there are `n` of them."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            runs = self.instance.get_runs(RunsFilter(tags={"dagster/from_automation_condition": "true"}))
            if len(runs) >= n:
                return [r.run_id for r in reversed(runs)]
            time.sleep(0.5)
        raise AssertionError(f"automation requested fewer than {n} runs in {timeout} s\n{self.log_tail()}")

    def events(self, run_id: str, event_type: DagsterEventType) -> list:
        return [e for e in self.instance.all_logs(run_id, of_type=event_type)]

    def failure_messages(self, run_id: str) -> str:
        return "\n".join(
            str(e.dagster_event.event_specific_data.error) for e in self.events(run_id, DagsterEventType.STEP_FAILURE)
        )

    def log_tail(self) -> str:
        self.daemon_log.flush()
        return (self.home / "daemon.log").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.daemon.poll() is None:
            os.killpg(self.daemon.pid, signal.SIGTERM)  # the daemon and the code server it started
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of its session is left (a code server, a run worker of a failed test)
            os.killpg(self.daemon.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.daemon.wait()
        self.daemon_log.close()
        self.instance.dispose()


@pytest.fixture(scope="module")
def deployment(postgres, tmp_path_factory):
    # A SeaweedFS of its own: the fault test restarts it, which must not touch other tests' server.
    store = SeaweedFS(tmp_path_factory.mktemp("seaweedfs-deploy"))
    # This process reads the instance and the store too, with credentials from the environment.
    ours = {
        "DAGSTER_PG_PASSWORD": postgres.password,
        "AWS_ACCESS_KEY_ID": store.access_key,
        "AWS_SECRET_ACCESS_KEY": store.secret_key,
    }
    old = {k: os.environ.get(k) for k in ours}
    os.environ.update(ours)
    dep = None
    try:
        dep = Deployment(tmp_path_factory.mktemp("dagster_home"), postgres, store)
        yield dep
    finally:
        if dep is not None:
            dep.close()
        store.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _intervals(dep: Deployment, run_ids: list[str], steps: set[str]) -> list[tuple[float, float, str]]:
    """(start, end, step) of every step attempt in `steps`, from the event log in PostgreSQL."""
    out = []
    for run_id in run_ids:
        starts = {}
        for e in dep.instance.all_logs(run_id):
            ev = e.dagster_event
            if ev is None or e.step_key not in steps:
                continue
            if ev.event_type == DagsterEventType.STEP_START:
                starts[e.step_key] = e.timestamp
            elif ev.event_type in (
                DagsterEventType.STEP_SUCCESS,
                DagsterEventType.STEP_FAILURE,
                DagsterEventType.STEP_UP_FOR_RETRY,
            ):
                out.append((starts.pop(e.step_key), e.timestamp, f"{run_id[:8]}:{e.step_key}"))
    return sorted(out)


def _pids(dep: Deployment, run_id: str) -> tuple[set[int], set[int]]:
    """Process ids of the run worker and of the step workers of one run."""
    logs = dep.instance.all_logs(run_id)
    run_pids = {
        e.dagster_event.pid
        for e in logs
        if e.dagster_event and e.dagster_event.event_type == DagsterEventType.RUN_START
    }
    step_pids = {
        e.dagster_event.pid
        for e in logs
        if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_START
    }
    return run_pids, step_pids


def _check_shard_outputs(dep: Deployment, shard: str, expected_kept: list[str]) -> None:
    """A shard's published outputs: every curated caption judged once, one image per kept caption,
    one score each, the tar holding exactly the manifest's images, nothing half-written left behind."""
    root = dep.settings.resources()["storage"].root()
    judged = root.read_partition(
        f"judged_captions/{shard}", "judged", columns=["caption_id", "caption", "verdict"]
    ).to_pylist()
    assert sorted(r["caption"] for r in judged) == sorted(expected_kept)
    ids = [r["caption_id"] for r in judged if r["verdict"] == "yes"]
    assert ids, "the tiny judge kept nothing of this shard"
    images = root.read_partition(f"sdxl_images/{shard}", "manifest").to_pylist()
    assert sorted((r["caption_id"], r["candidate"]) for r in images) == sorted((i, 0) for i in ids)
    with (
        root.fs.open(root.path(f"sdxl_images/{shard}/images.tar"), "rb") as f,
        tarfile.open(fileobj=f, mode="r|") as tar,
    ):
        members = [m.name for m in tar if m.name.endswith(".jpg")]
    assert sorted(members) == sorted(f"{r['key']}.jpg" for r in images if not r["flag"])
    scores = root.read_partition(f"image_scores/{shard}", "scores").to_pylist()
    assert sorted((r["caption_id"], r["candidate"]) for r in scores) == sorted(
        (r["caption_id"], r["candidate"]) for r in images if not r["flag"]
    )
    assert not dep.fs.glob(f"{dep.bucket}/synthvlm/**/.tmp-*")
    staged = dep.fs.find(f"{dep.bucket}/synthvlm/sdxl_images/_staging/{shard}")
    assert not [p for p in staged if p.endswith(".tar")], staged  # staging cleared (SeaweedFS keeps empty folders)


@dataclass
class Flow:
    rows: list[dict]
    shards: list[str]
    curation: list[str]  # caption_curation over both shards, one run
    main: list[str]  # the GPU stages, one run a shard
    statuses: dict[str, DagsterRunStatus]
    reruns: list[str]
    dataset: str
    outage: tuple[float, float]


@pytest.fixture(scope="module")
def flow(deployment) -> Flow:
    """One production-like pass with nobody clicking: a caption file lands in the inbox; the daemon's
    file sensor registers it as two shards; the automation sensor submits a backfill (caption_curation over
    both shards in one run, then the GPU stages one run a shard); while the first sdxl_images step runs,
    SeaweedFS is stopped (6-20 s, until a step has met the outage) and started again; runs that failed are
    launched again by hand; the automation sensor then refreshes the selection. Timings print with -s."""
    dep = deployment
    rows = captions(2 * SHARD_ROWS, seed=1)
    dep.put_captions("inbox/pool-a.jsonl", rows)
    t0 = time.time()
    # Automation submits a backfill: caption_curation over both shards in one run (its backfill policy),
    # then the GPU stages one shard a run.
    deadline = time.time() + 600
    while True:
        runs = {r: dep.instance.get_run_by_id(r).tags for r in dep.automation_runs(1)}
        main = [r for r, tags in runs.items() if tags.get("dagster/partition")]
        if len(main) >= 2:
            break
        assert time.time() < deadline, f"automation launched no GPU runs: {runs}\n{dep.log_tail()}"
        time.sleep(1.0)
    print("automation runs:", {r[:8]: {k: v for k, v in t.items() if "partition" in k} for r, t in runs.items()})
    curation = [r for r, tags in runs.items() if "dagster/asset_partition_range_start" in tags]
    shards = sorted(s.key for s in dep.settings.resources()["storage"].registry().shards())
    assert len(shards) == 2 and len(main) == 2 and len(curation) == 1
    ranged = runs[curation[0]]
    assert [ranged["dagster/asset_partition_range_start"], ranged["dagster/asset_partition_range_end"]] == shards
    assert sorted(runs[r]["dagster/partition"] for r in main) == shards
    deadline = time.time() + 600
    while not any(e.step_key == "sdxl_images" for r in main for e in dep.events(r, DagsterEventType.STEP_START)):
        assert time.time() < deadline, f"no sdxl_images step started\n{dep.log_tail()}"
        time.sleep(0.2)
    time.sleep(1.0)  # into the step, past its first reads
    down = time.time()
    dep.store.stop()
    # Down for at least 6 s and until a GPU step has met the outage (a storage retry in its logs, or a
    # failed step): a step busy generating in memory may not touch storage for a while, and an outage it
    # never sees tests nothing. Capped at 20 s, inside the storage layer's ~24 s of retries.
    while time.time() - down < 20 and (
        time.time() - down < 6 or not any("retry 1/" in _step_logs(dep, r) or dep.failure_messages(r) for r in main)
    ):
        time.sleep(0.5)
    dep.store.start()
    outage = (down, time.time())
    statuses = dep.wait(main, timeout=900)
    failed = [
        dep.instance.get_run_by_id(r).tags["dagster/partition"]
        for r in main
        if statuses[r] != DagsterRunStatus.SUCCESS
    ]
    reruns = dep.launch(MAIN_JOB, failed) if failed else []
    if reruns:
        dep.wait(reruns, timeout=900)
    # The selection: requested by the automation sensor once the scored shards have new data.
    deadline = time.time() + 300
    while True:
        selection = [
            r
            for r in dep.automation_runs(1)
            if r not in runs and not any("partition" in k for k in dep.instance.get_run_by_id(r).tags)
        ]
        if selection:
            break
        assert time.time() < deadline, f"automation never refreshed the selection\n{dep.log_tail()}"
        time.sleep(1.0)
    dep.wait(selection, timeout=300)
    print(f"\nall runs done after {time.time() - t0:.1f} s; first GPU runs: {[s.value for s in statuses.values()]}")
    for r in run_timeline(dep):
        print(r)
    return Flow(rows, shards, curation, main, statuses, reruns, selection[0], outage)


def test_whole_graph_through_daemon_postgres_and_s3(deployment, flow):
    dep = deployment
    final = flow.curation + [r for r in flow.main if flow.statuses[r] == DagsterRunStatus.SUCCESS] + flow.reruns
    for run_id in final + [flow.dataset]:
        assert dep.instance.get_run_by_id(run_id).status == DagsterRunStatus.SUCCESS, dep.failure_messages(run_id)

    # Every run ran in a process of its own (started by the daemon's launcher), and so did its steps.
    runs = flow.curation + flow.main + flow.reruns + [flow.dataset]
    run_pids = [_pids(dep, r)[0] for r in runs]
    assert all(len(p) == 1 for p in run_pids)
    all_run_pids = set().union(*run_pids)
    assert len(all_run_pids) == len(runs) and os.getpid() not in all_run_pids and dep.daemon.pid not in all_run_pids
    step_pids = set().union(*(_pids(dep, r)[1] for r in final))
    # multiprocess executor: one step process for caption_curation's two shards, one per GPU-run step
    assert len(step_pids) == 1 + 2 * (len(PER_SHARD) - 2) and not step_pids & all_run_pids

    # What PostgreSQL recorded.
    for name in PER_SHARD:
        assert dep.instance.get_materialized_partitions(AssetKey(name)) == set(flow.shards), name
    assert dep.instance.get_latest_materialization_event(AssetKey("synthvlm_100k")) is not None
    checks = [
        e.dagster_event.event_specific_data
        for r in final
        for e in dep.events(r, DagsterEventType.ASSET_CHECK_EVALUATION)
    ]
    assert len(checks) == 2 * CHECKS_PER_SHARD  # every check of every per-shard asset, evaluated
    blocking = [c for c in checks if c.check_name != "no_unusable_images"]
    assert all(c.passed for c in blocking), [c.check_name for c in blocking if not c.passed]

    # The gpu pool (limit 1) never ran two GPU steps at once, although the two runs overlapped.
    gpu = _intervals(dep, flow.main + flow.reruns, GPU_STEPS)
    assert len(gpu) >= 4
    assert all(a[1] <= b[0] for a, b in zip(gpu, gpu[1:])), gpu
    (a_start, a_end), (b_start, b_end) = (_run_span(dep, r) for r in flow.main)
    assert max(a_start, b_start) < gpu[0][1], (
        "the second run started only after the first GPU step: the pool was not exercised"
    )
    blocked = [
        e
        for r in flow.main
        for e in dep.events(r, DagsterEventType.ENGINE_EVENT)
        if "blocked by limit for pool gpu" in (e.message or "")
    ]
    assert blocked, "no GPU step ever waited for the gpu pool"

    # What S3 holds: the brute-force reference, every image scored once, the selection.
    expected = reference([r["caption"] for r in flow.rows])[0]
    con = connect(dep.settings.resources()["storage"].root())
    got = [r[0] for r in con.sql("SELECT caption FROM curated_captions ORDER BY shard, source_row").fetchall()]
    assert got == expected
    n_judged, n_kept = con.sql("SELECT count(*), count(*) FILTER (verdict = 'yes') FROM judged_captions").fetchall()[0]
    assert n_judged == len(expected)
    n_scored, n_distinct = con.sql("SELECT count(*), count(DISTINCT caption_id) FROM image_scores").fetchall()[0]
    assert n_scored == n_distinct == n_kept
    n_selected, n_unique = con.sql("SELECT count(*), count(DISTINCT caption_id) FROM synthvlm_100k").fetchall()[0]
    assert n_selected == n_unique == min(10, n_kept)
    for shard in flow.shards:
        kept = [
            r[0]
            for r in con.sql(
                f"SELECT caption FROM curated_captions WHERE shard = '{shard}' ORDER BY source_row"
            ).fetchall()
        ]
        _check_shard_outputs(dep, shard, kept)


def test_object_store_restarted_mid_run(deployment, flow):
    """The outage hit a running sdxl_images step. Each GPU run either rode it out on the storage
    retries or failed cleanly, naming the object it could not reach, and its rerun succeeded; the
    shards hold every caption exactly once (checked above against the reference), and nothing of
    the registry was written twice."""
    dep = deployment
    down, up = flow.outage
    hit = [r for r in flow.main if any(s < up and e > down for s, e, _ in _intervals(dep, [r], {"sdxl_images"}))]
    assert hit, "the outage did not overlap any sdxl_images step"
    for run_id in flow.main:
        status = flow.statuses[run_id]
        assert status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE)
        if status == DagsterRunStatus.FAILURE:
            assert "s3://" in dep.failure_messages(run_id), dep.failure_messages(run_id)
    logs = "".join(_step_logs(dep, r) for r in hit)
    retried = "retry 1/" in logs  # our storage layer's retries (s3fs/botocore retry quietly below it)
    # Or a step that was running before the store went down and finished after it came back, successfully:
    # it rode the outage out (s3fs's own retries absorb a short one without a log line of ours).
    rode_out = [
        r
        for r in hit
        if flow.statuses[r] == DagsterRunStatus.SUCCESS
        and any(s < down and e > up for s, e, _ in _intervals(dep, [r], GPU_STEPS))
    ]
    failed = [r for r in hit if flow.statuses[r] == DagsterRunStatus.FAILURE]
    assert retried or failed or rode_out, "no GPU step was running through the outage: it tested nothing"
    assert len(flow.reruns) == sum(s != DagsterRunStatus.SUCCESS for s in flow.statuses.values())
    root = dep.settings.resources()["storage"].root()
    assert len(root.list("registry/files")) == 1
    print(
        f"storage retries logged: {retried}; rode out: {len(rode_out)}; "
        f"first GPU runs: {[s.value for s in flow.statuses.values()]}"
    )


def _run_span(dep: Deployment, run_id: str) -> tuple[float, float]:
    record = dep.instance.get_run_record_by_id(run_id)
    return record.start_time, record.end_time


def _step_logs(dep: Deployment, run_id: str) -> str:
    """The run's captured step output (where the storage layer logs its retries)."""
    base = dep.home / "storage" / run_id / "compute_logs"
    return "".join(p.read_text(errors="replace") for p in base.glob("*.err")) if base.exists() else ""


def run_timeline(dep: Deployment) -> list[tuple]:
    """(job, created, started, ended, step durations) of every run, in seconds from the first: printed with -s."""
    out = []
    for run in dep.instance.get_runs():
        rec = dep.instance.get_run_record_by_id(run.run_id)
        steps = _intervals(dep, [run.run_id], set(PER_SHARD) | {"synthvlm_100k"})
        out.append(
            (
                run.job_name,
                rec.create_timestamp.timestamp(),
                rec.start_time,
                rec.end_time,
                [(s[2], round(s[1] - s[0], 1)) for s in steps],
            )
        )
    t0 = min(o[1] for o in out)
    return [
        (o[0], round(o[1] - t0, 1), round((o[2] or t0) - t0, 1), round((o[3] or t0) - t0, 1), o[4])
        for o in sorted(out, key=lambda o: o[1])
    ]
