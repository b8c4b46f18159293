"""SPEC §1 as assets: raw_caption_pool -> curated_captions, one partition per caption shard."""

from collections import Counter

import pyarrow.compute as pc
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from synthvlm_assets.captions.filters import FILTER_NAMES
from synthvlm_assets.captions.stages import CURATED, RAW, curate_shard, load_raw_shard
from synthvlm_assets.defs.automation import partition_data_version
from synthvlm_assets.defs.metadata import histograms, md_table, sample_rows
from synthvlm_assets.defs.partitions import caption_shards
from synthvlm_assets.defs.retries import SHARD_RETRY_POLICY
from synthvlm_assets.defs.resources import CaptionSourceResource, CurationResource, StorageResource


def _unique(column) -> bool:
    return pc.count_distinct(column).as_py() == len(column)


@asset(
    partitions_def=caption_shards,
    retry_policy=SHARD_RETRY_POLICY,
    code_version="1",
    kinds={"parquet"},
    group_name="captions",
    check_specs=[
        AssetCheckSpec("rows_accounted_for", asset=RAW, blocking=True, description="Shard rows = captions + malformed rows."),
        AssetCheckSpec("unique_caption_ids", asset=RAW, blocking=True),
        AssetCheckSpec("shard_size", asset=RAW, description="1 <= shard rows <= the shard size its file was registered with."),
    ],
)
def raw_caption_pool(
    context: AssetExecutionContext, storage: StorageResource, caption_source: CaptionSourceResource
) -> MaterializeResult:
    """One shard of a registered caption file, loaded in one schema; malformed rows kept with their reason."""
    registry = storage.registry()
    root = registry.storage
    shard = registry.shard(context.partition_key)
    out = load_raw_shard(registry, shard, caption_source.fields(), context.run.run_id)
    captions, malformed, prefix = out.captions, out.malformed, out.prefix

    reasons = Counter(malformed.column("reason").to_pylist())
    lengths = pc.utf8_length(captions.column("caption")).to_pylist()
    return MaterializeResult(
        data_version=partition_data_version(root, prefix),
        metadata={
            "source_file": MetadataValue.path(shard.uri),
            "rows": shard.rows,
            "captions": captions.num_rows,
            "malformed": malformed.num_rows,
            "malformed_by_reason": md_table(["reason", "rows"], sorted(reasons.items())),
            "malformed_sample": md_table(["row", "reason", "detail"], sample_rows(malformed, ["source_row", "reason", "detail"])),
            "caption_sample": md_table(["caption_id", "caption"], sample_rows(captions, ["caption_id", "caption"])),
            "caption_length_histogram": histograms([("caption length (code points)", lengths, [])], shard.key),
            "captions_parquet": MetadataValue.path(root.uri(f"{prefix}/captions.parquet")),
            "malformed_parquet": MetadataValue.path(root.uri(f"{prefix}/malformed.parquet")),
        },
        check_results=[
            AssetCheckResult(
                check_name="rows_accounted_for",
                passed=captions.num_rows + malformed.num_rows == shard.rows,
                metadata={"shard_rows": shard.rows, "captions": captions.num_rows, "malformed": malformed.num_rows},
            ),
            AssetCheckResult(check_name="unique_caption_ids", passed=_unique(captions.column("caption_id"))),
            AssetCheckResult(
                check_name="shard_size",
                passed=1 <= shard.rows <= shard.shard_rows,
                severity=AssetCheckSeverity.WARN,
                metadata={"rows": shard.rows, "shard_rows": shard.shard_rows},
            ),
        ],
    )


@asset(
    deps=[raw_caption_pool],
    partitions_def=caption_shards,
    retry_policy=SHARD_RETRY_POLICY,
    code_version="1",
    kinds={"parquet"},
    group_name="captions",
    check_specs=[
        AssetCheckSpec("rows_accounted_for", asset=CURATED, blocking=True, description="Raw captions = kept + rejected."),
        AssetCheckSpec("unique_caption_ids", asset=CURATED, blocking=True),
    ],
)
def curated_captions(
    context: AssetExecutionContext,
    storage: StorageResource,
    caption_source: CaptionSourceResource,
    curation: CurationResource,
) -> MaterializeResult:
    """Normalised captions that pass the paper's Table-1 rule filters, without exact duplicates
    (the first occurrence in registration order wins, across shards). Rejects keep their reason."""
    registry = storage.registry()
    root = registry.storage
    shard = registry.shard(context.partition_key)
    settings = curation.settings()
    out = curate_shard(registry, shard, caption_source.fields(), settings, curation.perplexity_model(), context.run.run_id)
    result, prefix = out.result, out.prefix

    reasons = result.reason_counts()
    failures = result.failure_counts()
    bounds = settings.bounds()
    per_filter = [
        [name, _bound_text(bounds.get(name)), failures[name] if name in bounds else "skipped", reasons.get(name, 0)]
        for name in FILTER_NAMES
    ] + [["duplicate", "first occurrence wins", reasons.get("duplicate", 0), reasons.get("duplicate", 0)]]
    both = [result.kept, result.rejected]
    panels = [("caption length", [n for t in both for n in pc.utf8_length(t.column("caption")).to_pylist()], [])]
    panels += [
        (name, [v for t in both for v in t.column(name).to_pylist()], [b for b in bounds[name] if b is not None])
        for name in FILTER_NAMES
        if name in bounds and name != "flagged_word_ratio"
    ]
    n_in = out.raw_rows
    return MaterializeResult(
        data_version=partition_data_version(root, prefix),
        metadata={
            "captions_in": n_in,
            "kept": result.kept.num_rows,
            "rejected": result.rejected.num_rows,
            "kept_fraction": result.kept.num_rows / n_in if n_in else 0.0,
            "earlier_shards_checked_for_duplicates": out.earlier_shards,
            "earlier_distinct_captions": out.earlier_distinct,
            "perplexity": "applied" if settings.perplexity_enabled else "skipped: no KenLM model configured",
            "filters": md_table(["filter", "keep when", "fails (alone)", "rejected by (first failing)"], per_filter),
            "filter_histograms": histograms(panels, f"{shard.key} (dashed: thresholds)"),
            "kept_sample": md_table(["caption_id", "caption"], sample_rows(result.kept, ["caption_id", "caption"])),
            "rejected_sample": md_table(
                ["caption_id", "reason", "value", "caption"],
                sample_rows(result.rejected, ["caption_id", "reject_reason", "reject_value", "caption"]),
            ),
            "kept_parquet": MetadataValue.path(root.uri(f"{prefix}/kept.parquet")),
            "rejected_parquet": MetadataValue.path(root.uri(f"{prefix}/rejected.parquet")),
        },
        check_results=[
            AssetCheckResult(
                check_name="rows_accounted_for",
                passed=result.kept.num_rows + result.rejected.num_rows == n_in,
                metadata={"in": n_in, "kept": result.kept.num_rows, "rejected": result.rejected.num_rows},
            ),
            AssetCheckResult(check_name="unique_caption_ids", passed=_unique(result.kept.column("caption_id"))),
        ],
    )


def _bound_text(bound: tuple[float, float | None] | None) -> str:
    if bound is None:
        return "-"
    lo, hi = bound
    return f">= {lo:g}" if hi is None else (f"<= {hi:g}" if lo == 0 else f"in [{lo:g}, {hi:g}]")
