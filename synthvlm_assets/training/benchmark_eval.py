"""Benchmarks of an exported LLaVA model with lmms-eval (`--model llava_hf`), one task at a time.

lmms-eval runs as a subprocess of its own Python: lmms-eval 0.7.3 cannot share an environment with
Dagster (its `latex2sympy2` pins antlr4-python3-runtime 4.7.2, which breaks Dagster's asset-selection
parser; it also needs filelock < 4 and decord), so it lives in `.venv-eval` (scripts/setup_eval_env.sh)
or any environment with the `eval` extra, named by `python`.

Local datasets: `datasets_dir` holds copies of the tasks' Hugging Face dataset repositories, each at
`<datasets_dir>/<repo id>` (e.g. `<datasets_dir>/lmms-lab-encoder/ScienceQA`, what
`hf download lmms-lab-encoder/ScienceQA --repo-type dataset --local-dir ...` writes: README.md with the
configs + the data files). For each task (for a group: each of its tasks) an override YAML in an
`--include_path` folder includes lmms-eval's own task YAML and sets `dataset_path` to the local copy
(`datasets.load_dataset(<folder>, <config>)` reads the README's configs offline); the run gets
HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1, so nothing is fetched. The overrides are named
`<task>_local`; everything else (prompts, splits, metrics) is lmms-eval's. No Dagster imports here.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

LMMS_EVAL_VERSION = "0.7.3"
EXTRA = "eval"
INSTALL_HINT = (
    f"install the `{EXTRA}` extra (lmms-eval=={LMMS_EVAL_VERSION}) into an environment of its own and point "
    "`lmms_eval_python` (SYNTHVLM_LMMS_EVAL_PYTHON) at its python: `bash scripts/setup_eval_env.sh` builds "
    f".venv-eval over .venv, or `python3.11 -m venv /opt/eval && /opt/eval/bin/pip install '.[{EXTRA}]'` "
    "(not into Dagster's environment: lmms-eval's latex2sympy2 pins antlr4 4.7.2, which breaks Dagster's selection "
    "parser)"
)
SUFFIX = "_local"
NOT_IN_SPEC = "not in SPEC"


class BenchmarkError(RuntimeError):
    """The benchmark could not run or gave no result; the message says why and what to do."""


class LmmsEvalNotInstalled(BenchmarkError):
    pass


class DatasetNotAvailable(BenchmarkError):
    pass


class LmmsEvalFailed(BenchmarkError):
    pass


@dataclass(frozen=True)
class PaperResult:
    """One row of the paper's table as SPEC §6 states it."""

    size: str  # "7B" / "13B"
    synthvlm: float
    llava15: float


@dataclass(frozen=True)
class BenchmarkTask:
    key: str  # our partition key
    lmms_task: str  # lmms-eval's task (or group) name
    metric: str  # the headline metric in lmms-eval's results JSON (`<metric>,none`)
    scale: float  # headline * scale = the paper's units
    title: str
    paper: tuple[PaperResult, ...] = ()  # only what SPEC §6 states
    note: str = ""
    needs_openai: bool = False  # an LLM judge through OPENAI_API_KEY: no offline run
    unsupported: str = ""  # why it cannot run here (kept in the table for the paper's numbers)


TASKS: dict[str, BenchmarkTask] = {
    t.key: t
    for t in (
        BenchmarkTask(
            "scienceqa_img",
            "scienceqa_img",
            "exact_match",
            100.0,
            "ScienceQA-IMG (test, accuracy %)",
            paper=(PaperResult("7B", 70.4, 69.3), PaperResult("13B", 74.9, 74.2)),
        ),
        BenchmarkTask(
            "mmbench_en_dev",
            "mmbench_en_dev_static",
            "gpt_eval_score",
            1.0,
            "MMBench-EN dev (accuracy %)",
            note="lmms-eval's static answer extraction; its `mmbench_en_dev` matches answers with GPT (OpenAI API)",
        ),
        BenchmarkTask(
            "mme",
            "mme",
            "mme_perception_score",
            1.0,
            "MME perception (score, of 2000)",
            note="cognition is in the results JSON too (mme_cognition_score)",
        ),
        BenchmarkTask(
            "pope",
            "pope",
            "pope_f1_score",
            100.0,
            "POPE (F1 %, the three splits pooled)",
            note="lmms-eval's `pope` pools adversarial/popular/random; LLaVA-1.5 averages the three F1s",
        ),
        BenchmarkTask("gqa", "gqa", "exact_match", 100.0, "GQA (testdev-balanced, accuracy %)"),
        BenchmarkTask(
            "vqav2_val",
            "vqav2_val",
            "exact_match",
            100.0,
            "VQAv2 (val, VQA accuracy %)",
            note="val split; LLaVA-1.5 reports test-dev (EvalAI server)",
        ),
        BenchmarkTask(
            "vizwiz_vqa_val",
            "vizwiz_vqa_val",
            "exact_match",
            100.0,
            "VizWiz (val, VQA accuracy %)",
            note="val split; LLaVA-1.5 reports test-dev (EvalAI server)",
        ),
        BenchmarkTask("textvqa_val", "textvqa_val", "exact_match", 100.0, "TextVQA (val, accuracy %)"),
        BenchmarkTask("seedbench", "seedbench", "seed_image", 100.0, "SEED-Bench (image questions, accuracy %)"),
        BenchmarkTask(
            "mmvet",
            "mmvet",
            "gpt_eval_score",
            1.0,
            "MM-Vet (GPT-judged score, of 100)",
            needs_openai=True,
            note=(
                "scored by an OpenAI model (OPENAI_API_KEY; MODEL_VERSION, default gpt-4o-2024-11-20; LLaVA-1.5 used "
                "GPT-4): not an offline benchmark"
            ),
        ),
        BenchmarkTask(
            "mmlu",
            "mmlu",
            "acc",
            100.0,
            "MMLU (57 subjects, 0-shot, accuracy %)",
            paper=(PaperResult("7B", 41.2, 36.3), PaperResult("13B", 54.6, 52.4)),
            note="text only, multiple choice by likelihood; the paper does not say how it ran MMLU",
            unsupported=(
                "lmms-eval 0.7.3's llava_hf cannot run text-only tasks with transformers 5: its loglikelihood "
                "iterates doc_to_visual's None, and with an empty image list the processor fails "
                "(IndexError in transformers 5.23's group_images_by_shape); its generate_until has no text-only path"
            ),
        ),
    )
}
RUNNABLE = [key for key, task in TASKS.items() if not task.unsupported]  # the asset's partitions


# ---------------------------------------------------------------- lmms-eval's environment


@dataclass(frozen=True)
class LmmsEvalInfo:
    python: str
    version: str
    tasks_dir: str


_PROBE = r"""
import importlib.metadata, importlib.util, json, os
spec = importlib.util.find_spec("lmms_eval")
out = {"found": spec is not None}
if spec is not None:
    out["version"] = importlib.metadata.version("lmms_eval")
    out["tasks_dir"] = os.path.join(os.path.dirname(spec.origin), "tasks")
    out["decord"] = importlib.util.find_spec("decord") is not None
    try:
        out["filelock_api"] = importlib.util.find_spec("filelock._api") is not None
    except ModuleNotFoundError:
        out["filelock_api"] = False
print(json.dumps(out))
"""


def default_python() -> str:
    """`.venv-eval` beside the running environment (what scripts/setup_eval_env.sh builds), else this Python."""
    candidate = os.path.join(sys.prefix + "-eval", "bin", "python")
    return candidate if os.path.exists(candidate) else sys.executable


def probe_lmms_eval(python: str | None = None) -> LmmsEvalInfo:
    """lmms-eval's version and task folder in `python`'s environment; LmmsEvalNotInstalled otherwise."""
    python = python or default_python()
    try:
        proc = subprocess.run([python, "-c", _PROBE], check=False, capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise LmmsEvalNotInstalled(f"cannot run {python!r} ({exc}); {INSTALL_HINT}") from exc
    if proc.returncode != 0:
        raise LmmsEvalNotInstalled(
            f"{python} failed to look for lmms-eval: {proc.stderr.strip()[-500:]}; {INSTALL_HINT}"
        )
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if not info["found"]:
        raise LmmsEvalNotInstalled(f"lmms-eval is not installed for {python}: {INSTALL_HINT}")
    if not info["decord"]:
        raise LmmsEvalNotInstalled(
            f"lmms-eval {info['version']} at {python} lacks decord, which its llava_hf model imports: "
            f"pip install 'lmms-eval[video-legacy]=={LMMS_EVAL_VERSION}' (part of the `{EXTRA}` extra)"
        )
    if not info["filelock_api"]:
        raise LmmsEvalNotInstalled(
            f"lmms-eval {info['version']} at {python} needs filelock < 4 (it imports filelock._api): "
            f"pip install 'filelock<4' (part of the `{EXTRA}` extra)"
        )
    return LmmsEvalInfo(python=python, version=info["version"], tasks_dir=info["tasks_dir"])


# ---------------------------------------------------------------- lmms-eval's task YAMLs


def _yaml_loader():
    import yaml

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        pass

    # `!function utils.f` and friends: kept as text (only dataset fields are read here).
    Loader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {getattr(node, 'value', '')}")
    return Loader


class TaskIndex:
    """lmms-eval's tasks {name: YAML path}, read from its YAML files the way its TaskManager reads them
    (a `*.yaml` whose `task` is a string is a task; `include:` files come first, the file's own keys
    override theirs)."""

    def __init__(self, tasks_dir: str):
        import yaml

        self._yaml, self._loader = yaml, _yaml_loader()
        self._cache: dict[str, dict] = {}
        self.tasks: dict[str, str] = {}
        for root, dirs, files in os.walk(tasks_dir):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".ipynb_checkpoints"))
            for name in sorted(files):
                if not name.endswith(".yaml"):
                    continue
                path = os.path.join(root, name)
                try:
                    cfg = self.config(path)
                except Exception:  # noqa: BLE001 - lmms-eval skips what it cannot read, so do we
                    continue
                if isinstance(cfg.get("task"), str) and "class" not in cfg:
                    self.tasks.setdefault(cfg["task"], path)

    def config(self, path: str) -> dict:
        if path not in self._cache:
            with open(path, encoding="utf-8") as f:
                raw = self._yaml.load(f, Loader=self._loader) or {}
            merged: dict = {}
            include = raw.pop("include", None)
            for inc in [include] if isinstance(include, str) else include or []:
                merged.update(self.config(inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)))
            merged.update(raw)
            self._cache[path] = merged
        return dict(self._cache[path])


def dataset_repos(index: TaskIndex, name: str) -> dict[str, str]:
    """{task: Hugging Face dataset repo id} of the task `name`."""
    return {name: index.config(index.tasks[name])["dataset_path"]}


def local_copy(datasets_dir: str, repo: str) -> str:
    return os.path.join(datasets_dir, *repo.split("/"))


def _download_hint(datasets_dir: str, repo: str) -> str:
    return f"hf download {repo} --repo-type dataset --local-dir {local_copy(datasets_dir, repo)}"


def _has_data(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if any(f.endswith((".parquet", ".arrow", ".json", ".jsonl", ".csv")) and not f.startswith(".") for f in files):
            return True
    return False


# GQA's process_docs loads its images from the Hub by a name in code (lmms-eval's gqa/utils.py), not from
# the YAML: the local override replaces it with the same mapping over the local copy's images config.
_GQA_LOCAL = '''"""Written by synthvlm_assets: GQA's images from the local copy (lmms-eval's own gqa_process_docs
loads `{repo}`, config testdev_balanced_images, from the Hub)."""
from datasets import load_dataset

LOCAL = {local!r}


def gqa_process_docs(dataset):
    images = load_dataset(LOCAL, "testdev_balanced_images", split="testdev")
    id2image = {{row["id"]: row["image"].convert("RGB") for row in images}}
    return dataset.map(lambda doc: {{"image": id2image[doc["imageId"]]}})
'''


def write_overrides(index: TaskIndex, name: str, include_dir: str, datasets_dir: str) -> str:
    """Override YAMLs in `include_dir` that run the task `name` on the local copies under
    `datasets_dir`; returns the name to pass to `--tasks` (`<name>_local`). DatasetNotAvailable names each
    missing local copy."""
    if name not in index.tasks:
        raise BenchmarkError(f"lmms-eval has no task {name!r} (groups are not supported with local copies)")
    repos = dataset_repos(index, name)
    missing = sorted({repo for repo in repos.values() if not _has_data(local_copy(datasets_dir, repo))})
    if missing:
        raise DatasetNotAvailable(
            f"task {name!r} needs local copies of {', '.join(missing)} under {datasets_dir}; on a machine with "
            f"Hugging Face access: "
            + "; ".join(_download_hint(datasets_dir, repo) for repo in missing)
            + ", then copy the folders over"
        )
    os.makedirs(include_dir, exist_ok=True)
    for task, repo in repos.items():
        cfg = index.config(index.tasks[task])
        lines = [f"include: {json.dumps(os.path.abspath(index.tasks[task]))}", f"task: {json.dumps(task + SUFFIX)}"]
        if cfg.get("tag"):
            lines.append("tag: []")  # or the copy would join the original's collections
        local = os.path.abspath(local_copy(datasets_dir, repo))
        lines.append(f"dataset_path: {json.dumps(local)}")
        if str(cfg.get("process_docs", "")).endswith("utils.gqa_process_docs"):
            with open(os.path.join(include_dir, "synthvlm_gqa_local.py"), "w") as f:
                f.write(_GQA_LOCAL.format(repo=repo, local=local))
            lines.append("process_docs: !function synthvlm_gqa_local.gqa_process_docs")
        _write(include_dir, task, lines)
    return name + SUFFIX


def _write(include_dir: str, name: str, lines: list[str]) -> None:
    with open(os.path.join(include_dir, f"{name}{SUFFIX}.yaml"), "w", encoding="utf-8") as f:
        f.write(
            "# Written by synthvlm_assets: lmms-eval's own task on a local dataset copy.\n" + "\n".join(lines) + "\n"
        )


# ---------------------------------------------------------------- the run


def lmms_eval_command(
    python: str,
    model_dir: str,
    lmms_task: str,
    output_dir: str,
    device: str = "cuda",
    include_path: str | None = None,
    limit: float | None = None,
    force_simple: bool = True,
) -> list[str]:
    """`python -m lmms_eval --model llava_hf ...` for one task. `device_map` is passed as the device:
    llava_hf's default (an empty string) is refused by transformers 5. `--force_simple` picks llava_hf's
    simple adapter, which prompts with LLaVA-1.5's Vicuna template (the chat adapter needs a chat template in
    the processor, which our exports do not carry)."""
    if any(c in model_dir for c in ",="):
        raise BenchmarkError(f"model folder {model_dir!r}: lmms-eval's --model_args cannot hold ',' or '='")
    device = "cuda:0" if device == "cuda" else device
    cmd = [
        python,
        "-m",
        "lmms_eval",
        "--model",
        "llava_hf",
        "--model_args",
        f"pretrained={model_dir},device={device},device_map={device}",
        "--tasks",
        lmms_task,
        "--batch_size",
        "1",
        "--output_path",
        output_dir,
        "--log_samples",
    ]
    if include_path:
        cmd += ["--include_path", include_path]
    if limit is not None:
        cmd += ["--limit", f"{limit:g}"]
    if force_simple:
        cmd.append("--force_simple")
    return cmd


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_DATA_ERRORS = (
    "Couldn't reach",
    "on the Hub",
    "DatasetNotFoundError",
    "Couldn't find any data file",
    "DataFilesNotFoundError",
    "EmptyDatasetError",
    "OfflineModeIsEnabled",
    "doesn't exist on the Hub",
    "BuilderConfig",
)
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit)\b.*)$")


@dataclass
class RunLog:
    """What the run's log said that matters when it gives no result."""

    tail: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    evaluation_errors: list[str] = field(default_factory=list)
    generation_errors: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.tail = (self.tail + [line])[-40:]
        if m := _EXCEPTION_LINE.match(line.strip()):
            self.exceptions.append(m.group(1))
        if "Error during evaluation:" in line:
            self.evaluation_errors.append(line.split("Error during evaluation:", 1)[1].strip())
        if re.search(r"Error .* in generating", line):
            self.generation_errors.append(line.strip())


def parse_results(doc: dict, lmms_task: str) -> dict[str, float]:
    """{metric: value} of one task (or group) from lmms-eval's `*_results.json` (keys `<metric>,<filter>`;
    stderr entries and non-numbers such as "N/A" left out)."""
    if lmms_task not in doc.get("results", {}):
        raise LmmsEvalFailed(f"lmms-eval's results hold no {lmms_task!r} (tasks: {sorted(doc.get('results', {}))})")
    metrics = {}
    for key, value in doc["results"][lmms_task].items():
        metric, _, filt = key.partition(",")
        if not filt or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metrics[metric if filt == "none" else f"{metric},{filt}"] = float(value)
    return metrics


def find_results_json(output_dir: str) -> str | None:
    found = sorted(glob.glob(os.path.join(output_dir, "**", "*_results.json"), recursive=True), key=os.path.getmtime)
    return found[-1] if found else None


def model_size(model_dir: str) -> str | None:
    """ "7B" / "13B" for a Vicuna-7B / 13B language model (hidden size 4096 / 5120), else None."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            text = json.load(f).get("text_config", {})
    except (OSError, ValueError):
        return None
    return {4096: "7B", 5120: "13B"}.get(text.get("hidden_size"))


def run_benchmark(
    model_dir: str, task_key: str, work_dir: str, python: str | None = None, datasets_dir: str | None = None,
    device: str = "cuda", limit: float | None = None, force_simple: bool = True, log: Callable[[str], None] = print,
    env: dict | None = None,
) -> dict:  # fmt: skip
    """Run lmms-eval on one task of TASKS for the Hugging Face model folder `model_dir`, streaming its log
    lines to `log`; returns {task, lmms_task, metrics, headline, command, lmms_eval_version, ...}."""
    if task_key not in TASKS:
        raise BenchmarkError(f"unknown benchmark {task_key!r}; known: {', '.join(TASKS)}")
    task = TASKS[task_key]
    if task.unsupported:
        raise BenchmarkError(f"{task.title} cannot run: {task.unsupported}")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise BenchmarkError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    run_env = {**os.environ, **(env or {})}
    if task.needs_openai and not run_env.get("OPENAI_API_KEY"):
        raise BenchmarkError(
            f"{task.title}: {task.note}; set OPENAI_API_KEY (and OPENAI_API_URL for a compatible server)"
        )
    info = probe_lmms_eval(python)
    output_dir = os.path.join(work_dir, "output")
    shutil.rmtree(output_dir, ignore_errors=True)  # a results JSON found there must be this run's
    os.makedirs(work_dir, exist_ok=True)
    lmms_task, include_dir = task.lmms_task, None
    if datasets_dir:
        include_dir = os.path.join(work_dir, "tasks")
        lmms_task = write_overrides(TaskIndex(info.tasks_dir), task.lmms_task, include_dir, datasets_dir)
        run_env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = lmms_eval_command(
        info.python, os.path.abspath(model_dir), lmms_task, output_dir, device, include_dir, limit, force_simple
    )
    run_env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    log("running: " + " ".join(cmd))
    seen = RunLog()
    # cwd = work_dir: some tasks write files into the working directory (SEED-Bench's submission file).
    with subprocess.Popen(cmd, cwd=work_dir, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", bufsize=1) as proc:  # fmt: skip
        for raw in proc.stdout:
            line = _ANSI.sub("", raw.rstrip("\n")).split("\r")[-1]
            if line.strip():
                seen.add(line)
                log(line)
    results_path = find_results_json(output_dir)
    if proc.returncode != 0 or results_path is None:
        _raise_failure(task, lmms_task, proc.returncode, seen, datasets_dir)
    if seen.generation_errors:
        raise LmmsEvalFailed(
            f"lmms-eval's llava_hf failed to generate {len(seen.generation_errors)} time(s) on {task.key} (it scores "
            "a failed "
            f"generation as an empty answer, so the number would be wrong): {seen.generation_errors[0]}"
        )
    with open(results_path) as f:
        doc = json.load(f)
    metrics = parse_results(doc, lmms_task)
    if task.metric not in metrics:
        raise LmmsEvalFailed(f"lmms-eval reported no {task.metric!r} for {lmms_task} (metrics: {sorted(metrics)})")
    samples = doc.get("n-samples", {}).get(lmms_task, {})
    return {
        "task": task.key,
        "lmms_task": lmms_task,
        "lmms_eval_task": task.lmms_task,
        "title": task.title,
        "metrics": metrics,
        "headline_metric": task.metric,
        "headline": metrics[task.metric],
        "score": metrics[task.metric] * task.scale,
        "samples": samples.get("effective") if samples else None,
        "limit": limit,
        "command": cmd,
        "lmms_eval_version": info.version,
        "model_size": model_size(model_dir),
        "local_datasets": datasets_dir,
        "results_json": doc,
    }


def _raise_failure(task: BenchmarkTask, lmms_task: str, returncode: int, seen: RunLog, datasets_dir: str | None):
    # lmms-eval 0.7.3 logs "Error during evaluation: ..." and exits 0 when a run fails.
    reason = "; ".join(dict.fromkeys(seen.exceptions[-3:] + seen.evaluation_errors[-1:])) or "\n".join(seen.tail[-10:])
    if any(pattern in reason for pattern in _DATA_ERRORS):
        hint = (
            f"the local copy under {datasets_dir} does not load"
            if datasets_dir
            else "set `datasets_dir` to local copies of the tasks' Hugging Face dataset repos (README: Benchmarks)"
        )
        raise DatasetNotAvailable(f"lmms-eval could not load the data of {task.key} ({lmms_task}): {reason}; {hint}")
    raise LmmsEvalFailed(f"lmms-eval gave no results for {task.key} ({lmms_task}, exit code {returncode}): {reason}")


def comparison_rows(result: dict) -> list[list]:
    """Rows (benchmark, ours, paper SynthVLM, paper LLaVA-1.5) for our model beside the paper's numbers of
    SPEC §6; "not in SPEC" where the SPEC states none."""
    task = TASKS[result["task"]]
    ours = result["score"]
    if not task.paper:
        return [[task.title, ours, NOT_IN_SPEC, NOT_IN_SPEC]]
    return [
        [
            f"{task.title}, {p.size}" + (" (our size)" if p.size == result.get("model_size") else ""),
            ours,
            p.synthvlm,
            p.llava15,
        ]
        for p in task.paper
    ]
