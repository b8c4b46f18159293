from dagster import DynamicPartitionsDefinition

# One key space of caption shards, shared one-to-one by every per-shard asset (identity mappings),
# so lineage, staleness and backfills work per shard. Keys name the file and the row range.
caption_shards = DynamicPartitionsDefinition(name="caption_shards")

# On Kubernetes (k8s_job_executor: a pod per step) each step of a GPU asset gets a GPU, also on GPU
# nodes tainted for GPU work only; the `gpu` pool caps how many run at once (deploy/helm/values.yaml).
GPU_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
        "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    }
}
