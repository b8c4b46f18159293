"""Assemble the code location from its settings (defs/settings.py reads them from the environment)."""

from __future__ import annotations

import warnings

from dagster import AssetSelection, Definitions, define_asset_job

from synthvlm_assets.defs.automation import PER_SHARD, SELECTION, automation_sensor, code_versions, nightly_sensor
from synthvlm_assets.defs.captions import caption_curation_asset
from synthvlm_assets.defs.evaluation import llava_benchmark_eval, llava_benchmark_job
from synthvlm_assets.defs.judge import judged_captions_asset, pair_filtered_captions
from synthvlm_assets.defs.selection import image_scores, synthvlm_100k
from synthvlm_assets.defs.partitions import GPU_TAGS, caption_shards, gpu_tags
from synthvlm_assets.defs.sensors import caption_file_sensor
from synthvlm_assets.defs.synthesis import sdxl_images
from synthvlm_assets.defs.training import (
    checkpoint_assets,
    llava_stage1_export,
    llava_stage1_sanity_eval,
    llava_stage2_export,
)
from synthvlm_assets.defs.settings import Settings

MAIN_JOB = "synthvlm_job"
# The main job mixes caption_curation's runs over many shards with the GPU stages' runs of one shard: a
# backfill of it from the job page runs one shard a run (asset backfills follow each asset's policy).
warnings.filterwarnings("ignore", message=f"Asset job {MAIN_JOB} materializes assets with varying BackfillPolicies")
CURATION_JOB = "caption_curation_job"
DATASET_JOB = "synthvlm_100k_job"
TRAINING_JOB = "llava_training_job"
STAGE2_JOB = "llava_stage2_job"


def build_definitions(settings: Settings) -> Definitions:
    """The code location of `settings`. What fixes its shape (code versions, op tags, backfill policy) is read
    from the settings' plain values now; the resources read their environment variables when a run starts."""
    plain = settings.resources()
    caption_curation = caption_curation_asset(settings.shards_per_run)
    # The judge's step holds the GPUs its backend loads the model on (vLLM's tensor parallelism).
    judged_captions = judged_captions_asset(gpu_tags(plain["judge"].gpus()))
    per_shard = [caption_curation, pair_filtered_captions, judged_captions, sdxl_images, image_scores]
    per_shard_keys = [key for a in per_shard for key in a.keys]
    assets = [*per_shard, synthvlm_100k]
    # Training is launched on purpose (llava_training_job): GPU hours never start from automation.
    # Training in a GPU pod of its own (launcher "k8s"): its step needs no GPU.
    stage1_checkpoint, stage2_checkpoint = checkpoint_assets({} if plain["training"].launcher == "k8s" else GPU_TAGS)
    training = [stage1_checkpoint, llava_stage1_export, llava_stage1_sanity_eval]
    stage2 = [stage2_checkpoint, llava_stage2_export]
    main_job = define_asset_job(
        MAIN_JOB,
        selection=AssetSelection.assets(*per_shard),
        description=(
            "Everything per caption shard: load the raw pool, curate and judge it, synthesize and score its images."
        ),
    )
    dataset_job = define_asset_job(
        DATASET_JOB,
        selection=AssetSelection.assets(synthvlm_100k),
        description="Select the global top K into SynthVLM-100K.",
    )
    curation_job = define_asset_job(
        CURATION_JOB,
        selection=AssetSelection.assets(caption_curation),
        description="The CPU part per caption shard: load the raw pool and curate it.",
    )
    # The one source of code versions (defs/automation.py); assets it does not version (training, evaluation:
    # launched on purpose) have none.
    versions = code_versions(plain)
    conditions = {key: SELECTION if a is synthvlm_100k else PER_SHARD for a in assets for key in a.keys}
    assets = [
        a.map_asset_specs(
            lambda spec: spec.replace_attributes(
                code_version=versions[spec.key.to_user_string()], automation_condition=conditions[spec.key]
            )
        )
        for a in assets
    ]
    training_job = define_asset_job(
        TRAINING_JOB,
        selection=AssetSelection.assets(*training),
        description=(
            "LLaVA-1.5 stage 1 on the current SynthVLM-100K, its Hugging Face export and a sanity evaluation "
            "(SPEC §6)."
        ),
    )
    stage2_job = define_asset_job(
        STAGE2_JOB,
        selection=AssetSelection.assets(*stage2),
        description=(
            "LLaVA-1.5 stage 2 (optional): instruction tuning on your LLaVA-665K-format JSON from the current "
            "stage-1 run, and its export."
        ),
    )
    return Definitions(
        assets=[*assets, *training, *stage2, llava_benchmark_eval],
        jobs=[main_job, curation_job, dataset_job, training_job, stage2_job, llava_benchmark_job],
        sensors=[caption_file_sensor, automation_sensor, nightly_sensor(caption_shards, per_shard_keys)],
        resources=settings.definition_resources(),
        executor=settings.executor_def(),
    )
