"""How much incremental regeneration saves: a caption pool growing in 5 steps (one new file each),
driven by Dagster's automation evaluation on the tiny preset, against a full recompute of the whole
pool at each step (a fresh storage root and instance), side by side.

    .venv/bin/python benchmarks/incremental_benchmark.py [--steps 5] [--captions-per-step 40]

Prints per step: captions in the pool, materializations, images generated, SDXL seconds (the GPU part,
here the tiny model on the CPU), wall seconds, for both paths, and the saving.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from dagster import instance_for_test

from synthvlm_assets.cli import register
from synthvlm_assets.defs.automation import AutomationDriver
from synthvlm_assets.defs.build import Settings, build_definitions

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_captions_val2017.json"


def settings_for(root: Path, shard_rows: int) -> Settings:
    return Settings(
        storage_root=str(root),
        shard_rows=shard_rows,
        judge={"model": "tiny"},
        synthesis={"model": "tiny", "steps": 4},
        scoring={"clip_model": "tiny", "batch_size": 32, "workers": 0},
        selection={"fraction": 0.5},
    )


def run(settings: Settings, files: list[Path], instance, driver: AutomationDriver) -> dict:
    t = time.perf_counter()
    register([str(f) for f in files], settings, instance)
    done, images = driver.run_until_quiet(build_definitions(settings))
    return {"materializations": sum(done.values()), **images, "wall_s": time.perf_counter() - t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--captions-per-step", type=int, default=40)
    args = p.parse_args()
    for name in ("dagster", "dagster.automation_condition_tester"):
        logging.getLogger(name).setLevel(logging.WARNING)
    anns = json.loads(COCO.read_text())["annotations"]
    work = Path(tempfile.mkdtemp(prefix="synthvlm-incremental-"))
    files = []
    for i in range(args.steps):
        f = work / f"pool-{i}.jsonl"
        chunk = anns[i * args.captions_per_step : (i + 1) * args.captions_per_step]
        f.write_text("".join(json.dumps({"id": a["id"], "caption": a["caption"]}) + "\n" for a in chunk))
        files.append(f)

    rows = []
    with instance_for_test() as instance:
        driver = AutomationDriver(instance)
        settings = settings_for(work / "incremental", args.captions_per_step)
        driver.run_until_quiet(build_definitions(settings))  # the sensors are on before the first file
        for step in range(1, args.steps + 1):
            inc = run(settings, files[step - 1 : step], instance, driver)
            with instance_for_test() as fresh:
                full_driver = AutomationDriver(fresh)
                full_settings = settings_for(work / f"full-{step}", args.captions_per_step)
                full_driver.run_until_quiet(build_definitions(full_settings))
                full = run(full_settings, files[:step], fresh, full_driver)
            rows.append((step, step * args.captions_per_step, inc, full))
            print(
                f"step {step}: incremental {inc['generated']} images in {inc['wall_s']:.1f}s, full "
                f"{full['generated']} in {full['wall_s']:.1f}s",
                flush=True,
            )

    print(
        "\n| step | captions in pool | materializations (incr / full) | images generated (incr / full) | SDXL "
        "generation s (incr / full) | wall s (incr / full) |"
    )
    print("|---|---|---|---|---|---|")
    totals = {"inc": [0, 0.0, 0.0], "full": [0, 0.0, 0.0]}
    for step, n, inc, full in rows:
        print(
            f"| {step} | {n} | {inc['materializations']} / {full['materializations']} | {inc['generated']} / "
            f"{full['generated']} | "
            f"{inc['generation_seconds']:.1f} / {full['generation_seconds']:.1f} | {inc['wall_s']:.1f} / "
            f"{full['wall_s']:.1f} |"
        )
        for k, r in (("inc", inc), ("full", full)):
            totals[k][0] += r["generated"]
            totals[k][1] += r["generation_seconds"]
            totals[k][2] += r["wall_s"]
    (gi, si, wi), (gf, sf, wf) = totals["inc"], totals["full"]
    print(
        f"\nover {args.steps} steps: images {gi} vs {gf} ({1 - gi / gf:.0%} saved), SDXL seconds {si:.1f} vs "
        f"{sf:.1f}, wall {wi:.1f} vs {wf:.1f} s"
    )


if __name__ == "__main__":
    main()
