"""What runs when: code versions derived from the settings that change each asset's output, data
versions from what each partition wrote, declarative automation conditions, the automation sensor (on
by default) and the nightly sensor (off by default)."""

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta, timezone

from dagster import (
    AssetKey,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DataVersion,
    DefaultSensorStatus,
    RunRequest,
    PartitionsDefinition,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    evaluate_automation_conditions,
    materialize,
    sensor,
)

# Private, no public equivalent in dagster 1.13: the subset a backfill targets (RunRequest.for_asset_graph_subset,
# itself marked private, takes one; it is how a sensor requests a backfill), and the tags the automation
# sensor puts on its runs and backfills.
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.storage.tags import AUTO_MATERIALIZE_TAG, AUTOMATION_CONDITION_TAG

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
            "clip": {k: v for k, v in asdict(scoring.clip_settings()).items() if k not in ("batch_size", "decode")},
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


# What "automation on" fills in (docs/architecture.md, "What automation fills in"):
#   1. a new shard nobody has touched runs end to end, in one request;
#   2. what exists is kept up to date: new data in an input or new settings rerun it;
#   3. a partition that was planned (requested by automation, or part of a run or backfill) and never
#      materialized, i.e. cancelled or failed, waits until one of its inputs gets new data;
#   4. nothing else is filled in: a partition a user left out stays missing until the user asks.
# Each trigger counts only while the partition is not planned: new data upstream while it is in a run or
# backfill is that run's business (it reads that data), and counting it would relaunch the partition as
# soon as the user cancelled that run.
_IN_PROGRESS = AutomationCondition.in_progress()
_INPUT_CHANGED = AutomationCondition.any_deps_match(AutomationCondition.data_version_changed()).with_label(
    "an input has new data"
)
_PLANNED = (
    (AutomationCondition.newly_requested() | _IN_PROGRESS)
    .since(AutomationCondition.newly_updated())
    .with_label("planned (requested, or in a run or backfill), not materialized since")
)
# Its run ended without materializing it since the previous tick (cancelled or failed): the input changes
# seen on this tick may be that run's own upstream steps, which are no reason to relaunch it.
_JUST_STOPPED = (_PLANNED & ~_IN_PROGRESS).newly_true().with_label("its run just ended without it")
_NEW_SHARD = (
    AutomationCondition.newly_missing() & AutomationCondition.all_deps_match(AutomationCondition.will_be_requested())
).with_label("new partition, its inputs requested on this tick (or it has none)")
_STALE = (~AutomationCondition.missing() & (_INPUT_CHANGED | AutomationCondition.code_version_changed())).with_label(
    "exists, and an input has new data or its settings changed"
)
_RETRY = (AutomationCondition.missing() & _PLANNED & _INPUT_CHANGED).with_label(
    "cancelled or failed, and an input has new data"
)


def _obeying(trigger: AutomationCondition, label: str, wait_for_missing_inputs: bool = True) -> AutomationCondition:
    """`trigger`, counted only while nothing plans the partition and remembered until the partition is requested
    or materialized; launched once nothing upstream is running (or missing, unless told otherwise)."""
    condition = (trigger & ~_IN_PROGRESS & ~_JUST_STOPPED).with_label(label).since_last_handled()
    if wait_for_missing_inputs:
        condition = condition & ~AutomationCondition.any_deps_missing()
    return condition & ~AutomationCondition.any_deps_in_progress() & ~_IN_PROGRESS


PER_SHARD = _obeying(_NEW_SHARD | _STALE | _RETRY, "new shard, stale, or retry on new input").with_label(
    "per shard: a new shard, new upstream data or new settings; nothing left out, cancelled or failed"
)

# The selection, the end of every shard's chain, follows the scored shards: it is built or refreshed when
# any of them has new data (whoever scored it), and rerun when its settings change. It waits until no shard
# upstream is in progress (a burst of new shards gives one refresh) and never runs on nothing. It reads only
# shards whose blocking checks passed (their manifests record the verdict).
SELECTION = _obeying(
    _INPUT_CHANGED | (~AutomationCondition.missing() & AutomationCondition.code_version_changed()),
    "new scored data, or new settings",
    wait_for_missing_inputs=False,  # most shards may never be scored
).with_label("selection: new scored data or new selection settings")

# The tags Dagster puts on the automation sensor's runs and backfills (a backfill's runs inherit its tags).
AUTOMATION_RUN_TAGS = {AUTO_MATERIALIZE_TAG: "true", AUTOMATION_CONDITION_TAG: "true"}

automation_sensor = AutomationConditionSensorDefinition(
    "synthvlm_automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Every 30 s: new shards run end to end, what exists is kept up to date; nothing a user left out, "
        "cancelled or saw fail is filled in until its inputs change (docs/architecture.md)."
    ),
)

NIGHTLY_HOUR_UTC = 2


def latest_nightly(now: datetime) -> datetime:
    """The latest NIGHTLY_HOUR_UTC:00 UTC at or before `now` (an aware datetime)."""
    today = now.astimezone(timezone.utc).replace(hour=NIGHTLY_HOUR_UTC, minute=0, second=0, microsecond=0)
    return today if today <= now else today - timedelta(days=1)


def incomplete_shards(instance, partitions_name: str, asset_keys: Sequence[AssetKey]) -> dict[AssetKey, list[str]]:
    """Per asset, the registered shards it has not materialized (assets that lack none are left out)."""
    shards = instance.get_dynamic_partitions(partitions_name)
    todo = {}
    for key in asset_keys:
        done = instance.get_materialized_partitions(key)
        if missing := [k for k in shards if k not in done]:
            todo[key] = missing
    return todo


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def nightly_sensor(
    partitions_def: PartitionsDefinition,
    asset_keys: Sequence[AssetKey],
    clock: Callable[[], datetime] = _utcnow,
) -> SensorDefinition:
    """At 02:00 UTC, one backfill of every per-shard asset over the shards it lacks, for users who keep
    automation off. A backfill follows each asset's backfill policy: caption_curation covers its shards in
    ranged runs (`shards_per_run` a run), the GPU stages run one shard a run after that shard's curation.
    A sensor, not a schedule: Dagster 1.13's scheduler launches plain runs only (it does not turn a request
    for an asset graph subset into a backfill; the sensor daemon does). `clock` is for tests."""
    keys = list(asset_keys)
    partitions_name = partitions_def.name

    @sensor(
        name="nightly_missing_shards",
        asset_selection=AssetSelection.assets(*keys),  # required of a sensor that requests backfills
        minimum_interval_seconds=300,
        default_status=DefaultSensorStatus.STOPPED,
        description=(
            f"Nightly at {NIGHTLY_HOUR_UTC:02d}:00 UTC (checked every 5 min): one backfill of every shard whose "
            "chain is not complete; curation in ranged runs, GPU stages one shard a run. For users who keep "
            "automation off."
        ),
    )
    def _nightly(context: SensorEvaluationContext):
        due = latest_nightly(clock())
        following = f"next at {due + timedelta(days=1):%Y-%m-%d %H:%M} UTC"
        # Like a schedule: each night once, and no catch-up of a night before the sensor was (re)started.
        started = context.last_sensor_start_time
        if started is not None and due.timestamp() < started:
            return SkipReason(f"started after {due:%Y-%m-%d %H:%M} UTC; {following}")
        if context.cursor and datetime.fromisoformat(context.cursor) >= due:
            return SkipReason(f"already ran for {due:%Y-%m-%d}; {following}")
        context.update_cursor(due.isoformat())
        todo = incomplete_shards(context.instance, partitions_name, keys)
        if not todo:
            return SkipReason(f"every shard is complete; {following}")
        subset = AssetGraphSubset(
            partitions_subsets_by_asset_key={
                key: partitions_def.empty_subset().with_partition_keys(shards) for key, shards in todo.items()
            }
        )
        return RunRequest.for_asset_graph_subset(subset, tags={"synthvlm/nightly": f"{due:%Y-%m-%d}"})

    return _nightly


class AutomationDriver:
    """Dagster's automation evaluation ticked by hand, as the automation sensor ticks it, with what each
    tick requests executed in process (one run per partition, tagged as the sensor's runs are). For tests and
    the incrementality benchmark: the decisions are Dagster's; only the run launcher is replaced."""

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
                    tags=AUTOMATION_RUN_TAGS,
                )
                if not run.success:
                    raise RuntimeError(f"automation run for {partition} {selected} failed")
                done.update(k.to_user_string() for k in selected)
                for m in run.asset_materializations_for_node("sdxl_images"):
                    for name in images:
                        images[name] += m.metadata[name].value
        raise RuntimeError(f"automation did not settle in {max_ticks} ticks")
