"""Assemble the code location from settings (the only place that reads the environment)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

from dagster import AssetSelection, Definitions, define_asset_job

from synthvlm_assets.defs.automation import PER_SHARD, SELECTION, automation_sensor, code_versions, nightly_schedule
from synthvlm_assets.defs.captions import caption_curation_asset
from synthvlm_assets.defs.evaluation import BenchmarkEvalResource, llava_benchmark_eval, llava_benchmark_job
from synthvlm_assets.defs.judge import judged_captions, pair_filtered_captions
from synthvlm_assets.defs.resources import (
    CaptionSourceResource,
    CurationResource,
    JudgeResource,
    PairFilterResource,
    ScoringResource,
    SelectionResource,
    StorageResource,
    SynthesisResource,
    TrainingResource,
)
from synthvlm_assets.defs.selection import image_scores, synthvlm_100k
from synthvlm_assets.defs.partitions import GPU_TAGS, caption_shards
from synthvlm_assets.defs.sensors import caption_file_sensor
from synthvlm_assets.defs.synthesis import sdxl_images
from synthvlm_assets.defs.training import (
    checkpoint_assets,
    llava_stage1_export,
    llava_stage1_sanity_eval,
    llava_stage2_export,
)
from synthvlm_assets.storage import local_or_absolute

MAIN_JOB = "synthvlm_job"
# The main job mixes caption_curation's runs over many shards with the GPU stages' runs of one shard: a
# backfill of it from the job page runs one shard a run (asset backfills follow each asset's policy).
warnings.filterwarnings("ignore", message=f"Asset job {MAIN_JOB} materializes assets with varying BackfillPolicies")
CURATION_JOB = "caption_curation_job"
DATASET_JOB = "synthvlm_100k_job"
TRAINING_JOB = "llava_training_job"
STAGE2_JOB = "llava_stage2_job"


@dataclass
class Settings:
    """Deployment settings. `from_env` reads SYNTHVLM_* variables; tests pass values directly."""

    storage_root: str = "synthvlm_data"
    s3_endpoint_url: str | None = None
    input_uri: str | None = None  # default: <storage_root>/inbox
    shard_rows: int = 1000
    shards_per_run: int = 1000  # caption shards one curation run covers (its backfill policy)
    curation: dict = field(default_factory=dict)
    pair_filters: dict = field(default_factory=dict)  # PairFilterResource fields (off by default)
    judge: dict = field(default_factory=dict)  # JudgeResource fields; {"model": "tiny"} offline
    synthesis: dict = field(default_factory=dict)  # SynthesisResource fields; {"model": "tiny"} offline
    scoring: dict = field(default_factory=dict)  # ScoringResource fields; {"clip_model": "tiny"} offline
    selection: dict = field(default_factory=dict)  # SelectionResource fields (lam, k, fraction)
    executor: str = "multiprocess"  # or "k8s": each step its own pod, GPU steps request a GPU (deploy/helm)
    training: dict = field(
        default_factory=dict
    )  # TrainingResource fields; {"vision_tower": "tiny", "llm": "tiny"} offline
    benchmark_eval: dict = field(default_factory=dict)  # BenchmarkEvalResource fields (llava_benchmark_job)

    @classmethod
    def from_env(cls, env: os._Environ | dict | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            storage_root=env.get("SYNTHVLM_STORAGE_ROOT", "synthvlm_data"),
            s3_endpoint_url=env.get("SYNTHVLM_S3_ENDPOINT_URL") or None,
            input_uri=env.get("SYNTHVLM_INPUT_URI") or None,
            shard_rows=int(env.get("SYNTHVLM_SHARD_ROWS", "1000")),
            shards_per_run=int(env.get("SYNTHVLM_SHARDS_PER_RUN", "1000")),
            judge={
                k: v
                for k, v in {
                    "model": env.get("SYNTHVLM_JUDGE_MODEL"),
                    "backend": env.get("SYNTHVLM_JUDGE_BACKEND"),
                    "endpoint_url": env.get("SYNTHVLM_JUDGE_ENDPOINT_URL"),
                }.items()
                if v
            },
            synthesis={k: v for k, v in {"model": env.get("SYNTHVLM_SDXL_MODEL")}.items() if v},
            scoring={
                k: v
                for k, v in {
                    "clip_model": env.get("SYNTHVLM_CLIP_MODEL"),
                    "clip_pretrained": env.get("SYNTHVLM_CLIP_PRETRAINED"),
                }.items()
                if v
            },
            selection={
                k: float(v) if k != "k" else int(v)
                for k, v in {
                    "k": env.get("SYNTHVLM_SELECT_K"),
                    "fraction": env.get("SYNTHVLM_SELECT_FRACTION"),
                    "lam": env.get("SYNTHVLM_LAMBDA"),
                }.items()
                if v
            },
            executor=env.get("SYNTHVLM_EXECUTOR") or "multiprocess",
            training={
                k: int(v) if k in ("processes", "micro_batch") else v
                for k, v in {
                    "vision_tower": env.get("SYNTHVLM_LLAVA_VISION_TOWER"),
                    "vision_revision": env.get("SYNTHVLM_LLAVA_VISION_REVISION"),
                    "llm": env.get("SYNTHVLM_LLAVA_LLM"),
                    "llm_revision": env.get("SYNTHVLM_LLAVA_LLM_REVISION"),
                    "processes": env.get("SYNTHVLM_LLAVA_PROCESSES"),
                    "micro_batch": env.get("SYNTHVLM_LLAVA_MICRO_BATCH"),
                    "instruct_json": env.get("SYNTHVLM_LLAVA_INSTRUCT_JSON"),
                    "instruct_image_folder": env.get("SYNTHVLM_LLAVA_INSTRUCT_IMAGES"),
                    "launcher": env.get("SYNTHVLM_LLAVA_LAUNCHER"),
                    "k8s_image": env.get("SYNTHVLM_LLAVA_K8S_IMAGE"),
                }.items()
                if v
            },  # fmt: skip
            benchmark_eval={
                k: v
                for k, v in {
                    "model": env.get("SYNTHVLM_EVAL_MODEL"),
                    "datasets_dir": env.get("SYNTHVLM_EVAL_DATASETS_DIR"),
                    "lmms_eval_python": env.get("SYNTHVLM_LMMS_EVAL_PYTHON"),
                }.items()
                if v
            },  # fmt: skip
        )

    def executor_def(self):
        """The executor of every job: Dagster's default (steps as processes of the run), or on
        Kubernetes one pod per step, so that only GPU steps hold a GPU (their `dagster-k8s/config` tags)."""
        if self.executor == "multiprocess":
            return None
        if self.executor == "k8s":
            from dagster_k8s import k8s_job_executor  # the deploy extra

            return k8s_job_executor
        raise ValueError(f"SYNTHVLM_EXECUTOR={self.executor!r}: expected 'multiprocess' or 'k8s'")

    def resources(self) -> dict:
        root = local_or_absolute(self.storage_root).rstrip("/")
        return {
            "storage": StorageResource(root_uri=root, s3_endpoint_url=self.s3_endpoint_url),
            "caption_source": CaptionSourceResource(
                input_uri=local_or_absolute(self.input_uri) if self.input_uri else f"{root}/inbox",
                shard_rows=self.shard_rows,
            ),
            "curation": CurationResource(**self.curation),
            "pair_filters": PairFilterResource(**self.pair_filters),
            "judge": JudgeResource(**self.judge),
            "synthesis": SynthesisResource(**self.synthesis),
            "scoring": ScoringResource(**self.scoring),
            "selection": SelectionResource(**self.selection),
            "training": TrainingResource(**self.training),
            "benchmark_eval": BenchmarkEvalResource(**self.benchmark_eval),
        }


def build_definitions(settings: Settings) -> Definitions:
    caption_curation = caption_curation_asset(settings.shards_per_run)
    per_shard = [caption_curation, pair_filtered_captions, judged_captions, sdxl_images, image_scores]
    assets = [*per_shard, synthvlm_100k]
    # Training is launched on purpose (llava_training_job): GPU hours never start from automation.
    # Training in a GPU pod of its own (launcher "k8s"): its step needs no GPU.
    stage1_checkpoint, stage2_checkpoint = checkpoint_assets(
        {} if settings.training.get("launcher") == "k8s" else GPU_TAGS
    )
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
    resources = settings.resources()
    versions = code_versions(resources)
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
        sensors=[caption_file_sensor, automation_sensor],
        schedules=[nightly_schedule(MAIN_JOB, caption_shards.name, "image_scores")],
        resources=resources,
        executor=settings.executor_def(),
    )
