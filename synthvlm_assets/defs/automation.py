"""What runs when: code versions derived from the settings that change each asset's output, data
versions from what each partition wrote, declarative automation conditions, the automation sensor (on
by default) and a nightly schedule (off by default)."""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict

from collections import Counter

from dagster import (
    AssetKey,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DataVersion,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    evaluate_automation_conditions,
    materialize,
    schedule,
)

from synthvlm_assets.storage import StorageRoot

# Bump an asset's revision when its code changes what it writes; the rest of its code version is a
# hash of the settings that change its output (execution-only settings are left out).
CODE_REVISIONS = {
    "raw_caption_pool": "1",
    "curated_captions": "1",
    "pair_filtered_captions": "1",
    "judged_captions": "1",
    "sdxl_images": "1",
    "image_scores": "1",
    "synthvlm_100k": "1",
}
_JUDGE_OUTPUT = ("model", "revision", "tokenizer", "max_caption_tokens", "forced_choice", "quantization")
_PAIR_EXECUTION = ("batch_size",)


def _digest(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def code_versions(resources: Mapping) -> dict[str, str]:
    """Each asset's code version: its code revision + a hash of the settings that change its output.
    lambda and K change only the selection: image_scores' `score` column records the lambda it used,
    and the selection recomputes the score with its own."""
    source = resources["caption_source"].fields()
    curation = resources["curation"]
    judge = asdict(resources["judge"].settings())
    pair = asdict(resources["pair_filters"].settings())
    scoring = resources["scoring"]
    docs = {
        "raw_caption_pool": asdict(source),
        "curated_captions": {
            "rules": asdict(curation.settings()),
            "perplexity": curation.model_dump(exclude={"workers"}),
        },
        "pair_filtered_captions": {k: v for k, v in pair.items() if k not in _PAIR_EXECUTION}
        if pair["enabled"]
        else {"enabled": False},
        "judged_captions": {k: judge[k] for k in _JUDGE_OUTPUT},
        "sdxl_images": resources["synthesis"].settings().image_settings(),
        "image_scores": {
            "clip": {k: v for k, v in asdict(scoring.clip_settings()).items() if k != "batch_size"},
            "ssim": asdict(scoring.ssim_settings()),
        },
        "synthvlm_100k": asdict(resources["selection"].settings()),
    }
    return {name: f"{CODE_REVISIONS[name]}.{_digest(doc)}" for name, doc in docs.items()}


def partition_data_version(root: StorageRoot, prefix: str) -> DataVersion:
    """A hash of the bytes a partition published (its files' sha256 from the manifest, not its run id
    or timestamp): a rerun that writes the same data keeps the same data version."""
    return manifest_data_version(root.manifest(prefix) or {})


def manifest_data_version(manifest: Mapping) -> DataVersion:
    """`partition_data_version` from a manifest at hand."""
    files = {name: f["sha256"] for name, f in manifest.get("files", {}).items()}
    if "tar" in manifest:
        files["tar"] = manifest["tar"]["sha256"]
    return DataVersion(_digest(files))


# New data upstream (a data version that changed, not just a rerun), a new partition, or a settings
# change: run, once nothing upstream is missing or running. A parent run that also covered this asset
# does not count (that run already updated it).
_NEW_UPSTREAM_DATA = AutomationCondition.any_deps_match(
    AutomationCondition.data_version_changed() & ~AutomationCondition.executed_with_root_target()
).with_label("any_deps_new_data")

PER_SHARD = (
    (
        AutomationCondition.newly_missing() | _NEW_UPSTREAM_DATA | AutomationCondition.code_version_changed()
    ).since_last_handled()
    & ~AutomationCondition.any_deps_missing()
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
).with_label("per-shard: missing, new upstream data or new settings")

# The selection waits until no shard upstream is in progress (a burst of new shards gives one refresh),
# and never runs on nothing: only new scored data or new selection settings trigger it. It reads only
# shards whose blocking checks passed (their manifests record the verdict).
SELECTION = (
    (_NEW_UPSTREAM_DATA | AutomationCondition.code_version_changed()).since_last_handled()
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
).with_label("selection: new scored data or new selection settings")

automation_sensor = AutomationConditionSensorDefinition(
    "synthvlm_automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates every asset's automation condition (per-shard chain, selection) every 30 s.",
)


def nightly_schedule(job_name: str, partitions_name: str, last_asset: str):
    @schedule(
        name="nightly_missing_shards",
        cron_schedule="0 2 * * *",
        job_name=job_name,
        default_status=DefaultScheduleStatus.STOPPED,
        description=(
            "Nightly: one run of the main job per shard whose chain is not complete (for users who keep "
            "automation off)."
        ),
    )
    def _nightly(context: ScheduleEvaluationContext):
        done = context.instance.get_materialized_partitions(AssetKey(last_asset))
        todo = [k for k in context.instance.get_dynamic_partitions(partitions_name) if k not in done]
        if not todo:
            return SkipReason("every shard is complete")
        return [RunRequest(partition_key=k, run_key=f"{k}-{context.scheduled_execution_time:%Y%m%d}") for k in todo]

    return _nightly


class AutomationDriver:
    """Dagster's automation evaluation ticked by hand, as the automation sensor ticks it, with what each
    tick requests executed in process (one run per partition). For tests and the incrementality
    benchmark: the decisions are Dagster's; only the run launcher is replaced."""

    def __init__(self, instance) -> None:
        self.instance, self.cursor = instance, None

    def run_until_quiet(self, defs, max_ticks: int = 15) -> tuple[Counter, dict]:
        """Materializations per asset, and the sdxl_images totals (generated, reused, generation seconds)."""
        done: Counter = Counter()
        images = {"generated": 0, "reused": 0, "generation_seconds": 0.0}
        keys = [spec.key for a in defs.assets for spec in a.specs]
        for _ in range(max_ticks):
            result = evaluate_automation_conditions(defs=defs, instance=self.instance, cursor=self.cursor)
            self.cursor = result.cursor
            if result.total_requested == 0:
                return done, images
            by_partition: dict[str | None, list[AssetKey]] = {}
            for key in keys:
                for partition in result.get_requested_partitions(key):
                    by_partition.setdefault(partition, []).append(key)
            for partition, selected in by_partition.items():
                run = materialize(
                    list(defs.assets),
                    selection=selected,
                    partition_key=partition,
                    instance=self.instance,
                    resources=defs.resources,
                )
                if not run.success:
                    raise RuntimeError(f"automation run for {partition} {selected} failed")
                done.update(k.to_user_string() for k in selected)
                for m in run.asset_materializations_for_node("sdxl_images"):
                    for name in images:
                        images[name] += m.metadata[name].value
        raise RuntimeError(f"automation did not settle in {max_ticks} ticks")
