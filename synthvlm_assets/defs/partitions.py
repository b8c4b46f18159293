from dagster import DynamicPartitionsDefinition

# One key space of caption shards, shared one-to-one by every per-shard asset (identity mappings),
# so lineage, staleness and backfills work per shard. Keys name the file and the row range.
caption_shards = DynamicPartitionsDefinition(name="caption_shards")

# On Kubernetes each run of a GPU asset gets a GPU; the `gpu` pool caps how many run at once.
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}
