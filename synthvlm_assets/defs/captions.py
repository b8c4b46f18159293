"""SPEC §1 as assets: raw_caption_pool -> curated_captions, one partition per caption shard.

Both stages are one op over a range of shards (a backfill policy): curation costs milliseconds per
shard, so a run covers up to `shards_per_run` shards and pays Dagster's start-up once. Each shard
still gets its own materializations, metadata, data version and check results, and fails alone: the
run materializes every other shard of its range, then fails naming the shards that did not make it
(a retry or the next automation tick redoes only those).
"""

import warnings
from collections.abc import Iterator
from functools import partial
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetsDefinition,
    AssetSpec,
    AssetRecordsFilter,
    BackfillPolicy,
    DagsterEventType,
    DagsterInstance,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    PreviewWarning,
    multi_asset,
)

# What Dagster derives from a step's output and check results, written here for each shard of a range
# (Dagster can only derive one data version for all of them): the materialization's tags and the
# checks' target materialization.
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    NULL_EVENT_POINTER,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)

from synthvlm_assets.captions.filters import FILTER_NAMES, RuleFilterSettings
from synthvlm_assets.captions.stages import CURATED, RAW, CuratedSummary, RawSummary, ShardOutcome, curate_range
from synthvlm_assets.defs.automation import manifest_data_version
from synthvlm_assets.defs.metadata import table
from synthvlm_assets.defs.partitions import caption_shards
from synthvlm_assets.defs.resources import CaptionSourceResource, CurationResource, StorageResource
from synthvlm_assets.defs.retries import SHARD_RETRY_POLICY, retry_only_transient
from synthvlm_assets.storage import StorageRoot

RAW_KEY, CURATED_KEY = AssetKey(RAW), AssetKey(CURATED)

# Partitioned checks (a preview feature of Dagster 1.13, pinned): a shard's check results belong to it,
# so a run over many shards records them per shard, and the UI shows them per partition.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", PreviewWarning)
    # One check per asset and shard, its conditions in its metadata: in the embedded event log each check
    # result costs ~4 KB a shard (its event, its row, the row's growth from planned to evaluated).
    CHECK_SPECS = [
        AssetCheckSpec("rows_accounted_for", asset=RAW, blocking=True, partitions_def=caption_shards,
                       description="Every row of the shard is a caption or a malformed row with its reason, "
                       "once: rows = captions + malformed, unique caption ids, 1 <= rows <= the shard size "
                       "its file was registered with."),
        AssetCheckSpec("rows_accounted_for", asset=CURATED, blocking=True, partitions_def=caption_shards,
                       description="Every raw caption is kept or rejected with its reason, once: raw captions "
                       "= kept + rejected, unique caption ids."),
    ]  # fmt: skip


def caption_curation_asset(shards_per_run: int) -> AssetsDefinition:
    """The op that materializes raw_caption_pool and curated_captions for a range of shards."""

    @multi_asset(
        name="caption_curation",
        specs=[
            AssetSpec(
                RAW,
                description="One shard of a registered caption file, loaded in one schema; malformed rows kept "
                "with their reason.",
                kinds={"parquet"},
                group_name="captions",
                skippable=True,
            ),
            AssetSpec(
                CURATED,
                deps=[RAW],
                description="Normalised captions that pass the paper's Table-1 rule filters, without exact "
                "duplicates (the first occurrence in registration order wins, across shards). Rejects keep "
                "their reason.",
                kinds={"parquet"},
                group_name="captions",
                skippable=True,
            ),
        ],
        check_specs=CHECK_SPECS,
        partitions_def=caption_shards,
        can_subset=True,
        backfill_policy=BackfillPolicy.multi_run(shards_per_run),
        retry_policy=SHARD_RETRY_POLICY,
    )
    @retry_only_transient
    def caption_curation(
        context: AssetExecutionContext,
        storage: StorageResource,
        caption_source: CaptionSourceResource,
        curation: CurationResource,
    ) -> Iterator[Any]:
        selected = context.selected_asset_keys
        keys = _still_to_do(context, selected) if context.retry_number else list(context.partition_keys)
        emit = _emit_result if len(context.partition_keys) == 1 else partial(_emit_events, context.instance)
        versions = context.assets_def.code_versions_by_key
        root, settings = storage.root(), curation.settings()
        failed: list[ShardOutcome] = []
        outcomes = curate_range(
            storage.registry(),
            keys,
            caption_source.fields(),
            settings,
            load_raw=RAW_KEY in selected,
            curate=CURATED_KEY in selected,
            run_id=context.run.run_id,
            workers=curation.workers,
        )
        for done, outcome in enumerate(outcomes, 1):
            raw_version = manifest_data_version(outcome.raw.manifest) if outcome.raw else None
            if outcome.raw:
                yield from emit(outcome.shard.key, RAW_KEY, *_raw(outcome, root), versions[RAW_KEY], None)
            if outcome.curated:
                parent = raw_version or _published_version(root, RAW, outcome.shard.key)
                yield from emit(
                    outcome.shard.key, CURATED_KEY, *_curated(outcome, root, settings), versions[CURATED_KEY], parent
                )
            if outcome.error:
                context.log.error(outcome.error)
                failed.append(outcome)
            if done % 100 == 0 or done == len(keys):
                context.log.info(f"caption_curation: {done}/{len(keys)} shards done, {len(failed)} failed")
        if failed:
            raise Failure(
                description=f"{len(failed)} of {len(keys)} shards failed (the others are materialized); "
                f"the first: {failed[0].error}",
                metadata={"failed_shards": MetadataValue.json({o.shard.key: o.error for o in failed})},
                # Only a transient cause (storage) is worth a retry; bad input fails the same way again.
                allow_retries=any(o.retryable for o in failed),
            )

    return caption_curation


def _still_to_do(context: AssetExecutionContext, selected: set[AssetKey]) -> list[str]:
    """On a retry: the shards of the range that the earlier attempts did not materialize."""
    done: dict[str, set[AssetKey]] = {}
    for entry in context.instance.all_logs(context.run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
        mat = entry.asset_materialization
        if mat is not None and mat.partition is not None:
            done.setdefault(mat.partition, set()).add(mat.asset_key)
    return [k for k in context.partition_keys if not selected <= done.get(k, set())]


def _published_version(root: StorageRoot, asset: str, key: str) -> DataVersion | None:
    manifest = root.manifest(f"{asset}/{key}")
    return manifest_data_version(manifest) if manifest else None


Checks = list[tuple[str, bool, AssetCheckSeverity, dict[str, Any]]]


def _emit_result(key, asset_key, metadata, data_version, checks: Checks, code_version, parent) -> Iterator[Any]:
    """A single shard: Dagster derives the materialization from the result (the usual path)."""
    yield MaterializeResult(
        asset_key=asset_key,
        metadata=metadata,
        data_version=data_version,
        check_results=[
            AssetCheckResult(asset_key=asset_key, check_name=n, passed=p, severity=s, metadata=m)
            for n, p, s, m in checks
        ],
    )


def _emit_events(
    instance: DagsterInstance, key, asset_key, metadata, data_version, checks: Checks, code_version, parent
) -> Iterator[Any]:
    """A shard of a range: its own materialization (with its own data version) and check results, which
    name that materialization as their target, as Dagster does for a check result (else the UI's check
    partitions read "Missing" for the shards of a range)."""
    tags = {CODE_VERSION_TAG: code_version or "", DATA_VERSION_TAG: data_version.value,
            DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}  # fmt: skip
    if asset_key == CURATED_KEY:
        tags[get_input_data_version_tag(RAW_KEY)] = parent.value if parent else "INITIAL"
        tags[get_input_event_pointer_tag(RAW_KEY)] = NULL_EVENT_POINTER
    yield AssetMaterialization(asset_key=asset_key, partition=key, metadata=metadata, tags=tags)
    # Stored by the time the step resumes here.
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key, asset_partitions=[key]), limit=1).records
    target = (
        AssetCheckEvaluationTargetMaterializationData(
            storage_id=records[0].storage_id, run_id=records[0].run_id, timestamp=records[0].timestamp
        )
        if records
        else None
    )
    blocking = {spec.name for spec in CHECK_SPECS if spec.asset_key == asset_key and spec.blocking}
    for name, passed, severity, meta in checks:
        yield AssetCheckEvaluation(
            asset_key=asset_key, check_name=name, passed=passed, metadata=meta, severity=severity,
            blocking=name in blocking, partition=key, target_materialization_data=target,
        )  # fmt: skip


def _raw(outcome: ShardOutcome, root: StorageRoot) -> tuple[dict[str, Any], DataVersion, Checks]:
    r: RawSummary = outcome.raw  # type: ignore[assignment]
    shard = outcome.shard
    metadata: dict[str, Any] = {
        "source_file": MetadataValue.path(shard.uri),
        "rows": r.rows,
        "captions": r.captions,
        "malformed": r.malformed,
        "caption_chars_p5_p50_p95": " / ".join(f"{v:g}" for v in r.caption_length.values()) or "-",
        "parquet": MetadataValue.path(root.uri(r.prefix)),
    }
    if r.malformed:  # an empty table costs the event log as much as a full one
        metadata["malformed_by_reason"] = table(["reason", "rows"], list(r.malformed_by_reason.items()))
        metadata["malformed_sample"] = table(["row", "reason", "detail"], r.malformed_sample)
    accounted = r.captions + r.malformed == r.rows and r.unique_ids and 1 <= r.rows <= shard.shard_rows
    checks: Checks = [
        ("rows_accounted_for", accounted, AssetCheckSeverity.ERROR,
         {"rows": r.rows, "captions": r.captions, "malformed": r.malformed, "unique_ids": r.unique_ids,
          "shard_rows": shard.shard_rows}),
    ]  # fmt: skip
    return metadata, manifest_data_version(r.manifest), checks


def _curated(
    outcome: ShardOutcome, root: StorageRoot, settings: RuleFilterSettings
) -> tuple[dict[str, Any], DataVersion, Checks]:
    c: CuratedSummary = outcome.curated  # type: ignore[assignment]
    bounds = settings.bounds()
    per_filter = [
        [
            name,
            _bound_text(bounds.get(name)),
            c.rejected_by.get(name, 0),
            c.fails_alone[name] if name in bounds else "skipped",
            " / ".join(f"{v:.4g}" for v in c.quantiles.get(name, {}).values()) or "-",
        ]
        for name in FILTER_NAMES
    ] + [["duplicate", "first occurrence", c.rejected_by.get("duplicate", 0), c.rejected_by.get("duplicate", 0), "-"]]
    metadata = {
        "captions_in": c.captions_in,
        "kept": c.kept,
        "rejected": c.rejected,
        "kept_fraction": round(c.kept / c.captions_in, 4) if c.captions_in else 0.0,
        **{f"rejected_by_{reason}": n for reason, n in sorted(c.rejected_by.items())},
        "earlier_shards": c.earlier_shards,
        "earlier_distinct_captions": c.earlier_distinct,
        # Few columns: each costs ~250 bytes of schema per shard in the event log.
        "filters": table(["filter", "keep", "rejected", "fails alone", "p5 / p50 / p95"], per_filter),
        "samples": table(
            ["verdict", "caption_id", "caption"],
            [["kept", i, text] for i, text in c.kept_sample] + [[why, i, text] for i, why, text in c.rejected_sample],
        ),
        "parquet": MetadataValue.path(root.uri(c.prefix)),
    }
    accounted = c.kept + c.rejected == c.captions_in and c.unique_ids
    checks: Checks = [
        ("rows_accounted_for", accounted, AssetCheckSeverity.ERROR,
         {"in": c.captions_in, "kept": c.kept, "rejected": c.rejected, "unique_ids": c.unique_ids}),
    ]  # fmt: skip
    return metadata, manifest_data_version(c.manifest), checks


def _bound_text(bound: tuple[float, float | None] | None) -> str:
    if bound is None:
        return "-"
    lo, hi = bound
    return f">= {lo:g}" if hi is None else (f"<= {hi:g}" if lo == 0 else f"in [{lo:g}, {hi:g}]")


# With the default run size, for tests and scripts that materialize assets directly.
caption_curation = caption_curation_asset(1000)
