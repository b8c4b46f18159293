"""The process a training run executes (`python -m synthvlm_assets.training.launch CONFIG.json`, under
torchrun for several processes). When Dagster launched it through Pipes, rank 0 streams every step's
loss, samples/s and GPU memory to the run's log and reports the materialization; without Pipes it
prints the same rows as JSON lines. (`dagster_pipes` is the small standalone protocol package, not
Dagster itself.)"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import asdict

from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.model import ModelSettings
from synthvlm_assets.training.stage1 import Stage1Settings, train_stage1
from synthvlm_assets.training.stage2 import Stage2Settings, train_stage2


def config_json(
    storage_root: str, s3_endpoint_url: str | None, model: ModelSettings, settings: Stage1Settings | Stage2Settings,
    cache_dir: str | None, stage1_run_prefix: str | None = None,
) -> str:  # fmt: skip
    """The launch's configuration: stage 1, or stage 2 (which starts from a stage-1 run)."""
    stage = "stage2" if isinstance(settings, Stage2Settings) else "stage1"
    return json.dumps(
        {
            "storage_root": storage_root,
            "s3_endpoint_url": s3_endpoint_url,
            "model": asdict(model),
            stage: asdict(settings),
            "stage1_run_prefix": stage1_run_prefix,
            "cache_dir": cache_dir,
        }
    )


# The last line of a Python traceback: "[package.]SomeError: message" (or a bare "SomeError").
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\b(?::.*)?$")
# torchrun's summary that one of its processes failed: the process's own exception, above it, says why.
_LAUNCHER_ERRORS = ("ChildFailedError",)


def error_line(exc: BaseException) -> str:
    """An exception as the one line a person reads first: `ModelWeightsError: could not load ...`."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:1000] if first else type(exc).__name__


def failure_cause(stderr_lines: Iterable[str]) -> str | None:
    """The last exception line in a failed process's stderr (not the launcher's own summary), or None."""
    found = [line.strip() for line in stderr_lines if _EXCEPTION_LINE.match(line.strip())]
    own = [line for line in found if not line.split(":", 1)[0].endswith(_LAUNCHER_ERRORS)]
    return (own or found or [None])[-1]


def _pipes():
    """The Pipes context on rank 0 of a Pipes launch, else None."""
    if os.environ.get("RANK", "0") != "0" or "DAGSTER_PIPES_CONTEXT" not in os.environ:
        return None
    from dagster_pipes import open_dagster_pipes

    return open_dagster_pipes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "config",
        nargs="?",
        help="JSON file written by the asset (storage root, model and stage-1 or stage-2 settings)",
    )
    parser.add_argument(
        "--config-json",
        help="the same configuration inline (a Kubernetes pod of its own cannot read the asset's file)",
    )
    args = parser.parse_args(argv)
    if (args.config is None) == (args.config_json is None):
        parser.error("give the configuration as a file or as --config-json, one of the two")
    if args.config_json is not None:
        cfg = json.loads(args.config_json)
    else:
        with open(args.config) as f:
            cfg = json.load(f)
    storage = StorageRoot(cfg["storage_root"], cfg.get("s3_endpoint_url"))
    model = ModelSettings(**cfg["model"])
    # Closing the Pipes context on an exception reports it (its traceback reaches the run's event log).
    with _pipes() or contextlib.nullcontext() as pipes:
        try:

            def report(row: dict) -> None:
                line = (
                    f"step {row['step']}/{row['total_steps']} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                    f"samples/s {row['samples_per_second']:.1f} gpu_mem {row['gpu_memory_gib']:.1f} GiB"
                )
                if pipes is not None:
                    pipes.log.info(line)
                else:
                    print(json.dumps(row), flush=True)

            if "stage2" in cfg:
                r = train_stage2(
                    storage,
                    model,
                    cfg["stage1_run_prefix"],
                    Stage2Settings(**cfg["stage2"]),
                    report,
                    cfg.get("cache_dir"),
                )
            else:
                r = train_stage1(
                    storage, model, Stage1Settings(**cfg["stage1"]), report=report, cache_dir=cfg.get("cache_dir")
                )
            loop = r.loop
            if pipes is not None:
                pipes.report_asset_materialization(
                    metadata={
                        "run_prefix": {"raw_value": storage.uri(r.run_prefix), "type": "path"},
                        "steps": {"raw_value": loop.steps, "type": "int"},
                        "samples": {"raw_value": loop.samples, "type": "int"},
                        "resumed_from_step": {"raw_value": loop.resumed_from_step, "type": "int"},
                        "final_loss": {"raw_value": loop.losses[-1] if loop.losses else float("nan"), "type": "float"},
                        "samples_per_second": {"raw_value": loop.samples_per_second, "type": "float"},
                        "peak_gpu_memory_gib": {"raw_value": loop.peak_memory_gib, "type": "float"},
                        "processes": {"raw_value": r.summary["processes"], "type": "int"},
                        "device": {"raw_value": r.summary["device"], "type": "text"},
                    },
                    data_version=r.run_prefix.rsplit("/", 1)[-1],
                )
        except Exception as exc:
            if pipes is not None:  # the step fails with this line as its cause (defs/training.py)
                pipes.report_custom_message({"error": error_line(exc)})
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
