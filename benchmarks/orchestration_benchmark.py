"""Orchestration benchmark: caption curation through Dagster against the bare kernel and Data-Juicer.

    .venv/bin/python benchmarks/orchestration_benchmark.py             # COCO val2017 + a 1,000,000-caption pool
    .venv/bin/python benchmarks/orchestration_benchmark.py --quick     # COCO + a 20,000-caption pool (smoke test)

For each pool (COCO val2017's captions file as is, and a synthetic JSONL pool of --captions captions made
from them by curation_benchmark.write_pool) it measures, one after the other on the same cores (slowest last):

- kernel: curation_benchmark's worker functions in a process pool (--workers), register + curate;
- CLI: what the README tells a user, as subprocesses in a fresh temp dir with its own DAGSTER_HOME (the
  repo's dagster.yaml) and SYNTHVLM_STORAGE_ROOT: `synthvlm register FILE`, then
  `synthvlm materialize --image-shards 0`; each timed from process start to exit;
- backfill (COCO unless --no-daemon, the pool with --daemon-pool): a second fresh DAGSTER_HOME,
  `synthvlm register FILE`, then what a UI user does: `dagster-webserver` and `dagster-daemon run` on the
  repo's workspace.yaml, the sensors switched off (as the README says to run things by hand), and the asset
  page's "Materialize all partitions" of raw_caption_pool + curated_captions (the UI's LaunchPartitionBackfill
  mutation with every partition key); timed from the mutation to the backfill's COMPLETED status in the
  instance;
- Data-Juicer 1.6.1 (unless --no-dj): its own ops with the SPEC thresholds, `dj-process` on a recipe
  over the same captions as JSONL, num_proc = cores, in a venv of its own (benchmarks/.venv-dj, created on
  first use), timed from process start to exit;
- the UI's GraphQL queries for the `curated_captions` asset page (the query texts are taken from the
  installed UI bundle), against a webserver on the CLI run's DAGSTER_HOME; median of 3.

Peak RSS is sampled (psutil, every 50 ms) over each measured process tree: the sum over the tree and the
largest single process. Event-log size: the SQLite files under DAGSTER_HOME/history and storage.
Writes benchmarks/results/orchestration-cpu<N>[-quick].{txt,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import glob
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEFAULT_COCO = REPO.parent / "shared" / "data" / "coco_captions_val2017.json"
DJ_VERSION = "1.6.1"
ASSET = "curated_captions"
BACKFILL_ASSETS = ("raw_caption_pool", "curated_captions")
# Asset page (partitions tab) of a partitioned asset: the queries the UI issues, by operation name.
UI_QUERIES = (
    "AssetViewDefinitionQuery",
    "PartitionHealthQuery",
    "AssetPartitionDetailQuery",
    "AssetPartitionStaleQuery",
    "AssetOverviewMetadataEventsQuery",
    "AssetChecksQuery",
    "AssetHealthQuery",
)
DONE_BACKFILL = {
    "COMPLETED",
    "COMPLETED_SUCCESS",
    "COMPLETED_FAILED",
    "FAILED",
    "CANCELED",
}


def curation_benchmark() -> Any:
    """benchmarks/curation_benchmark.py: its pool writer and worker functions are reused, not copied.

    Imported on use, so that --help and --render work while the caption stages are being changed.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import curation_benchmark as cb

    return cb


# ---------------------------------------------------------------------------------------------------------------
# Process-tree RSS sampling and timed subprocesses


class RssSampler:
    """Samples the RSS of process trees (roots and all their descendants) every `interval` seconds."""

    def __init__(self, pids: Sequence[int] = (), interval: float = 0.05) -> None:
        self.pids, self.interval = list(pids), interval
        self.peak_tree_mb = 0.0
        self.peak_proc_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, pid: int) -> None:
        self.pids.append(pid)

    def _sample(self) -> None:
        total, biggest = 0, 0
        for pid in list(self.pids):
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total, biggest = total + rss, max(biggest, rss)
        self.peak_tree_mb = max(self.peak_tree_mb, total / 2**20)
        self.peak_proc_mb = max(self.peak_proc_mb, biggest / 2**20)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Timed:
    seconds: float
    peak_tree_mb: float
    peak_proc_mb: float
    output: str


def run_timed(cmd: Sequence[str], env: dict[str, str], cwd: Path, log: Path, timeout: float) -> Timed:
    """Run a command to completion, timing it from process start to exit and sampling its tree's RSS."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        with RssSampler([proc.pid]) as rss:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"timed out after {timeout:.0f}s: {' '.join(cmd)} (log: {log})") from None
        seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {' '.join(cmd)}\n{text[-3000:]}")
    return Timed(seconds, rss.peak_tree_mb, rss.peak_proc_mb, text)


def start_service(cmd: Sequence[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    # Own session, so that stop_service can end the service and the code servers it spawned together.
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_service(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this benchmark created for it (start_new_session)
        proc.wait(timeout=30)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_bytes(path: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def event_log_bytes(home: Path) -> int:
    """The instance's SQLite databases (runs, per-run event logs, schedules), WAL files included."""
    return sum(
        p.stat().st_size
        for sub in ("history", "storage")
        for p in (home / sub).rglob("*")
        if p.is_file() and re.search(r"\.db(-wal|-shm)?$", p.name)
    )


# ---------------------------------------------------------------------------------------------------------------
# Dagster: a fresh instance, the CLI, the daemon-launched backfill, the UI's GraphQL queries


@dataclass
class Instance:
    root: Path  # the fresh temp dir (cwd of every command)
    home: Path  # DAGSTER_HOME
    data: Path  # SYNTHVLM_STORAGE_ROOT
    env: dict[str, str] = field(default_factory=dict)


def fresh_instance(parent: Path, name: str) -> Instance:
    root = parent / name
    home, data = root / "dagster_home", root / "data"
    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "SYNTHVLM_STORAGE_ROOT": str(data),
        "PYTHONUNBUFFERED": "1",
    }
    return Instance(root, home, data, env)


def synthvlm(inst: Instance, args: Sequence[str], log: str, timeout: float) -> Timed:
    return run_timed(
        [str(VENV_BIN / "synthvlm"), *args],
        inst.env,
        inst.root,
        inst.root / log,
        timeout,
    )


def cli_path(caption_file: Path, parent: Path, name: str, timeout: float) -> tuple[Instance, dict[str, Any]]:
    """The README's curation: `synthvlm register FILE`, then `synthvlm materialize --image-shards 0`."""
    inst = fresh_instance(parent, name)
    reg = synthvlm(inst, ["register", str(caption_file)], "register.log", timeout)
    mat = synthvlm(inst, ["materialize", "--image-shards", "0"], "materialize.log", timeout)
    failed = len(re.findall(r"\bFAILED\b", mat.output))
    return inst, {
        "register_s": reg.seconds,
        "materialize_s": mat.seconds,
        "total_s": reg.seconds + mat.seconds,
        "runs": len(re.findall(r"\(run [0-9a-f]{8}\)", mat.output)),
        "failed_lines": failed,
        "peak_tree_mb": max(reg.peak_tree_mb, mat.peak_tree_mb),
        "peak_proc_mb": max(reg.peak_proc_mb, mat.peak_proc_mb),
        "event_log_bytes": event_log_bytes(inst.home),
        "dagster_home_bytes": dir_bytes(inst.home),
    }


class GraphQL:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/graphql"

    def post(self, query: str, variables: dict | None = None, timeout: float = 600) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out = json.loads(resp.read())
        if out.get("errors"):
            raise RuntimeError(f"GraphQL errors: {json.dumps(out['errors'])[:2000]}")
        return out["data"]

    def timed(self, query: str, variables: dict) -> float:
        t0 = time.perf_counter()
        self.post(query, variables)
        return (time.perf_counter() - t0) * 1000


_WORKSPACE_QUERY = """query { workspaceOrError { ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on RepositoryLocation { repositories { name } } ... on PythonError { message } }
} } } }"""


def start_webserver(inst: Instance, log: str) -> tuple[subprocess.Popen, GraphQL, dict[str, str]]:
    """dagster-webserver on the repo's workspace.yaml; returns once its code location has loaded."""
    port = free_port()
    cmd = [
        str(VENV_BIN / "dagster-webserver"),
        "-w",
        str(REPO / "workspace.yaml"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    proc = start_service(cmd, inst.env, inst.root, inst.root / log)
    gql = GraphQL(port)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster-webserver exited: {(inst.root / log).read_text()[-3000:]}")
        try:
            entries = gql.post(_WORKSPACE_QUERY, timeout=10)["workspaceOrError"]["locationEntries"]
        except (OSError, RuntimeError, KeyError):
            time.sleep(0.5)
            continue
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            loc = entries[0]["locationOrLoadError"]
            if loc["__typename"] != "RepositoryLocation":
                raise RuntimeError(f"code location failed to load: {loc}")
            return (
                proc,
                gql,
                {
                    "repositoryLocationName": entries[0]["name"],
                    "repositoryName": loc["repositories"][0]["name"],
                },
            )
        time.sleep(0.5)
    stop_service(proc)
    raise RuntimeError("dagster-webserver did not load the code location in 300 s")


def stop_sensors(gql: GraphQL, repo: dict[str, str]) -> list[str]:
    """Switch off every running sensor (automation, file sensor), as the README says to run by hand."""
    q = """query($r: RepositorySelector!) { sensorsOrError(repositorySelector: $r) {
      ... on Sensors { results { name sensorState { id status } } } } }"""
    stopped = []
    for s in gql.post(q, {"r": repo})["sensorsOrError"]["results"]:
        if s["sensorState"]["status"] == "RUNNING":
            m = "mutation($id: String!) { stopSensor(id: $id) { __typename ... on PythonError { message } } }"
            res = gql.post(m, {"id": s["sensorState"]["id"]})["stopSensor"]
            if res["__typename"] != "StopSensorMutationResult":
                raise RuntimeError(f"could not stop sensor {s['name']}: {res}")
            stopped.append(s["name"])
    return stopped


def wait_daemon(gql: GraphQL, timeout: float = 300) -> None:
    q = "query { instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"
    deadline = time.time() + timeout
    while time.time() < deadline:
        statuses = gql.post(q)["instance"]["daemonHealth"]["allDaemonStatuses"]
        healthy = {s["daemonType"] for s in statuses if s["healthy"]}
        if {"BACKFILL", "QUEUED_RUN_COORDINATOR"} <= healthy:
            return
        time.sleep(0.5)
    raise RuntimeError("dagster-daemon: backfill and run-queue daemons not healthy after 300 s")


def backfill_path(caption_file: Path, parent: Path, name: str, timeout: float) -> dict[str, Any]:
    """Register with the CLI, then a UI-style asset backfill of every partition, run by the daemon."""
    from dagster import DagsterInstance, RunsFilter
    from dagster._core.storage.tags import BACKFILL_ID_TAG

    inst = fresh_instance(parent, name)
    reg = synthvlm(inst, ["register", str(caption_file)], "register.log", timeout)
    web, gql, repo = start_webserver(inst, "webserver.log")
    daemon = None
    try:
        stopped = stop_sensors(gql, repo)
        daemon = start_service(
            [
                str(VENV_BIN / "dagster-daemon"),
                "run",
                "-w",
                str(REPO / "workspace.yaml"),
            ],
            inst.env,
            inst.root,
            inst.root / "daemon.log",
        )
        wait_daemon(gql)
        keys_q = """query($a: AssetKeyInput!) { assetNodeOrError(assetKey: $a) {
          ... on AssetNode { partitionKeysByDimension { partitionKeys } } } }"""
        node = gql.post(keys_q, {"a": {"path": [ASSET]}})["assetNodeOrError"]
        keys = node["partitionKeysByDimension"][0]["partitionKeys"]
        launch = """mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
          launchPartitionBackfill(backfillParams: $backfillParams) {
            __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
        # The asset page's launch dialog sends exactly these params for a range of dynamic partitions.
        params = {
            "tags": [],
            "assetSelection": [{"path": [a]} for a in BACKFILL_ASSETS],
            "partitionNames": keys,
            "fromFailure": False,
        }
        with RssSampler([daemon.pid]) as rss_daemon, RssSampler([web.pid]) as rss_web:
            t0 = time.perf_counter()
            res = gql.post(launch, {"backfillParams": params})["launchPartitionBackfill"]
            if res["__typename"] != "LaunchBackfillSuccess":
                raise RuntimeError(f"launchPartitionBackfill: {res}")
            backfill_id = res["backfillId"]
            os.environ["DAGSTER_HOME"] = str(inst.home)  # the repo's dagster.yaml locates the event log by it
            with DagsterInstance.from_config(str(inst.home)) as instance:
                status = "REQUESTED"
                while time.perf_counter() - t0 < timeout:
                    status = instance.get_backfill(backfill_id).status.value
                    if status in DONE_BACKFILL:
                        break
                    if daemon.poll() is not None:
                        raise RuntimeError(f"dagster-daemon exited: {(inst.root / 'daemon.log').read_text()[-3000:]}")
                    time.sleep(0.2)
                seconds = time.perf_counter() - t0
                runs = instance.get_runs(RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
                by_status: dict[str, int] = {}
                for r in runs:
                    by_status[r.status.value] = by_status.get(r.status.value, 0) + 1
    finally:
        if daemon is not None:
            stop_service(daemon)
        stop_service(web)
    if status not in DONE_BACKFILL:
        raise RuntimeError(f"backfill {backfill_id} still {status} after {timeout:.0f}s")
    return {
        "register_s": reg.seconds,
        "backfill_s": seconds,
        "status": status,
        "partitions": len(keys),
        "runs_launched": len(runs),
        "runs_by_status": by_status,
        "sensors_stopped": stopped,
        "peak_tree_mb": rss_daemon.peak_tree_mb,  # daemon, its code server and every run worker
        "peak_proc_mb": rss_daemon.peak_proc_mb,
        "webserver_peak_tree_mb": rss_web.peak_tree_mb,
        "event_log_bytes": event_log_bytes(inst.home),
        "dagster_home_bytes": dir_bytes(inst.home),
    }


def _js_string_at(text: str, start: int) -> str:
    """Decode the JS string literal whose opening quote is at `start`."""
    i = start + 1
    while text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    return json.loads(text[start : i + 1])


def _definition(doc: str, start: int) -> str:
    """A GraphQL definition from `start` to its closing brace."""
    depth, i = 0, doc.index("{", start)
    while True:
        depth += {"{": 1, "}": -1}.get(doc[i], 0)
        i += 1
        if depth == 0:
            return doc[start:i]


def ui_query_texts(names: Sequence[str]) -> dict[str, str]:
    """The UI's own query documents, fragments resolved, from the webserver's installed JS bundle."""
    import dagster_webserver

    chunks = Path(dagster_webserver.__file__).parent / "webapp" / "build" / "_next" / "static" / "chunks"
    docs = []
    for js in chunks.glob("*.js"):
        text = js.read_text(errors="replace")
        for m in re.finditer(r'"\\n\s*(?:query|fragment|mutation) [A-Za-z_]', text):
            docs.append(_js_string_at(text, m.start()))
    blob = "\n".join(docs)
    defs: dict[str, str] = {}
    for m in re.finditer(r"\b(query|fragment) ([A-Za-z_]\w*)[ ($]", blob):
        defs.setdefault(m.group(2), _definition(blob, m.start()))
    out = {}
    for name in names:
        if name not in defs:
            continue
        parts, todo, seen = [defs[name]], [defs[name]], {name}
        while todo:
            for frag in re.findall(r"\.\.\.([A-Za-z_]\w*)", todo.pop()):
                if frag != "on" and frag not in seen and frag in defs:
                    seen.add(frag)
                    parts.append(defs[frag])
                    todo.append(defs[frag])
        out[name] = "\n".join(parts)
    return out


def graphql_page(inst: Instance, repeats: int = 3) -> dict[str, Any]:
    """Time the curated_captions asset page's queries (partitions tab, latest partition selected)."""
    texts = ui_query_texts(UI_QUERIES)
    web, gql, _ = start_webserver(inst, "webserver-graphql.log")
    try:
        keys_q = """query($a: AssetKeyInput!) { assetNodeOrError(assetKey: $a) {
          ... on AssetNode { partitionKeysByDimension { partitionKeys } } } }"""
        node = gql.post(keys_q, {"a": {"path": [ASSET]}})["assetNodeOrError"]
        keys = node["partitionKeysByDimension"][0]["partitionKeys"]
        values = {
            "assetKey": {"path": [ASSET]},
            "assetKeys": [{"path": [ASSET]}],
            "partitionKey": keys[-1],
        }
        results: dict[str, Any] = {}
        for name, text in texts.items():
            header = text[: text.index("{")]
            needed = re.findall(r"\$(\w+):\s*[^,)]*!", header)
            if any(v not in values for v in needed):
                results[name] = {"skipped": f"needs {needed}"}
                continue
            variables = {v: values[v] for v in re.findall(r"\$(\w+):", header) if v in values}
            try:
                ms = [gql.timed(text, variables) for _ in range(repeats)]
            except (RuntimeError, OSError) as exc:
                results[name] = {"error": str(exc)[:300]}
                continue
            results[name] = {
                "median_ms": statistics.median(ms),
                "first_ms": ms[0],
                "runs_ms": ms,
            }
        timed = [r["median_ms"] for r in results.values() if "median_ms" in r]
        return {
            "partitions": len(keys),
            "queries": results,
            "page_total_ms": sum(timed),
            "missing": sorted(set(UI_QUERIES) - set(texts)),
        }
    finally:
        stop_service(web)


# ---------------------------------------------------------------------------------------------------------------
# Kernel and Data-Juicer


def kernel_path(caption_file: Path, parent: Path, name: str, shard_rows: int, workers: int) -> dict[str, Any]:
    with RssSampler([os.getpid()]) as rss:
        r = curation_benchmark().run(caption_file, str(parent / name), shard_rows, workers)
    return {
        "register_s": r["register_s"],
        "curate_s": r["curate_s"],
        "total_s": r["register_s"] + r["curate_s"],
        "shards": r["shards"],
        "captions": r["captions"],
        "kept": r["kept"],
        "peak_tree_mb": rss.peak_tree_mb,
        "peak_proc_mb": rss.peak_proc_mb,
    }


def ensure_dj_venv(venv: Path) -> Path:
    """benchmarks/.venv-dj with py-data-juicer (created once). Returns its python."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import data_juicer.core, data_juicer.ops, torch, ftfy"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"installing py-data-juicer=={DJ_VERSION} into {venv} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # aiohttp: imported by data_juicer.utils.file_utils but not declared. ftfy: the project's pin (DJ lazy-installs
    # it). torch: DJ calls torch.cuda.empty_cache() after every op (free_models), and otherwise installs torch
    # from PyPI by itself in the middle of the first run (6 GB with CUDA); the CPU build does for this. The probe
    # import below also lets DJ lazy-install what its imports want (ray), so that no timed run installs anything.
    cpu_torch = sorted(glob.glob("/opt/wheels/torch-*+cpu-cp3*.whl"))
    torch = cpu_torch[-1] if cpu_torch else "torch"
    extra = [] if cpu_torch else ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    pkgs = [f"py-data-juicer=={DJ_VERSION}", "ftfy==6.3.1", "aiohttp", torch]
    subprocess.run([str(py), "-m", "pip", "install", "-q", *pkgs, *extra], check=True)
    subprocess.run(probe, check=True)
    return py


def dj_version(py: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('py-data-juicer'))"
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True).stdout.strip()


def to_jsonl(caption_file: Path, out: Path) -> Path:
    """COCO's nested JSON as one {"caption": ...} line per annotation: a format Data-Juicer reads (untimed)."""
    doc = json.loads(caption_file.read_text())
    with open(out, "w") as f:
        for a in doc["annotations"]:
            f.write(json.dumps({"id": a["id"], "caption": a["caption"]}) + "\n")
    return out


def dj_path(py: Path, jsonl: Path, parent: Path, name: str, num_proc: int, timeout: float) -> dict[str, Any]:
    """`dj-process` on a recipe of DJ's own ops with the SPEC thresholds (= RuleFilterSettings' defaults)."""
    from synthvlm_assets.captions.filters import RuleFilterSettings

    s = RuleFilterSettings()
    work = parent / name
    assets = work / "assets"
    assets.mkdir(parents=True)
    # The project's copy of DJ's flagged-word list (DJ would download the same file on first use).
    shutil.copy(
        REPO / "synthvlm_assets" / "captions" / "data" / "flagged_words.json",
        assets / "flagged_words.json",
    )
    recipe = {
        "project_name": "orchestration-benchmark",
        "dataset_path": str(jsonl),
        "export_path": str(work / "out" / "kept.jsonl"),
        "work_dir": str(work / "work"),
        "np": num_proc,
        "text_keys": "caption",
        "open_tracer": False,
        "process": [
            {"fix_unicode_mapper": {"normalization": "NFC"}},
            {"punctuation_normalization_mapper": {}},
            {
                "alphanumeric_filter": {
                    "tokenization": False,
                    "min_ratio": s.alphanumeric_ratio_min,
                }
            },
            {
                "character_repetition_filter": {
                    "rep_len": s.character_repetition_n,
                    "max_ratio": s.character_repetition_ratio_max,
                }
            },
            {
                "flagged_words_filter": {
                    "lang": s.flagged_words_lang,
                    "tokenization": False,
                    "max_ratio": s.flagged_word_ratio_max,
                    "flagged_words_dir": str(assets),
                }
            },
            {
                "special_characters_filter": {
                    "min_ratio": s.special_character_ratio_min,
                    "max_ratio": s.special_character_ratio_max,
                }
            },
            {
                "word_repetition_filter": {
                    "lang": "en",
                    "tokenization": False,
                    "rep_len": s.word_repetition_n,
                    "max_ratio": s.word_repetition_ratio_max,
                }
            },
        ],
    }
    cfg = work / "recipe.json"  # JSON is YAML: dj-process reads either
    cfg.write_text(json.dumps(recipe, indent=1))
    # Fresh caches: HF datasets would otherwise reuse the parsed JSONL of an earlier run of the same file.
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(work / "hf"),
        "DATA_JUICER_CACHE_HOME": str(work / "djcache"),
    }
    env.pop("PYTHONPATH", None)
    r = run_timed(
        [str(py.parent / "dj-process"), "--config", str(cfg)],
        env,
        work,
        work / "dj.log",
        timeout,
    )
    kept_file = work / "out" / "kept.jsonl"
    kept = sum(1 for _ in open(kept_file)) if kept_file.exists() else -1
    return {
        "total_s": r.seconds,
        "kept": kept,
        "num_proc": num_proc,
        "peak_tree_mb": r.peak_tree_mb,
        "peak_proc_mb": r.peak_proc_mb,
    }


# ---------------------------------------------------------------------------------------------------------------
# One pool, the table, main


def _stage(out: dict[str, Any], key: str, fn: Any, *a: Any) -> Any:
    """Run one measurement; a failure is recorded (and printed) instead of losing the others."""
    try:
        out[key] = fn(*a)
        return out[key]
    except Exception as exc:  # a benchmark reports every failure and carries on
        out.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"[:4000]
        print(f"   FAILED: {out['errors'][key][:1500]}", flush=True)
        return None


def bench_pool(
    label: str,
    caption_file: Path,
    jsonl: Path,
    tmp: Path,
    args: argparse.Namespace,
    dj_py: Path | None,
    daemon: bool,
    save: Any,
) -> dict[str, Any]:
    """One pool: kernel, Data-Juicer, CLI (+ GraphQL on its instance), backfill; the slow ones last.

    `save(out)` runs after each stage, so an interrupted run still leaves what it measured.
    """
    out: dict[str, Any] = {"pool": label, "file": str(caption_file)}
    print(f"\n== {label}: kernel ({args.workers} workers)", flush=True)
    k = kernel_path(caption_file, tmp, f"{label}-kernel", args.shard_rows, args.workers)
    n, shards = k["captions"], k["shards"]
    out.update(kernel=k, captions=n, shards=shards)
    print(f"   {k['total_s']:.1f}s ({n / k['total_s']:,.0f}/s), {shards} shards, kept {k['kept']:,}")
    save(out)

    if dj_py is not None:
        print(f"== {label}: Data-Juicer (num_proc {args.dj_np})", flush=True)
        dj_args = (dj_py, jsonl, tmp, f"{label}-dj", args.dj_np, args.timeout)
        d = _stage(out, "dj", dj_path, *dj_args)
        if d is not None:
            print(
                f"   {d['total_s']:.1f}s ({n / d['total_s']:,.0f}/s), kept {d['kept']:,}",
                flush=True,
            )
        save(out)

    print(f"== {label}: CLI register + materialize --image-shards 0", flush=True)
    cli = _stage(out, "cli", cli_path, caption_file, tmp, f"{label}-cli", args.timeout)
    if cli is not None:
        inst, c = cli
        out["cli"] = c
        print(
            f"   register {c['register_s']:.1f}s + materialize {c['materialize_s']:.1f}s",
            flush=True,
        )
        save(out)
        if not args.no_graphql:
            print(f"== {label}: GraphQL, {ASSET} asset page", flush=True)
            g = _stage(out, "graphql", graphql_page, inst)
            if g is not None:
                print(
                    f"   {g['partitions']} partitions, page {g['page_total_ms']:.0f} ms",
                    flush=True,
                )
            save(out)
        if not args.keep:
            shutil.rmtree(inst.root, ignore_errors=True)

    if daemon:
        print(f"== {label}: daemon backfill of {' + '.join(BACKFILL_ASSETS)}", flush=True)
        bf_args = (caption_file, tmp, f"{label}-backfill", args.timeout)
        b = _stage(out, "backfill", backfill_path, *bf_args)
        if b is not None:
            print(
                f"   {b['status']} in {b['backfill_s']:.1f}s, {b['runs_launched']} runs",
                flush=True,
            )
        save(out)
    return out


def _rate(n: int, seconds: float | None) -> float | None:
    return n / seconds if seconds else None


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """Derived figures of one pool: rates, per-shard overhead, ratios.

    CLI (register + materialize) is set against the kernel's register + curate; the backfill (registered
    beforehand, timed from launch to COMPLETED) against the kernel's curate alone.
    """
    n, shards, k = r["captions"], r["shards"], r["kernel"]
    s: dict[str, Any] = {
        "kernel_cps": _rate(n, k["total_s"]),
        "kernel_curate_cps": _rate(n, k["curate_s"]),
    }
    if "cli" in r:
        c = r["cli"]
        s["cli_cps"] = _rate(n, c["total_s"])
        s["cli_overhead_ms_per_shard"] = (c["total_s"] - k["total_s"]) / shards * 1000
    if "backfill" in r:
        b = r["backfill"]
        s["backfill_cps"] = _rate(n, b["backfill_s"])
        s["backfill_overhead_ms_per_shard"] = (b["backfill_s"] - k["curate_s"]) / shards * 1000
    if "dj" in r:
        d = _rate(n, r["dj"]["total_s"])
        s["dj_cps"] = d
        if "cli_cps" in s:
            s["cli_vs_dj"] = s["cli_cps"] / d
        s["kernel_vs_dj"] = s["kernel_cps"] / d
        if "backfill_cps" in s:
            s["backfill_vs_dj"] = s["backfill_cps"] / d
    return s


def render_table(pools: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def fmt(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    cols = [p["pool"] for p in pools]
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, get: Any, spec: str) -> None:
        vals = []
        for p in pools:
            try:
                vals.append(fmt(get(p), spec))
            except (KeyError, TypeError):
                vals.append("—")
        rows.append((label, vals))

    add("captions", lambda p: p["captions"], ",")
    add("shards (partitions)", lambda p: p["shards"], ",")
    add(
        f"kernel s (register + curate, {meta['workers']} workers)",
        lambda p: p["kernel"]["total_s"],
        ".1f",
    )
    add("kernel captions/s", lambda p: p["summary"]["kernel_cps"], ",.0f")
    add(
        "kernel captions/s, curate only",
        lambda p: p["summary"]["kernel_curate_cps"],
        ",.0f",
    )
    add("CLI register s", lambda p: p["cli"]["register_s"], ".1f")
    add("CLI materialize --image-shards 0 s", lambda p: p["cli"]["materialize_s"], ".1f")
    add("CLI total s (incl. process start)", lambda p: p["cli"]["total_s"], ".1f")
    add("CLI runs", lambda p: p["cli"]["runs"], ",")
    add("CLI captions/s", lambda p: p["summary"]["cli_cps"], ",.0f")
    add(
        "CLI overhead ms/shard (vs kernel)",
        lambda p: p["summary"]["cli_overhead_ms_per_shard"],
        ",.0f",
    )
    add(
        "CLI peak RSS MB (tree / largest process)",
        lambda p: f"{p['cli']['peak_tree_mb']:.0f} / {p['cli']['peak_proc_mb']:.0f}",
        "",
    )
    add("CLI event log MB (SQLite)", lambda p: p["cli"]["event_log_bytes"] / 1e6, ",.1f")
    add(
        "backfill s (mutation -> COMPLETED)",
        lambda p: p["backfill"]["backfill_s"],
        ".1f",
    )
    add("backfill status", lambda p: p["backfill"]["status"], "")
    add("backfill runs launched", lambda p: p["backfill"]["runs_launched"], ",")
    add("backfill captions/s", lambda p: p["summary"]["backfill_cps"], ",.0f")
    add(
        "backfill overhead ms/shard (vs kernel curate)",
        lambda p: p["summary"]["backfill_overhead_ms_per_shard"],
        ",.0f",
    )
    add(
        "backfill peak RSS MB (daemon tree / largest)",
        lambda p: f"{p['backfill']['peak_tree_mb']:.0f} / {p['backfill']['peak_proc_mb']:.0f}",
        "",
    )
    add(
        "backfill event log MB (SQLite)",
        lambda p: p["backfill"]["event_log_bytes"] / 1e6,
        ",.1f",
    )
    add(
        f"Data-Juicer s (num_proc {meta['dj_num_proc']}, incl. start)",
        lambda p: p["dj"]["total_s"],
        ".1f",
    )
    add("Data-Juicer captions/s", lambda p: p["summary"]["dj_cps"], ",.0f")
    add("Data-Juicer peak RSS MB (tree)", lambda p: p["dj"]["peak_tree_mb"], ".0f")
    add(
        "kept: kernel (dedup) / Data-Juicer (no dedup)",
        lambda p: f"{p['kernel']['kept']:,} / {p['dj']['kept']:,}",
        "",
    )
    add(
        "ratio CLI / Data-Juicer (captions/s)",
        lambda p: p["summary"]["cli_vs_dj"],
        ".2f",
    )
    add("ratio backfill / Data-Juicer", lambda p: p["summary"]["backfill_vs_dj"], ".2f")
    add("ratio kernel / Data-Juicer", lambda p: p["summary"]["kernel_vs_dj"], ".2f")
    add(
        "GraphQL PartitionHealthQuery ms (median of 3)",
        lambda p: p["graphql"]["queries"]["PartitionHealthQuery"]["median_ms"],
        ",.0f",
    )
    add(
        "GraphQL asset page ms (sum of medians)",
        lambda p: p["graphql"]["page_total_ms"],
        ",.0f",
    )

    width = max(len(label) for label, _ in rows)
    colw = [max(len(c), *(len(v[i]) for _, v in rows)) for i, c in enumerate(cols)]
    lines = [
        f"orchestration benchmark, {meta['date']}: {meta['machine']['cpu_model']}, {meta['machine']['cores']} cores; "
        f"dagster {meta['versions']['dagster']}, Data-Juicer {meta['versions'].get('py-data-juicer') or '—'}, "
        f"commit {meta['commit']}; load average at start "
        + "/".join(f"{x:.1f}" for x in meta["machine"]["load_avg_at_start"]),
        "| " + "metric".ljust(width) + " | " + " | ".join(c.rjust(w) for c, w in zip(cols, colw)) + " |",
        "|" + "-" * (width + 2) + "|" + "|".join("-" * (w + 2) for w in colw) + "|",
    ]
    for label, vals in rows:
        lines.append("| " + label.ljust(width) + " | " + " | ".join(v.rjust(w) for v, w in zip(vals, colw)) + " |")
    for p in pools:
        g = p.get("graphql")
        if g:
            per = ", ".join(
                f"{k} {v['median_ms']:.0f}" if "median_ms" in v else f"{k} ({next(iter(v))})"
                for k, v in g["queries"].items()
            )
            lines.append(f"GraphQL {p['pool']} ({g['partitions']} partitions), ms: {per}")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--coco",
        type=Path,
        default=DEFAULT_COCO,
        help="COCO captions JSON (default: %(default)s)",
    )
    p.add_argument(
        "--captions",
        type=int,
        default=None,
        help="synthetic pool size (default 1,000,000; --quick 20,000)",
    )
    p.add_argument("--shard-rows", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2, help="kernel worker processes")
    p.add_argument(
        "--dj-np",
        type=int,
        default=os.cpu_count() or 1,
        help="Data-Juicer num_proc (default: cores)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a 20,000-caption pool: a smoke test in a few minutes",
    )
    p.add_argument("--no-dj", action="store_true", help="skip Data-Juicer (and its venv)")
    p.add_argument("--dj-venv", type=Path, default=REPO / "benchmarks" / ".venv-dj")
    p.add_argument("--no-daemon", action="store_true", help="skip the daemon backfill (COCO's too)")
    p.add_argument(
        "--daemon-pool",
        action="store_true",
        help="also backfill the synthetic pool through the daemon",
    )
    p.add_argument("--no-graphql", action="store_true", help="skip the asset page's GraphQL timing")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="per command, seconds")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="parent of the temp dir (default: system temp)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the CLI instances (DAGSTER_HOME, data) after the run",
    )
    p.add_argument("--out", type=Path, default=None, help="results path without suffix")
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        help="re-render the table of a results JSON; run nothing",
    )
    args = p.parse_args()
    if args.render:
        doc = json.loads(args.render.read_text())
        for r in doc["pools"]:
            r["summary"] = summarize(r)
        print(render_table(doc["pools"], doc))
        return
    if args.captions is None:
        args.captions = 20_000 if args.quick else 1_000_000
    if not args.coco.exists():
        sys.exit(f"COCO captions not found at {args.coco} (--coco PATH)")
    cores = os.cpu_count() or 1
    out = args.out or REPO / "benchmarks" / "results" / f"orchestration-cpu{cores}{'-quick' if args.quick else ''}"

    from importlib.metadata import version

    dj_py = None if args.no_dj else ensure_dj_venv(args.dj_venv)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "synthvlm_assets"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "commit": commit + ("+dirty" if dirty.strip() else ""),
        "workers": args.workers,
        "dj_num_proc": args.dj_np,
        "versions": {
            "dagster": version("dagster"),
            "dagster-webserver": version("dagster-webserver"),
            "synthvlm-assets": version("synthvlm-assets"),
            "py-data-juicer": dj_version(dj_py) if dj_py else None,
        },
    }
    print(
        f"{meta['machine']['cpu_model']}, {cores} cores, load {meta['machine']['load_avg_at_start']}",
        flush=True,
    )

    pools: list[dict[str, Any]] = []

    def save(current: dict[str, Any] | None = None, final: bool = False) -> str:
        """Write the table and JSON of everything measured so far (`-partial` until the end)."""
        done = [*pools, current] if current is not None else pools
        for r in done:
            r["summary"] = summarize(r)
        table = render_table(done, meta)
        path = out if final else out.with_name(out.name + "-partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".txt").write_text(table + "\n")
        doc = {**meta, "complete": final, "pools": done}
        path.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        return table

    if args.keep:  # the instances outlive the run: a folder that is not removed on exit
        workdir = contextlib.nullcontext(tempfile.mkdtemp(prefix="orch-bench-", dir=args.workdir))
    else:
        workdir = tempfile.TemporaryDirectory(prefix="orch-bench-", dir=args.workdir)
    with workdir as tmp_s:
        tmp = Path(tmp_s)
        if args.keep:
            print(f"instances kept under {tmp}", flush=True)
        coco_jsonl = to_jsonl(args.coco, tmp / "coco.jsonl")
        coco = bench_pool("coco", args.coco, coco_jsonl, tmp, args, dj_py, not args.no_daemon, save)
        pools.append(coco)
        pool = tmp / f"pool-{args.captions}.jsonl"
        t = time.perf_counter()
        curation_benchmark().write_pool(args.coco, args.captions, pool)
        mb, secs = pool.stat().st_size / 1e6, time.perf_counter() - t
        print(f"\nsynthesised {args.captions:,} captions ({mb:.0f} MB) in {secs:.1f}s")
        n = args.captions
        label = f"pool-{n // 1000}k" if n % 1000 == 0 else f"pool-{n}"
        daemon = args.daemon_pool and not args.no_daemon
        pools.append(bench_pool(label, pool, pool, tmp, args, dj_py, daemon, save))
    table = save(final=True)
    for partial in (".txt", ".json"):
        out.with_name(out.name + "-partial").with_suffix(partial).unlink(missing_ok=True)
    print("\n" + table)
    print(f"\nwrote {out.with_suffix('.txt')} and .json")


if __name__ == "__main__":
    main()
