"""Benchmarks (optional): lmms-eval's `llava_hf` on an exported model, one partition per benchmark, with
the paper's numbers (SPEC §6) beside ours. Run by `llava_benchmark_job`, never by automation."""

import hashlib
import os
import shlex
import shutil
import tempfile
import time

from dagster import (
    AssetExecutionContext,
    AssetSelection,
    ConfigurableResource,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
    asset,
    define_asset_job,
)
from pydantic import Field

from synthvlm_assets.defs.metadata import md_table
from synthvlm_assets.defs.partitions import GPU_TAGS
from synthvlm_assets.defs.resources import StorageResource
from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training import benchmark_eval as bench

ASSET = "llava_benchmark_eval"
BENCHMARK_JOB = "llava_benchmark_job"
EXPORTS = ("llava_stage2_export", "llava_stage1_export")  # assets whose _manifest.json names their current export
benchmark_tasks = StaticPartitionsDefinition(bench.RUNNABLE)


class BenchmarkEvalResource(ConfigurableResource):
    """Which model llava_benchmark_eval evaluates, on which data, with which lmms-eval."""

    model: str = Field(default="llava_stage2_export", description=(
        "llava_stage2_export or llava_stage1_export (that asset's current export), an export prefix under the storage "
        "root, or a local Hugging Face model folder."))  # fmt: skip
    datasets_dir: str | None = Field(
        default=None,
        description=(
            "Local copies of the benchmarks' Hugging Face dataset repos, each at <datasets_dir>/<repo id> (e.g. "
            "lmms-lab-encoder/ScienceQA); the run is then offline. Unset: lmms-eval loads them from the Hub."
        ),
    )
    lmms_eval_python: str | None = Field(
        default=None,
        description=(
            "Python of the environment with the `eval` extra (lmms-eval); default: .venv-eval beside this environment."
        ),
    )
    device: str = Field(default="auto", description='"cuda", "cuda:N" or "cpu"; "auto": cuda when available.')
    limit: float | None = Field(
        default=None,
        description="lmms-eval --limit: the first N documents (or a fraction): a smoke run, not the benchmark.",
    )
    force_simple: bool = Field(default=True, description=(
        "llava_hf's simple adapter: LLaVA-1.5's vicuna_v1 prompt, the one stage 2 trains on (the chat adapter needs a "
        "chat template in the processor)."))  # fmt: skip

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def fetch_model(root: StorageRoot, model: str) -> tuple[str, str, str]:
    """(local model folder, export name, where it came from) for the resource's `model`. An export on a
    local storage root is used in place; one on S3 is copied once per export version (its `_COMPLETE`
    manifest) into the local cache, so the partitions of one model do not each download it."""
    from synthvlm_assets.models.sources import default_cache_dir
    from synthvlm_assets.training.export import download_export
    from synthvlm_assets.training.loop import COMPLETE

    if model in EXPORTS:
        manifest = root.read_json(f"{model}/_manifest.json") if root.exists(f"{model}/_manifest.json") else None
        if manifest is None:
            raise bench.BenchmarkError(
                f"{root.uri(model)} has no export yet: materialize {model} first (or set benchmark_eval.model)"
            )
        prefix = manifest["prefix"]
    elif os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            raise bench.BenchmarkError(f"{model} is not a Hugging Face model folder (no config.json)")
        return model, f"local/{os.path.basename(os.path.abspath(model).rstrip('/'))}", os.path.abspath(model)
    else:
        prefix = model.strip("/")
    if not root.exists(f"{prefix}/{COMPLETE}"):
        raise bench.BenchmarkError(f"{root.uri(prefix)} is not a complete export (no {COMPLETE})")
    if root.is_local:
        return root.path(prefix), prefix, root.uri(prefix)
    marker = root.read_bytes(f"{prefix}/{COMPLETE}")
    local = os.path.join(os.path.dirname(default_cache_dir()), "exports", hashlib.sha1(marker).hexdigest()[:16])
    if not os.path.exists(os.path.join(local, COMPLETE)):
        partial = f"{local}.part-{os.getpid()}"
        download_export(root, prefix, partial)
        with open(os.path.join(partial, COMPLETE), "wb") as f:
            f.write(marker)
        shutil.rmtree(local, ignore_errors=True)
        os.replace(partial, local)
    return local, prefix, root.uri(prefix)


def _throttled(log, every_s: float = 30.0):
    """Every log line but progress bars, which pass at most once per `every_s` (lmms-eval draws one per document)."""
    last = [0.0]

    def emit(line: str) -> None:
        if "it/s]" in line or "s/it]" in line or "%|" in line:
            if time.monotonic() - last[0] < every_s:
                return
            last[0] = time.monotonic()
        log(line)

    return emit


@asset(
    deps=["llava_stage2_export"],
    partitions_def=benchmark_tasks,
    kinds={"pytorch"},
    group_name="evaluation",
    op_tags=GPU_TAGS,
)
def llava_benchmark_eval(
    context: AssetExecutionContext, storage: StorageResource, benchmark_eval: BenchmarkEvalResource
) -> MaterializeResult:
    """One benchmark (the partition) of the current stage-2 export (or the model `benchmark_eval.model`
    names) through lmms-eval's `llava_hf`, beside the paper's numbers where SPEC §6 states them. The parsed
    results go to `llava_benchmark_eval/<export name>/<task>.json`."""
    root = storage.root()
    task = bench.TASKS[context.partition_key]
    with tempfile.TemporaryDirectory(prefix="synthvlm-bench-") as tmp:
        model_dir, export_name, source = fetch_model(root, benchmark_eval.model)
        result = bench.run_benchmark(
            model_dir,
            task.key,
            os.path.join(tmp, "run"),
            python=benchmark_eval.lmms_eval_python,
            datasets_dir=benchmark_eval.datasets_dir,
            device=benchmark_eval.resolved_device(),
            limit=benchmark_eval.limit,
            force_simple=benchmark_eval.force_simple,
            log=_throttled(context.log.info),
        )
    key = f"{ASSET}/{export_name}/{task.key}.json"
    stored = {k: v for k, v in result.items() if k != "results_json"}
    root.write_json(
        key, {**stored, "model": source, "run_id": context.run.run_id, "lmms_eval_results": result["results_json"]}
    )
    headers = ["benchmark", "ours", "SynthVLM (paper)", "LLaVA-1.5 (paper)"]
    limited = f" (--limit {result['limit']:g}: not the whole benchmark)" if result["limit"] is not None else ""
    return MaterializeResult(
        metadata={
            "comparison": md_table(headers, bench.comparison_rows(result)),
            "score": MetadataValue.float(result["score"]),
            "metrics": md_table(["metric (lmms-eval)", "value"], sorted(result["metrics"].items())),
            "samples": MetadataValue.int(result["samples"])
            if result["samples"] is not None
            else MetadataValue.text("?"),
            "model": MetadataValue.path(source),
            "model_size": result["model_size"] or "not Vicuna 7B/13B (e.g. the tiny preset: meaningless)",
            "lmms_eval_version": result["lmms_eval_version"],
            "command": MetadataValue.md(f"```\n{shlex.join(result['command'])}\n```"),
            "datasets": f"local copies under {result['local_datasets']}"
            if result["local_datasets"]
            else "Hugging Face Hub (or its cache)",
            "results": MetadataValue.path(root.uri(key)),
            "note": (task.note or "-") + limited,
        }
    )


llava_benchmark_job = define_asset_job(
    BENCHMARK_JOB,
    selection=AssetSelection.assets(llava_benchmark_eval),
    description="Benchmarks of an exported LLaVA model with lmms-eval (llava_hf), one run per benchmark (partition).",
)
