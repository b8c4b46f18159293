"""`synthvlm`: register caption files, materialize shards, query the tables.

synthvlm demo --input data/coco_captions_val2017_sample.json       # the main job, embedded default
synthvlm register s3://bucket/captions/part-0001.jsonl           # register a file by hand
synthvlm curate more_captions.jsonl                               # register, then curate (no GPU stage)
synthvlm materialize --missing                                    # every shard not yet curated
synthvlm sql "SELECT count(*) FROM curated_captions"              # DuckDB over the Parquet tables
synthvlm lineage coco_captions_val2017-32922018:37                # one caption's whole chain
synthvlm latest                                                   # where the current SynthVLM-100K is
synthvlm score path/to/folder --out scores.parquet                # CLIPScore + SSIM of NAME.jpg + NAME.txt pairs
(the demo ends with a stage-1 LLaVA checkpoint trained on its SynthVLM-style dataset: llava_training_job)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from synthvlm_assets.captions.stages import CURATED, RAW
from synthvlm_assets.defs.build import CURATION_JOB, DATASET_JOB, MAIN_JOB, TRAINING_JOB, Settings, build_definitions
from synthvlm_assets.defs.partitions import caption_shards
from synthvlm_assets.formats.dataset import ASSET as DATASET
from synthvlm_assets.recovery import recover_dead_runs

CAPTION_ASSETS = (RAW, CURATED)
# Assets published as versions switched in by their _manifest.json: `synthvlm latest` names the current one.
PUBLISHED = (DATASET, "llava_stage1_export", "llava_stage2_export")
_QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
RESUME_HINT = "what was staged or cached is kept: `synthvlm materialize --missing` goes on from there"


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C): no further run is started."""


def _stop_if_interrupted(result) -> None:
    """A step that an interrupt stopped fails with INTERRUPTED (defs/retries.py) and Dagster goes on with the
    run's other steps and returns; without this the next shard's run would start as if nothing happened."""
    from synthvlm_assets.defs.retries import INTERRUPTED

    for event in result.get_step_failure_events():
        user = event.step_failure_data.user_failure_data
        if user is not None and user.description == INTERRUPTED:
            raise Interrupted(f"interrupted in {event.step_key} (run {result.run_id[:8]})")


COCO_HINT = (
    "The COCO 2017 validation captions come with the annotations archive "
    "http://images.cocodataset.org/annotations/annotations_trainval2017.zip (captions_val2017.json)."
)


def _instance():
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        sys.exit("DAGSTER_HOME is not set: point it at a folder holding dagster.yaml (./run_demo.sh does this)")
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
    return DagsterInstance.get()


def register(uris: Sequence[str], settings: Settings, instance) -> list[str]:
    """Register caption files and add their shards as partitions; returns the new shard keys."""
    resources = settings.resources()
    registry = resources["storage"].registry()
    new_keys: list[str] = []
    for uri in uris:
        entry, shards = registry.register_file(uri, resources["caption_source"].shard_rows)
        state = f"{len(shards)} new shards" if shards else "already registered"
        print(f"{entry['uri']}: {entry['format']}, {entry['n_records']} records, {state}")
        new_keys += [s.key for s in shards]
    all_keys = [s.key for s in registry.shards()]
    existing = set(instance.get_dynamic_partitions(caption_shards.name))
    missing = [k for k in all_keys if k not in existing]
    if missing:
        instance.add_dynamic_partitions(caption_shards.name, missing)
    return new_keys


def _ranges(keys: Sequence[str], all_keys: Sequence[str], size: int) -> list[tuple[str, str]]:
    """`keys` as contiguous ranges of the partition order (Dagster runs cover ranges), each <= size."""
    wanted, ranges, current = set(keys), [], []
    for key in all_keys:
        if key in wanted and len(current) < size:
            current.append(key)
            continue
        if current:
            ranges.append((current[0], current[-1]))
        current = [key] if key in wanted else []
    if current:
        ranges.append((current[0], current[-1]))
    return ranges


def materialize(
    settings: Settings,
    instance,
    keys: Sequence[str] | None = None,
    missing_only: bool = False,
    image_shards: int | None = None,
) -> int:
    """Curate shards in runs over ranges of up to `shards_per_run` shards, then run the GPU part of the
    main job once per shard that gets images (`image_shards`: only the first that many; the rest are
    only curated), all recorded in the instance. Returns the number of failed runs."""
    from dagster import AssetKey
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    defs = build_definitions(settings)
    all_keys = instance.get_dynamic_partitions(caption_shards.name)
    keys = list(keys) if keys else [s.key for s in settings.resources()["storage"].registry().shards()]
    with_images = keys if image_shards is None else keys[:image_shards]
    to_curate, to_image = keys, with_images
    if missing_only:
        curated = instance.get_materialized_partitions(AssetKey("curated_captions"))
        scored = instance.get_materialized_partitions(AssetKey("image_scores"))
        to_curate = [k for k in keys if k not in curated]
        to_image = [k for k in with_images if k not in scored]
    failures = 0
    t0 = time.perf_counter()
    curation = defs.resolve_job_def(CURATION_JOB)
    ranges = _ranges(to_curate, all_keys, settings.shards_per_run)
    for first, last in ranges:
        tags = {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}
        result = curation.execute_in_process(instance=instance, tags=tags, raise_on_error=False, run_config=_QUIET)
        _stop_if_interrupted(result)
        failures += not result.success
        print(f"{first} .. {last}: {curation.name} {'ok' if result.success else 'FAILED'} (run {result.run_id[:8]})")
    curated = instance.get_materialized_partitions(AssetKey("curated_captions"))
    done = sum(k in curated for k in to_curate)
    print(
        f"curated {done}/{len(to_curate)} shards in {len(ranges)} run(s), {time.perf_counter() - t0:.1f}s", flush=True
    )
    main = defs.resolve_job_def(MAIN_JOB)
    gpu_part = [k for k in main.asset_layer.executable_asset_keys if k.to_user_string() not in CAPTION_ASSETS]
    for i, key in enumerate(to_image, 1):
        result = main.execute_in_process(
            partition_key=key, asset_selection=gpu_part, instance=instance, raise_on_error=False, run_config=_QUIET
        )
        _stop_if_interrupted(result)
        failures += not result.success
        print(
            f"[{i}/{len(to_image)}] {key}: {main.name} {'ok' if result.success else 'FAILED'} (run "
            f"{result.run_id[:8]})"
        )
    return failures


def run_job(settings: Settings, instance, job_name: str, label: str) -> int:
    """Run an unpartitioned job once (DATASET_JOB: synthvlm_100k over every scored shard; TRAINING_JOB: LLaVA
    stage 1, its export and the sanity evaluation). Returns 1 on failure."""
    job = build_definitions(settings).resolve_job_def(job_name)
    result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=_QUIET)
    _stop_if_interrupted(result)
    print(f"{label}: {'ok' if result.success else 'FAILED'} (run {result.run_id[:8]})")
    return 0 if result.success else 1


def summary(settings: Settings) -> str:
    from synthvlm_assets.query import connect

    con = connect(settings.resources()["storage"].root())
    (raw, malformed, kept, rejected) = (
        con.sql(f"SELECT count(*) FROM {v}").fetchall()[0][0]
        for v in ("raw_captions", "malformed_captions", "curated_captions", "rejected_captions")
    )
    reasons = con.sql("SELECT reject_reason, count(*) FROM rejected_captions GROUP BY 1 ORDER BY 2 DESC").fetchall()
    lines = [
        f"raw captions {raw} (+{malformed} malformed rows), curated {kept}, rejected {rejected}",
        *(f"  rejected by {r}: {n}" for r, n in reasons),
    ]
    return "\n".join(lines)


def ui_command(settings: Settings) -> str:
    """The `dagster dev` command line that serves the UI on this instance with these settings (the README's)."""
    import shlex

    env = {**({"SYNTHVLM_PRESET": settings.preset} if settings.preset else {}), **settings.environment()}
    env["DAGSTER_HOME"] = os.environ["DAGSTER_HOME"]
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    if not os.path.relpath(dagster).startswith(".."):
        dagster = os.path.relpath(dagster)
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), dagster, "dev"])


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"synthvlm: {exc or 'interrupted'}; {RESUME_HINT}", file=sys.stderr)
        return 130  # the shell's code for SIGINT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthvlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="register the input file(s) and materialize every shard (the main job)")
    p.add_argument("--input", nargs="+", required=True, help="caption files (local paths or s3:// URIs)")
    p.add_argument(
        "--image-shards", type=int, default=1, help="how many shards get SDXL images (the rest: curation only)"
    )
    p.add_argument(
        "--no-training", action="store_true", help="stop at SynthVLM-100K (skip the stage-1 LLaVA checkpoint)"
    )
    p = sub.add_parser("register", help="register caption files as shards")
    p.add_argument("uris", nargs="+")
    p = sub.add_parser("curate", help="register caption files and curate every shard not curated yet (no GPU stage)")
    p.add_argument("uris", nargs="*", help="caption files to register first (local paths or s3:// URIs)")
    p = sub.add_parser("materialize", help="run the main job for shards")
    p.add_argument("--shard", nargs="*", help="shard keys (default: all registered)")
    p.add_argument("--missing", action="store_true", help="only shards with an asset not materialized yet")
    p.add_argument("--image-shards", type=int, default=None, help="only the first N shards get images (default: all)")
    p = sub.add_parser("latest", help="print where the current version of a published asset is")
    p.add_argument("asset", nargs="?", default=DATASET, choices=PUBLISHED, help=f"default: {DATASET}")
    p = sub.add_parser(
        "score", help="CLIPScore, SSIM and score of a folder of NAME.jpg + NAME.txt pairs, or of a LLaVA JSON"
    )
    p.add_argument("path", help="a folder (local or s3://), or a LLaVA pretraining JSON file (images beside it)")
    p.add_argument("--out", default="scores.parquet", help="the Parquet file of scores (default: scores.parquet)")
    p = sub.add_parser("lineage", help="print one caption's whole chain, source file to SynthVLM-100K rank")
    p.add_argument("caption_id")
    p = sub.add_parser(
        "sql",
        help=(
            "query the tables with DuckDB (views: raw_captions, malformed_captions, curated_captions, "
            "rejected_captions, judged_captions, ...)"
        ),
    )
    p.add_argument("query", nargs="?", default=None)
    p = sub.add_parser(
        "judge-serve", help="serve the judge (transformers backend) as an OpenAI-compatible /v1/completions endpoint"
    )
    p.add_argument("--model", default=None, help="HF id, folder, s3:// prefix or tiny (default: SYNTHVLM_JUDGE_MODEL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    return parser


def _judge_serve(args: argparse.Namespace, settings: Settings) -> int:
    from synthvlm_assets.captions.judge.server import make_server
    from synthvlm_assets.captions.judge.stage import load_judge
    from synthvlm_assets.defs.resources import JudgeResource

    given = settings.resource_fields()["judge"]
    model = args.model or given.get("model") or JudgeResource().model
    judge = load_judge(
        JudgeResource(**{**given, "model": model, "backend": "transformers", "endpoint_url": None}).settings()
    )
    server = make_server(judge.backend, model, args.host, args.port)
    print(f"judge {model} (prompt version {judge.prompt.version}) on http://{args.host}:{args.port}/v1/completions")
    sys.stdout.flush()
    server.serve_forever()
    return 0


def _lineage(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from synthvlm_assets.query import lineage

    try:
        print(json.dumps(lineage(settings.resources()["storage"].root(), args.caption_id), indent=1, default=str))
    except KeyError as exc:
        sys.exit(str(exc.args[0]))
    return 0


def _sql(args: argparse.Namespace, settings: Settings) -> int:
    from synthvlm_assets.query import connect

    con = connect(settings.resources()["storage"].root())
    if args.query is None:
        print(summary(settings))
    else:
        con.sql(args.query).show(max_rows=50, max_width=200)
    return 0


def latest(settings: Settings, asset: str = DATASET) -> str:
    """The URI of the current version of a published asset: what its `_manifest.json` (the switch) names."""
    root = settings.resources()["storage"].root()
    manifest = root.manifest(asset)
    if not manifest or "prefix" not in manifest:
        raise LookupError(f"{asset}: nothing published yet under {root.uri(asset)}")
    return root.uri(manifest["prefix"])


def _latest(args: argparse.Namespace, settings: Settings) -> int:
    try:
        print(latest(settings, args.asset))
    except LookupError as exc:
        sys.exit(str(exc))
    return 0


def _score(args: argparse.Namespace, settings: Settings) -> int:
    """Score a user's images with the scoring and selection settings; 1 when any row is left unscored."""
    import posixpath

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from synthvlm_assets.scoring.clip_score import ClipScorer
    from synthvlm_assets.scoring.folder import score_folder
    from synthvlm_assets.storage import StorageRoot

    resources = settings.resources()
    scoring, endpoint = resources["scoring"], resources["storage"].s3_endpoint_url
    path = args.path.rstrip("/")
    folder, name = posixpath.split(path) if path.lower().endswith(".json") else (path, None)
    scorer = ClipScorer.load(scoring.clip_settings(), scoring.cache_dir, endpoint)
    table = score_folder(StorageRoot(folder or ".", endpoint), scorer, scoring.ssim_settings(),
                         resources["selection"].lam, name)  # fmt: skip
    pq.write_table(table, args.out)
    scored = table.filter(pc.is_null(table.column("error")))
    means = ", ".join(f"{c} {pc.mean(scored.column(c)).as_py():.4f}" for c in ("clip_score", "ssim", "score"))
    print(
        f"{scored.num_rows} of {table.num_rows} scored"
        + (f" (mean {means})" if scored.num_rows else "")
        + f": {args.out}"
    )
    for row in table.filter(pc.is_valid(table.column("error"))).slice(0, 10).to_pylist():
        print(f"  not scored: {row['image']}: {row['error']}")
    return 0 if scored.num_rows == table.num_rows else 1


def _pipeline(args: argparse.Namespace, settings: Settings) -> int:
    """demo, register, curate and materialize: the commands that run Dagster jobs on the instance."""
    if args.command == "demo" and settings.preset is None:
        print(
            "demo: SYNTHVLM_PRESET is not set, so every model not set by its own variable is the tiny preset (random "
            "weights: images, verdicts, scores and checkpoint are meaningless)"
        )
        settings.preset = "tiny"
    instance = _instance()
    recover_dead_runs(instance)  # no daemon in the embedded default: runs left by a killed synthvlm, freed
    if args.command == "materialize":
        return 1 if materialize(settings, instance, args.shard, args.missing, args.image_shards) else 0
    uris = args.input if args.command == "demo" else args.uris
    for uri in uris:
        if "://" not in uri and not os.path.exists(uri):
            sys.exit(f"caption file not found: {uri}. {COCO_HINT}")
    register(uris, settings, instance)
    if args.command == "register":
        return 0
    image_shards = args.image_shards if args.command == "demo" else 0
    failures = materialize(settings, instance, missing_only=True, image_shards=image_shards)
    if image_shards and not failures:
        failures += run_job(settings, instance, DATASET_JOB, DATASET)
        if not failures:
            print(f"{DATASET}: {latest(settings)}")
    if image_shards and not failures and not args.no_training:
        failures += run_job(settings, instance, TRAINING_JOB, "llava_stage1_checkpoint")
    print(summary(settings))
    print(f"tables: {settings.resources()['storage'].root().uri()}")
    print(f"UI, with the settings of this run: {ui_command(settings)}")
    return 1 if failures else 0


COMMANDS = {"judge-serve": _judge_serve, "lineage": _lineage, "sql": _sql, "latest": _latest, "score": _score}


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    return COMMANDS.get(args.command, _pipeline)(args, Settings.from_env())


if __name__ == "__main__":
    raise SystemExit(main())
