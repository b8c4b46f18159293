"""SPEC §1 for one shard: normalisation, the rule filters and exact-duplicate removal
(the first occurrence in registration order wins, across shards too: see dedup.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from synthvlm_assets.captions.filters import (
    FILTER_NAMES,
    PerplexityModel,
    RuleFilterSettings,
    caption_stats,
    failed_filters,
)
from synthvlm_assets.captions.dedup import first_occurrences
from synthvlm_assets.captions.sources import RAW_SCHEMA

# Raw columns carried into the curated tables unchanged.
_CARRIED = ("caption_id", "source", "source_id", "source_file", "source_row", "image_ref", "shard")

CURATED_SCHEMA = pa.schema(
    [
        RAW_SCHEMA.field("caption_id"),
        ("caption", pa.string()),  # normalised: what the filters saw and what is kept
        ("caption_original", pa.string()),
        *[RAW_SCHEMA.field(name) for name in _CARRIED[1:]],
        *[(name, pa.float64()) for name in FILTER_NAMES],
        ("reject_reason", pa.string()),  # first failing filter in Table-1 order, or "duplicate"
        ("reject_value", pa.float64()),
        ("failed_filters", pa.list_(pa.string())),
        ("duplicate_of", pa.string()),
    ]
)


@dataclass
class CurationResult:
    kept: pa.Table
    rejected: pa.Table
    dedup_keys: pa.Table  # first occurrence of every distinct normalised caption, for later shards

    def reason_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reason in self.rejected.column("reject_reason").to_pylist():
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    def failure_counts(self) -> dict[str, int]:
        """Per filter, how many captions it fails on its own (a caption may fail several)."""
        counts = dict.fromkeys(FILTER_NAMES, 0)
        for failed in self.rejected.column("failed_filters").to_pylist():
            for name in failed:
                counts[name] += 1
        return counts


def curate_captions(
    raw: pa.Table,
    settings: RuleFilterSettings,
    file_seq: int,
    earlier_ids: Sequence[str | None] | None = None,
    perplexity: PerplexityModel | None = None,
) -> CurationResult:
    """Normalise, filter and deduplicate one shard's raw rows; every rejected row keeps its reason.
    `earlier_ids[i]`: the caption that had row i's text first in an earlier shard, or None."""
    bounds = settings.bounds()
    first_in_shard: dict[bytes, str] = {}
    keys: list[bytes] = raw.column("dedup_key").to_pylist()
    earlier_ids = [None] * len(keys) if earlier_ids is None else earlier_ids
    if len(earlier_ids) != len(keys):
        raise ValueError(f"{len(earlier_ids)} earlier ids for {len(keys)} rows")
    kept: dict[str, list] = {f.name: [] for f in CURATED_SCHEMA}
    rejected: dict[str, list] = {f.name: [] for f in CURATED_SCHEMA}
    for rec, key, first_earlier in zip(_rows(raw), keys, earlier_ids):
        text = rec["caption_normalized"]
        stats = caption_stats(text, settings, perplexity)
        failed = failed_filters(stats, bounds)
        first_here = first_in_shard.setdefault(key, rec["caption_id"])
        duplicate_of = None
        if not failed:
            # Filters are functions of the normalised text, so a duplicate of a filtered-out caption is
            # filtered out too: checking duplicates among survivors equals checking all rows.
            duplicate_of = first_earlier or (first_here if first_here != rec["caption_id"] else None)
        reason = failed[0] if failed else ("duplicate" if duplicate_of else None)
        out = kept if reason is None else rejected
        for name in _CARRIED:
            out[name].append(rec[name])
        out["caption"].append(text)
        out["caption_original"].append(rec["caption"])
        for name in FILTER_NAMES:
            out[name].append(stats[name])
        out["reject_reason"].append(reason)
        out["reject_value"].append(stats[reason] if failed else None)
        out["failed_filters"].append(failed)
        out["duplicate_of"].append(duplicate_of)
    return CurationResult(
        pa.table(kept, schema=CURATED_SCHEMA),
        pa.table(rejected, schema=CURATED_SCHEMA),
        first_occurrences(keys, file_seq, raw.column("source_row").to_pylist()),
    )


def _rows(table: pa.Table) -> Iterator[dict]:
    for batch in table.to_batches():
        yield from batch.to_pylist()
