"""The two per-shard stages as plain functions over the storage root (the assets call these;
so do the benchmark and the tests). Output locations: `<asset>/<shard key>/<table>.parquet`."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from synthvlm_assets.captions.curation import CurationResult, curate_captions
from synthvlm_assets.captions.dedup import DedupStore
from synthvlm_assets.captions.filters import PerplexityModel, RuleFilterSettings
from synthvlm_assets.captions.sources import CaptionFields, read_shard
from synthvlm_assets.shards import Shard, ShardRegistry

RAW = "raw_caption_pool"
CURATED = "curated_captions"


@dataclass
class RawShard:
    captions: pa.Table
    malformed: pa.Table
    prefix: str


def load_raw_shard(registry: ShardRegistry, shard: Shard, fields: CaptionFields, run_id: str = "") -> RawShard:
    """raw_caption_pool: read the shard's rows from its source file and publish them."""
    registry.check_unchanged(shard)
    captions, malformed = read_shard(shard, fields, registry.source_fs(shard.uri))
    prefix = f"{RAW}/{shard.key}"
    registry.storage.publish_partition(prefix, {"captions": captions, "malformed": malformed}, {"shard": shard.key, "run_id": run_id})
    return RawShard(captions, malformed, prefix)


@dataclass
class CuratedShard:
    result: CurationResult
    raw_rows: int
    earlier_shards: int
    earlier_distinct: int
    prefix: str


def curate_shard(
    registry: ShardRegistry,
    shard: Shard,
    fields: CaptionFields,
    settings: RuleFilterSettings,
    perplexity: PerplexityModel | None = None,
    run_id: str = "",
) -> CuratedShard:
    """curated_captions: normalise, filter and deduplicate the shard's raw rows, and publish."""
    storage = registry.storage
    raw = storage.read_partition(f"{RAW}/{shard.key}", "captions")
    earlier = registry.earlier_shards(shard.key)
    dedup = DedupStore(storage, fields)
    index = dedup.earlier_index(earlier, registry.file_tags(), registry.source_fs)
    result = curate_captions(raw, settings, shard.file_seq, index, perplexity)
    dedup.store(shard, result.dedup_keys)
    prefix = f"{CURATED}/{shard.key}"
    storage.publish_partition(
        prefix, {"kept": result.kept, "rejected": result.rejected}, {"shard": shard.key, "run_id": run_id, "settings": settings.as_dict()}
    )
    return CuratedShard(result, raw.num_rows, len(earlier), len(index), prefix)
