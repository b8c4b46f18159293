"""SPEC §1 end to end for one shard: raw rows in one schema, then normalisation, the rule filters
and exact-duplicate removal (first occurrence in registration order wins, across shards too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import pyarrow as pa

from synthvlm_assets.captions.filters import (
    FILTER_NAMES,
    PerplexityModel,
    RuleFilterSettings,
    caption_stats,
    failed_filters,
)
from synthvlm_assets.captions.normalize import NORMALIZATION_VERSION, dedup_key, normalize_caption
from synthvlm_assets.captions.sources import CaptionFields, CaptionRow, MalformedRow, iter_records, to_caption_row
from synthvlm_assets.shards import Shard
from synthvlm_assets.storage import StorageError, StorageRoot, split_protocol

RAW_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("caption", pa.string()),
        ("source", pa.string()),
        ("source_id", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("image_ref", pa.string()),
        ("shard", pa.string()),
    ]
)
MALFORMED_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("shard", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
CURATED_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("caption", pa.string()),  # normalised: what the filters saw and what is kept
        ("caption_original", pa.string()),
        ("source", pa.string()),
        ("source_id", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("image_ref", pa.string()),
        ("shard", pa.string()),
        *[(name, pa.float64()) for name in FILTER_NAMES],
        ("reject_reason", pa.string()),  # first failing filter in Table-1 order, or "duplicate"
        ("reject_value", pa.float64()),
        ("failed_filters", pa.list_(pa.string())),
        ("duplicate_of", pa.string()),
    ]
)
DEDUP_KEYS_SCHEMA = pa.schema([("dedup_key", pa.binary(16)), ("caption_id", pa.string())])


def caption_id(tag: str, row: int) -> str:
    """Unique across the pool by construction: the file's tag and the record's row in it."""
    return f"{tag}:{row}"


def read_shard(shard: Shard, fields: CaptionFields, fs: fsspec.AbstractFileSystem) -> tuple[pa.Table, pa.Table]:
    """Load one shard's rows from its source file: (rows in the pool schema, malformed rows with reasons)."""
    path = split_protocol(shard.uri)[1]
    default_source = path.rsplit("/", 1)[-1]
    rows: list[CaptionRow] = []
    bad: list[MalformedRow] = []
    for record in iter_records(fs, path, shard.format, shard.start, shard.end, shard.offset):
        row = to_caption_row(record, fields, default_source)
        (rows if isinstance(row, CaptionRow) else bad).append(row)
    raw = pa.table(
        {
            "caption_id": [caption_id(shard.file_tag, r.source_row) for r in rows],
            "caption": [r.caption for r in rows],
            "source": [r.source for r in rows],
            "source_id": [r.source_id for r in rows],
            "source_file": [shard.uri] * len(rows),
            "source_row": [r.source_row for r in rows],
            "image_ref": [r.image_ref for r in rows],
            "shard": [shard.key] * len(rows),
        },
        schema=RAW_SCHEMA,
    )
    malformed = pa.table(
        {
            "source_file": [shard.uri] * len(bad),
            "source_row": [b.source_row for b in bad],
            "shard": [shard.key] * len(bad),
            "reason": [b.reason for b in bad],
            "detail": [b.detail for b in bad],
        },
        schema=MALFORMED_SCHEMA,
    )
    return raw, malformed


def shard_dedup_keys(raw: pa.Table) -> pa.Table:
    """The dedup key of every distinct normalised caption of a raw shard, with its first caption_id."""
    first: dict[bytes, str] = {}
    for cid, text in zip(raw.column("caption_id").to_pylist(), raw.column("caption").to_pylist()):
        first.setdefault(dedup_key(normalize_caption(text)), cid)
    return _keys_table(first)


def merge_earlier_keys(tables: Iterable[pa.Table]) -> dict[bytes, str]:
    """Dedup keys of earlier shards, given in registration order: the first caption_id of each wins."""
    out: dict[bytes, str] = {}
    for t in tables:
        for k, cid in zip(t.column("dedup_key").to_pylist(), t.column("caption_id").to_pylist()):
            out.setdefault(k, cid)
    return out


@dataclass
class CurationResult:
    kept: pa.Table
    rejected: pa.Table
    dedup_keys: pa.Table  # every distinct normalised caption of the shard, for later shards' dedup

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
    earlier_keys: dict[bytes, str] | None = None,
    perplexity: PerplexityModel | None = None,
) -> CurationResult:
    """Normalise, filter and deduplicate one shard's raw rows; every rejected row keeps its reason."""
    earlier_keys = earlier_keys or {}
    bounds = settings.bounds()
    first_in_shard: dict[bytes, str] = {}
    kept: dict[str, list] = {f.name: [] for f in CURATED_SCHEMA}
    rejected: dict[str, list] = {f.name: [] for f in CURATED_SCHEMA}
    for rec in _rows(raw):
        text = normalize_caption(rec["caption"])
        stats = caption_stats(text, settings, perplexity)
        failed = failed_filters(stats, bounds)
        key = dedup_key(text)
        first_here = first_in_shard.setdefault(key, rec["caption_id"])
        duplicate_of = None
        if not failed:
            # Filters are functions of the normalised text, so a duplicate of a filtered-out caption is
            # filtered out too: checking duplicates among survivors equals checking all rows.
            duplicate_of = earlier_keys.get(key) or (first_here if first_here != rec["caption_id"] else None)
        reason = failed[0] if failed else ("duplicate" if duplicate_of else None)
        out = kept if reason is None else rejected
        for name in RAW_SCHEMA.names:
            out[name].append(rec[name])
        out["caption_original"].append(rec["caption"])
        out["caption"][-1] = text
        for name in FILTER_NAMES:
            out[name].append(stats[name])
        out["reject_reason"].append(reason)
        out["reject_value"].append(stats[reason] if failed else None)
        out["failed_filters"].append(failed)
        out["duplicate_of"].append(duplicate_of)
    return CurationResult(
        pa.table(kept, schema=CURATED_SCHEMA),
        pa.table(rejected, schema=CURATED_SCHEMA),
        _keys_table(first_in_shard),
    )


def _keys_table(first: dict[bytes, str]) -> pa.Table:
    return pa.table({"dedup_key": list(first), "caption_id": list(first.values())}, schema=DEDUP_KEYS_SCHEMA)


def _rows(table: pa.Table) -> Iterator[dict]:
    for batch in table.to_batches():
        yield from batch.to_pylist()


def dedup_keys_prefix(fields: CaptionFields) -> str:
    """Cache location of per-shard dedup keys; changes with anything that changes them."""
    version = hashlib.sha1(f"{NORMALIZATION_VERSION}|{fields}".encode()).hexdigest()[:12]
    return f"curated_captions/_dedup_keys/{version}"


def earlier_dedup_keys(
    storage: StorageRoot, shards: list[Shard], fields: CaptionFields, fs_for: Callable[[str], fsspec.AbstractFileSystem]
) -> dict[bytes, str]:
    """Dedup keys of the given (earlier) shards, merged in registration order.

    Each shard's keys come from the cache, else from its raw_caption_pool partition, else straight
    from its source file; whatever had to be computed is cached. So curating shard N gives the same
    answer whether or not shards before it were materialized yet.
    """
    prefix = dedup_keys_prefix(fields)

    def load(shard: Shard) -> pa.Table:
        key = f"{prefix}/{shard.key}.parquet"
        try:
            return storage.read_parquet(key)
        except StorageError as exc:
            if not str(exc).startswith("not found"):
                raise
        raw_prefix = f"raw_caption_pool/{shard.key}"
        if storage.manifest(raw_prefix) is not None:
            raw = storage.read_partition(raw_prefix, "captions", columns=["caption_id", "caption"])
        else:
            raw = read_shard(shard, fields, fs_for(shard.uri))[0]
        table = shard_dedup_keys(raw)
        storage.write_parquet(key, table)
        return table

    with ThreadPoolExecutor(max_workers=8) as pool:  # object stores answer many small GETs in parallel
        return merge_earlier_keys(pool.map(load, shards))


def store_dedup_keys(storage: StorageRoot, shard: Shard, fields: CaptionFields, keys: pa.Table) -> None:
    storage.write_parquet(f"{dedup_keys_prefix(fields)}/{shard.key}.parquet", keys)
