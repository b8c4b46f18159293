"""Configuration lives in resources; the domain code receives plain values."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from synthvlm_assets.captions.filters import RuleFilterSettings
from synthvlm_assets.captions.judge.stage import JudgeSettings
from synthvlm_assets.captions.pair_filters import PairFilterSettings
from synthvlm_assets.captions.sources import CaptionFields
from synthvlm_assets.shards import ShardRegistry
from synthvlm_assets.storage import StorageRetry, StorageRoot
from synthvlm_assets.scoring.clip_score import ClipSettings
from synthvlm_assets.scoring.ssim import SSIMSettings
from synthvlm_assets.selection import SelectionSettings
from synthvlm_assets.synthesis.settings import SynthesisSettings

_RULES = RuleFilterSettings()


def _preset_settings(resource: ConfigurableResource, cls):
    """The domain settings of a resource whose `model` may be "tiny": unset (None) fields take the
    preset's defaults (the tiny preset has its own sizes and dtype); `cache_dir` is not a setting."""
    given = {k: v for k, v in resource.model_dump().items() if k != "cache_dir" and v is not None}
    return cls.tiny(**given) if resource.model == "tiny" else cls(**given)


_FIELDS = CaptionFields()
_RETRY = StorageRetry()


class StorageResource(ConfigurableResource):
    """The one storage root of every artifact: a local folder or s3://bucket/prefix."""

    root_uri: str = Field(description="Local folder or s3://bucket/prefix holding every artifact.")
    s3_endpoint_url: str | None = Field(
        default=None, description="Endpoint of an S3-compatible server (SeaweedFS, MinIO)."
    )
    retry_attempts: int = Field(
        default=_RETRY.attempts,
        description="Tries per storage operation on transient errors (throttling, timeouts, 5xx).",
    )
    retry_initial_delay: float = Field(
        default=_RETRY.initial_delay, description="Seconds before the first retry; doubles each time."
    )
    retry_max_delay: float = Field(default=_RETRY.max_delay, description="Longest wait between two tries, in seconds.")
    operation_deadline_seconds: float = Field(
        default=_RETRY.deadline,
        description="Longest a storage operation may take, retries included (plus a second per MiB moved).",
    )

    def root(self) -> StorageRoot:
        retry = StorageRetry(
            self.retry_attempts,
            self.retry_initial_delay,
            self.retry_max_delay,
            deadline=self.operation_deadline_seconds,
        )
        return StorageRoot(self.root_uri, self.s3_endpoint_url, retry=retry)

    def registry(self) -> ShardRegistry:
        return ShardRegistry(self.root())


class CaptionSourceResource(ConfigurableResource):
    """Where raw caption files arrive, how they are cut into shards and which fields hold what."""

    input_uri: str = Field(description="Folder (local or s3://) the sensor watches for new caption files.")
    shard_rows: int = Field(default=1000, description="Rows per shard (a 100M pool wants larger shards).")
    id_field: str = _FIELDS.id
    caption_field: str = _FIELDS.caption
    source_field: str = _FIELDS.source
    image_fields: list[str] = list(_FIELDS.image)
    max_caption_chars: int = Field(
        default=_FIELDS.max_caption_chars, description="Longer captions are malformed rows."
    )

    def fields(self) -> CaptionFields:
        return CaptionFields(
            id=self.id_field,
            caption=self.caption_field,
            image=tuple(self.image_fields),
            source=self.source_field,
            max_caption_chars=self.max_caption_chars,
        )


class CurationResource(ConfigurableResource):
    """Thresholds of the paper's Table 1 (appendix); keep when min <= stat <= max."""

    alphanumeric_ratio_min: float = _RULES.alphanumeric_ratio_min
    character_repetition_n: int = _RULES.character_repetition_n
    character_repetition_ratio_max: float = _RULES.character_repetition_ratio_max
    flagged_word_ratio_max: float = _RULES.flagged_word_ratio_max
    flagged_words_lang: str = _RULES.flagged_words_lang
    perplexity_max: float = _RULES.perplexity_max
    kenlm_model_path: str | None = Field(
        default=None, description="KenLM model; perplexity is skipped (and recorded so) when unset."
    )
    sentencepiece_model_path: str | None = None
    special_character_ratio_min: float = _RULES.special_character_ratio_min
    special_character_ratio_max: float = _RULES.special_character_ratio_max
    word_repetition_n: int = _RULES.word_repetition_n
    word_repetition_ratio_max: float = _RULES.word_repetition_ratio_max
    workers: int = Field(default=0, description="Processes that curate the shards of a run (0: one per CPU core).")

    def settings(self) -> RuleFilterSettings:
        return RuleFilterSettings(**self.model_dump(exclude={"workers"}))


_SYN = SynthesisSettings()


class SynthesisResource(ConfigurableResource):
    """SPEC §2 settings. `model` is a Hugging Face id, a local folder, an s3:// prefix, or "tiny"
    (small random SDXL built in code, for tests and the CPU demo: its images are meaningless)."""

    model: str = Field(default=_SYN.model, description='HF id, local folder, s3:// prefix, or "tiny".')
    revision: str | None = None
    refiner_model: str | None = Field(default=None, description="e.g. stabilityai/stable-diffusion-xl-refiner-1.0")
    refiner_revision: str | None = None
    refiner_switch: float = _SYN.refiner_switch
    height: int | None = Field(default=None, description="Default 1024 (32 for the tiny preset).")
    width: int | None = None
    steps: int = _SYN.steps
    guidance_scale: float = _SYN.guidance_scale
    negative_prompt: str = _SYN.negative_prompt
    images_per_caption: int = _SYN.images_per_caption
    dtype: str | None = Field(
        default=None, description="bf16 (default), fp16 (SynthVLM's) or fp32 (the tiny preset's default)."
    )
    vae_fp32: bool = _SYN.vae_fp32
    jpeg_quality: int = _SYN.jpeg_quality
    batch_size: int | None = Field(default=None, description="Prompts per UNet call (execution only).")
    compile: bool = Field(
        default=_SYN.compile, description="torch.compile the UNet on CUDA (compiles once per process, ~80 s)."
    )
    fuse_qkv: bool = Field(
        default=_SYN.fuse_qkv, description="Fuse q/k/v projections into one matmul (execution only)."
    )
    cache_dir: str | None = Field(default=None, description="Local cache for weights copied from s3://.")

    def settings(self) -> SynthesisSettings:
        return _preset_settings(self, SynthesisSettings)

    def generator_factory(self, s3_endpoint_url: str | None = None):
        """A callable that loads the pipeline (only called when an image must be generated)."""
        from synthvlm_assets.synthesis.sdxl import SDXLGenerator

        return lambda: SDXLGenerator.load(self.settings(), self.cache_dir, s3_endpoint_url)


_PAIR = PairFilterSettings()


class PairFilterResource(ConfigurableResource):
    """SPEC §1's optional image-text filters on the captions' original web images (off by default)."""

    enabled: bool = Field(
        default=_PAIR.enabled, description="Score (original image, caption) pairs; off: every caption passes."
    )
    blip_model: str = Field(
        default=_PAIR.blip_model, description='BLIP ITM: HF id, local folder, s3:// prefix, or "tiny".'
    )
    clip_model: str = Field(
        default=_PAIR.clip_model, description='CLIP (transformers): HF id, local folder, s3:// prefix, or "tiny".'
    )
    itm_probability_min: float = _PAIR.itm_probability_min
    clip_cosine_min: float = _PAIR.clip_cosine_min
    image_root: str | None = Field(
        default=None, description="Folder or s3:// prefix that relative image references are under."
    )
    batch_size: int = _PAIR.batch_size
    cache_dir: str | None = None

    def settings(self) -> PairFilterSettings:
        return PairFilterSettings(**{k: v for k, v in self.model_dump().items() if k != "cache_dir"})


_JUDGE = JudgeSettings()


class JudgeResource(ConfigurableResource):
    """SPEC §1's LLM judge. Llama-3-70B-Instruct through vLLM on GPU workers by default; "tiny" is a
    random toy Llama (meaningless verdicts) for tests and the CPU demo."""

    model: str = Field(default=_JUDGE.model, description='HF id, local folder, s3:// prefix, or "tiny".')
    revision: str | None = None
    tokenizer: str | None = Field(default=None, description="Default: the model's tokenizer.")
    backend: str = Field(
        default=_JUDGE.backend, description="auto (vllm on a GPU, else transformers) | vllm | transformers | http"
    )
    endpoint_url: str | None = Field(
        default=None, description="http backend: an OpenAI-compatible server, e.g. `vllm serve`."
    )
    api_key_env: str = _JUDGE.api_key_env
    batch_size: int = _JUDGE.batch_size
    max_caption_tokens: int = Field(
        default=_JUDGE.max_caption_tokens, description="Longer captions are rejected unjudged."
    )
    forced_choice: bool | None = Field(
        default=None, description="Restrict the answer to Yes/No (default: off; on for tiny)."
    )
    tensor_parallel_size: int = Field(
        default=_JUDGE.tensor_parallel_size,
        description="vllm: GPUs per judge (70B bf16: 4-8); its step's pod requests as many.",
    )
    quantization: str | None = Field(default=None, description='vllm: e.g. "fp8" (70B on 2 H100s).')
    max_model_len: int = _JUDGE.max_model_len
    concurrency: int = _JUDGE.concurrency
    timeout_s: float = _JUDGE.timeout_s
    cache_dir: str | None = Field(default=None, description="Local cache for weights copied from s3://.")

    def settings(self) -> JudgeSettings:
        return _preset_settings(self, JudgeSettings)

    def gpus(self) -> int:
        """GPUs a judge step holds: none when a server judges (http), else one per tensor-parallel rank."""
        return 0 if self.backend == "http" else self.tensor_parallel_size


_CLIP, _SSIM, _SEL = ClipSettings(), SSIMSettings(), SelectionSettings()


class ScoringResource(ConfigurableResource):
    """SPEC §3: the CLIP model for CLIPScore (open_clip name + pretrained tag, a local file or an
    s3:// file; "tiny" for the random test model) and the SSIM sizes."""

    clip_model: str = Field(
        default=_CLIP.model, description='open_clip name, e.g. ViT-B-32 or ViT-L-14-336; "tiny" offline.'
    )
    clip_pretrained: str = Field(
        default=_CLIP.pretrained, description="open_clip pretrained tag, local file or s3:// file."
    )
    clip_prefix: str = _CLIP.prefix
    clip_dtype: str = _CLIP.dtype
    batch_size: int = _CLIP.batch_size
    workers: int | None = Field(
        default=None, description="CPU processes decoding and resizing (default: all cores on a GPU box, 0 on a CPU)."
    )
    ssim_size: int = _SSIM.size
    ssim_low: int = _SSIM.low
    cache_dir: str | None = None

    def clip_settings(self) -> ClipSettings:
        return ClipSettings(self.clip_model, self.clip_pretrained, self.clip_prefix, self.clip_dtype, self.batch_size)

    def ssim_settings(self) -> SSIMSettings:
        return SSIMSettings(size=self.ssim_size, low=self.ssim_low)

    def worker_count(self) -> int:
        import os

        if self.workers is not None:
            return self.workers
        import torch

        return min(16, os.cpu_count() or 1) if torch.cuda.is_available() else 0


class SelectionResource(ConfigurableResource):
    """SPEC §4: score = clip_score + lam * ssim; keep the global top k (or a fraction)."""

    lam: float = _SEL.lam
    k: int | None = _SEL.k
    fraction: float | None = Field(
        default=None, description="Select this fraction of the scored captions instead of k."
    )

    def settings(self) -> SelectionSettings:
        return SelectionSettings(lam=self.lam, k=None if self.fraction is not None else self.k, fraction=self.fraction)


class TrainingResource(ConfigurableResource):
    """SPEC §6: the two pretrained parts (HF id, local folder or s3:// prefix at a pinned
    revision; both "tiny" for the small random test preset) and LLaVA-1.5's recipe. Batch and
    schedule fields left unset take LLaVA-1.5's values (the tiny preset's smaller batches)."""

    vision_tower: str = Field(default="openai/clip-vit-large-patch14-336", description='CLIP vision tower, or "tiny".')
    vision_revision: str | None = Field(default=None, description="Pinned revision (commit) of the vision tower.")
    llm: str = Field(default="lmsys/vicuna-7b-v1.5", description='The LLM (Vicuna-1.5 7B or 13B), or "tiny".')
    llm_revision: str | None = Field(default=None, description="Pinned revision (commit) of the LLM.")
    global_batch: int | None = Field(
        default=None, description="256 (LLaVA-1.5) = processes x micro_batch x accumulation."
    )
    micro_batch: int | None = Field(
        default=None, description="Per process and forward pass: 16 fits an 80 GB GPU at 7B."
    )
    lr: float | None = None
    epochs: int | None = None
    warmup_ratio: float | None = None
    weight_decay: float | None = None
    max_length: int | None = None
    dtype: str | None = Field(default=None, description='"auto" (bf16 on GPUs), "bf16" or "fp32".')
    seed: int = 0
    holdout_fraction: float | None = Field(
        default=None, description="Records kept out of training for the sanity evaluation."
    )
    checkpoint_every: int | None = Field(default=None, description="Optimizer steps between checkpoints.")
    gradient_checkpointing: bool = False
    compile: bool | None = Field(
        default=None,
        description=(
            "Stage 1: regional torch.compile of the vision and decoder layers (execution only); default: on CUDA."
        ),
    )
    num_workers: int | None = Field(default=None, description="Image-decoding processes per training process.")
    processes: int | None = Field(
        default=None, description="Training processes (torchrun); default: one per visible GPU, else 1."
    )
    export_dtype: str | None = Field(
        default=None, description='"bf16" (default) or "fp32" (the tiny preset\'s default).'
    )
    # Stage 2 (optional): instruction tuning on a LLaVA-665K-format JSON; unset fields take LLaVA-1.5's finetune
    # values.
    instruct_json: str | None = Field(
        default=None, description="Stage 2's LLaVA-665K-format JSON (local path or s3:// URI)."
    )
    instruct_image_folder: str | None = Field(
        default=None, description="The folder the JSON's image paths are relative to."
    )
    stage2_global_batch: int | None = Field(
        default=None, description="128 (LLaVA-1.5) = processes x micro_batch x accumulation."
    )
    stage2_micro_batch: int | None = None
    stage2_lr: float | None = None
    stage2_epochs: int | None = None
    fsdp: bool = Field(default=True, description="Stage 2: shard the model over the processes (FSDP).")
    stage2_gradient_checkpointing: bool | None = Field(
        default=None, description="Stage 2: on by default, as LLaVA's finetune."
    )
    eval_max_records: int = 256
    eval_retrieval_size: int = 16
    cache_dir: str | None = Field(default=None, description="Local cache for weights copied from s3://.")
    launcher: str = Field(default="subprocess", description=(
        '"subprocess": training runs beside the step (on Kubernetes: in the step\'s own GPU pod); "k8s": in a GPU pod '
        "of its own through Dagster Pipes (PipesK8sClient), with `processes` GPUs."))  # fmt: skip
    k8s_image: str | None = Field(
        default=None, description="The training pod's image (default: the run's own, DAGSTER_CURRENT_IMAGE)."
    )
    k8s_namespace: str | None = None
    k8s_pod_spec: dict | None = Field(default=None, description=(
        "Base pod spec of the training pod (node selector, envFrom secrets for S3, volumes); GPUs, the GPU toleration "
        "and an in-memory /dev/shm are added."))  # fmt: skip

    def model_settings(self):
        from synthvlm_assets.training.model import ModelSettings

        return ModelSettings(self.vision_tower, self.vision_revision, self.llm, self.llm_revision, seed=self.seed)

    def stage1_settings(self):
        from synthvlm_assets.training.stage1 import Stage1Settings

        names = ("global_batch", "micro_batch", "lr", "epochs", "warmup_ratio", "weight_decay", "max_length", "dtype",
                 "holdout_fraction", "checkpoint_every", "num_workers")  # fmt: skip
        given = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        given.update(seed=self.seed, gradient_checkpointing=self.gradient_checkpointing, compile=self.compile)
        if self.model_settings().tiny:
            return Stage1Settings.tiny_preset(**given)
        if self.num_workers is None:
            given["num_workers"] = 4
        return Stage1Settings(**given)

    def stage2_settings(self):
        from synthvlm_assets.training.stage2 import Stage2Settings

        own = {
            "global_batch": self.stage2_global_batch,
            "micro_batch": self.stage2_micro_batch,
            "lr": self.stage2_lr,
            "epochs": self.stage2_epochs,
            "gradient_checkpointing": self.stage2_gradient_checkpointing,
            "warmup_ratio": self.warmup_ratio,
            "weight_decay": self.weight_decay,
            "max_length": self.max_length,
            "dtype": self.dtype,
            "checkpoint_every": self.checkpoint_every,
            "num_workers": self.num_workers,
        }
        given = {k: v for k, v in own.items() if v is not None}
        from synthvlm_assets.storage import local_or_absolute

        # Absolute paths: the image folder names the run, and the training process may start elsewhere.
        given.update(instruct_json=local_or_absolute(self.instruct_json) if self.instruct_json else "",
                     image_folder=local_or_absolute(self.instruct_image_folder) if self.instruct_image_folder else "",
                     seed=self.seed, fsdp=self.fsdp)  # fmt: skip
        if self.model_settings().tiny:
            return Stage2Settings.tiny_preset(**given)
        return Stage2Settings(**{"num_workers": 4, **given})

    def eval_settings(self):
        from synthvlm_assets.training.evaluate import EvalSettings

        return EvalSettings(self.stage1_settings().holdout_fraction, self.eval_max_records, self.eval_retrieval_size)

    def process_count(self) -> int:
        if self.processes is not None:
            return self.processes
        if self.launcher == "k8s":
            return 1  # the step's host says nothing of the pod's GPUs
        import torch

        return max(1, torch.cuda.device_count())
