from dagster import DynamicPartitionsDefinition

# One key space of caption shards, shared one-to-one by every per-shard asset (identity mappings),
# so lineage, staleness and backfills work per shard. Keys name the file and the row range.
caption_shards = DynamicPartitionsDefinition(name="caption_shards")


def gpu_tags(gpus: int) -> dict:
    """Op tags of a step that holds `gpus` GPUs. On Kubernetes (k8s_job_executor: a pod per step) its pod
    requests them, also on GPU nodes tainted for GPU work only; the `gpu` pool caps how many such steps run at
    once (deploy/helm/values.yaml). No GPU: no tags."""
    if gpus <= 0:
        return {}
    return {
        "dagster-k8s/config": {
            "container_config": {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}},
            "pod_spec_config": {
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            },
        }
    }


GPU_TAGS = gpu_tags(1)  # SDXL, CLIP scoring, a training step: one GPU each
