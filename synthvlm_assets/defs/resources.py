"""Configuration lives in resources; the domain code receives plain values.

A resource over a domain settings dataclass takes its fields from it (`settings_fields`): the names, types and
defaults are the domain's, written once; this module adds what the UI shows of each (its description)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping

from dagster import ConfigurableResource
from pydantic import Field, create_model

from synthvlm_assets.captions.filters import RuleFilterSettings
from synthvlm_assets.captions.judge.stage import JudgeSettings
from synthvlm_assets.captions.pair_filters import PairFilterSettings
from synthvlm_assets.captions.sources import CaptionFields
from synthvlm_assets.scoring.clip_score import ClipSettings
from synthvlm_assets.scoring.ssim import SSIMSettings
from synthvlm_assets.selection import SelectionSettings
from synthvlm_assets.shards import ShardRegistry
from synthvlm_assets.storage import StorageRetry, StorageRoot
from synthvlm_assets.synthesis.settings import SynthesisSettings

CACHE_DIR = "Local cache for weights copied from s3://."


def settings_fields(
    settings: type, docs: Mapping[str, str], names: Mapping[str, str] | None = None, exclude: tuple[str, ...] = ()
) -> dict[str, tuple[object, object]]:
    """Resource fields ({name: (type, Field)}) for the fields of a domain settings dataclass: its types and
    defaults, `docs[name]` as descriptions (every field needs one), `names` renaming some. A field that the
    dataclass's tiny preset (`tiny()`) sets differently is optional: unset, it takes the preset's value."""
    names = names or {}
    hints = typing.get_type_hints(settings)
    default = settings()
    preset = settings.tiny() if hasattr(settings, "tiny") else default
    fields: dict[str, tuple[object, object]] = {}
    for f in dataclasses.fields(settings):
        if f.name in exclude:
            continue
        name = names.get(f.name, f.name)
        kind, value, doc = hints[f.name], getattr(default, f.name), docs.get(name, "")  # test_docs wants one
        if f.name != "model" and getattr(preset, f.name) != value:
            kind, doc = kind | None, f"{doc} Default {value} ({getattr(preset, f.name)} for the tiny preset)."
            value = None
        elif typing.get_origin(kind) is tuple:  # Dagster config has lists, not tuples
            kind, value = list[typing.get_args(kind)[0]], list(value)
        fields[name] = (kind, Field(default=value, description=doc))
    return fields


def _base(name: str, *parts: dict[str, tuple[object, object]], **own: tuple[object, object]) -> type:
    """The fields of a resource as a base class its methods are declared on."""
    merged = {k: v for part in parts for k, v in part.items()} | own
    return create_model(f"_{name}Fields", __base__=ConfigurableResource, **merged)


def settings_of(resource: ConfigurableResource, settings: type, names: Mapping[str, str] | None = None):
    """The domain settings a resource's fields give (the inverse of `settings_fields`). Unset (None) fields take
    the dataclass's defaults, or its tiny preset's where the resource's `model` is "tiny"."""
    names = names or {}
    given = {}
    for f in dataclasses.fields(settings):
        value = getattr(resource, names.get(f.name, f.name), None)
        if value is not None:
            given[f.name] = tuple(value) if isinstance(value, list) else value
    return settings.tiny(**given) if getattr(resource, "model", None) == "tiny" else settings(**given)


_RETRY_NAMES = {
    "attempts": "retry_attempts",
    "initial_delay": "retry_initial_delay",
    "max_delay": "retry_max_delay",
    "jitter": "retry_jitter",
    "deadline": "operation_deadline_seconds",
}
_STORAGE = _base(
    "Storage",
    settings_fields(StorageRetry, {
        "retry_attempts": "Tries per storage operation on transient errors (throttling, timeouts, 5xx).",
        "retry_initial_delay": "Seconds before the first retry; doubles each time.",
        "retry_max_delay": "Longest wait between two tries, in seconds.",
        "retry_jitter": "Each wait varies by up to this fraction, so that many workers do not retry in step.",
        "operation_deadline_seconds":
            "Longest a storage operation may take, retries included (plus a second per MiB moved).",
    }, _RETRY_NAMES),
    root_uri=(str, Field(description="Local folder or s3://bucket/prefix holding every artifact.")),
    s3_endpoint_url=(str | None, Field(default=None, description=(
        "Endpoint of an S3-compatible server (SeaweedFS, MinIO)."))),
)  # fmt: skip


class StorageResource(_STORAGE):
    """The one storage root of every artifact: a local folder or s3://bucket/prefix."""

    def root(self) -> StorageRoot:
        return StorageRoot(self.root_uri, self.s3_endpoint_url, retry=settings_of(self, StorageRetry, _RETRY_NAMES))

    def registry(self) -> ShardRegistry:
        return ShardRegistry(self.root())


_FIELD_NAMES = {"id": "id_field", "caption": "caption_field", "image": "image_fields", "source": "source_field"}
_CAPTION_SOURCE = _base(
    "CaptionSource",
    settings_fields(CaptionFields, {
        "id_field": "Field holding a record's own id (kept as `source_id`).",
        "caption_field": "Field holding the caption.",
        "image_fields": "Fields tried, in order, for the original image's path or URL (`image_ref`).",
        "source_field": "Field naming the record's source (optional).",
        "max_caption_chars": "Longer captions are malformed rows.",
    }, _FIELD_NAMES),
    input_uri=(str, Field(description="Folder (local or s3://) the sensor watches for new caption files.")),
    shard_rows=(int, Field(default=1000, description="Rows per shard (a 100M pool wants larger shards).")),
)  # fmt: skip


class CaptionSourceResource(_CAPTION_SOURCE):
    """Where raw caption files arrive, how they are cut into shards and which fields hold what."""

    def fields(self) -> CaptionFields:
        return settings_of(self, CaptionFields, _FIELD_NAMES)


_CURATION = _base(
    "Curation",
    settings_fields(RuleFilterSettings, {
        "alphanumeric_ratio_min": "Keep when the alphanumeric ratio is at least this.",
        "character_repetition_n": "n of the character n-grams.",
        "character_repetition_ratio_max": "Keep when the character repetition ratio is at most this.",
        "flagged_word_ratio_max": "Keep when the flagged-word ratio is at most this (0: one hit drops).",
        "flagged_words_lang": "Which list of flagged words.",
        "perplexity_max": "Keep when KenLM perplexity is at most this (only with a model).",
        "kenlm_model_path": "KenLM model; perplexity is skipped (and recorded so) when unset.",
        "sentencepiece_model_path": "SentencePiece model the KenLM model was trained with.",
        "special_character_ratio_min": "Keep when the special-character ratio is at least this ...",
        "special_character_ratio_max": "... and at most this.",
        "word_repetition_n": "n of the word n-grams.",
        "word_repetition_ratio_max": "Keep when the word repetition ratio is at most this.",
    }),
    workers=(int, Field(default=0, description="Processes that curate the shards of a run (0: one per CPU core).")),
)  # fmt: skip


class CurationResource(_CURATION):
    """Thresholds of the paper's Table 1 (appendix); keep when min <= stat <= max."""

    def settings(self) -> RuleFilterSettings:
        return settings_of(self, RuleFilterSettings)


_SYNTHESIS = _base(
    "Synthesis",
    settings_fields(SynthesisSettings, {
        "model": 'HF id, local folder, s3:// prefix, or "tiny".',
        "revision": "Pinned revision of the SDXL weights.",
        "refiner_model": "e.g. stabilityai/stable-diffusion-xl-refiner-1.0",
        "refiner_revision": "Pinned revision of the refiner.",
        "refiner_switch": "Hand-over point: the base's denoising_end and the refiner's denoising_start.",
        "height": "Image height in pixels.",
        "width": "Image width in pixels.",
        "steps": "Denoising steps.",
        "guidance_scale": "Classifier-free guidance scale.",
        "negative_prompt": "The negative prompt (empty, as the paper's).",
        "images_per_caption": "Candidates per caption (the best one is selected).",
        "dtype": "bf16, fp16 (SynthVLM's) or fp32.",
        "vae_fp32": "Decode the VAE in fp32.",
        "jpeg_quality": "JPEG quality of the stored images.",
        "batch_size": "Prompts per UNet call (execution only).",
        "compile": "torch.compile the UNet on CUDA (compiles once per process, ~80 s).",
        "fuse_qkv": "Fuse q/k/v projections into one matmul (execution only).",
        "deepcache_interval": (
            "Fast path, opt-in (changes the pixels; in the image key): the whole UNet every N-th step, its shallow "
            "blocks only in between (DeepCache); 1: off."
        ),
        "fp8_linear": (
            "Fast path, opt-in (changes the pixels; in the image key): the UNet's transformer linears as FP8 "
            "matmuls (bf16, GPUs of compute capability 8.9+)."
        ),
    }),
    cache_dir=(str | None, Field(default=None, description=CACHE_DIR)),
)  # fmt: skip


class SynthesisResource(_SYNTHESIS):
    """Image synthesis settings. `model` is a Hugging Face id, a local folder, an s3:// prefix, or "tiny"
    (small random SDXL built in code, for tests and the CPU demo: its images are meaningless)."""

    def settings(self) -> SynthesisSettings:
        return settings_of(self, SynthesisSettings)

    def generator_factory(self, s3_endpoint_url: str | None = None):
        """A callable that loads the pipeline (only called when an image must be generated)."""
        from synthvlm_assets.synthesis.sdxl import SDXLGenerator

        return lambda: SDXLGenerator.load(self.settings(), self.cache_dir, s3_endpoint_url)


_PAIR_FILTERS = _base(
    "PairFilter",
    settings_fields(PairFilterSettings, {
        "enabled": "Score (original image, caption) pairs; off: every caption passes.",
        "blip_model": 'BLIP ITM: HF id, local folder, s3:// prefix, or "tiny".',
        "clip_model": 'CLIP (transformers): HF id, local folder, s3:// prefix, or "tiny".',
        "itm_probability_min": "Keep when BLIP's image-text matching probability is at least this.",
        "clip_cosine_min": "Keep when the CLIP cosine is at least this.",
        "image_root": "Folder or s3:// prefix that relative image references are under.",
        "batch_size": "Pairs per forward pass.",
    }),
    cache_dir=(str | None, Field(default=None, description=CACHE_DIR)),
)  # fmt: skip


class PairFilterResource(_PAIR_FILTERS):
    """The paper's optional image-text filters on the captions' original web images (off by default)."""

    def settings(self) -> PairFilterSettings:
        return settings_of(self, PairFilterSettings)


_JUDGE = _base(
    "Judge",
    settings_fields(JudgeSettings, {
        "model": 'HF id, local folder, s3:// prefix, or "tiny".',
        "revision": "Pinned revision of the model.",
        "tokenizer": "Default: the model's tokenizer.",
        "backend": "auto (vllm on a GPU, else transformers), vllm, transformers or http.",
        "endpoint_url": "http backend: an OpenAI-compatible server, e.g. `vllm serve`.",
        "api_key_env": "http: the environment variable holding the bearer token, if any.",
        "batch_size": "Prompts per backend call (vLLM schedules them; transformers sorts them by length).",
        "batch_tokens": "transformers: padded caption tokens per forward pass (the shared prefix is computed once).",
        "max_caption_tokens": "Longer captions are rejected unjudged.",
        "forced_choice": "Restrict the answer to Yes/No (changes what counts as a parse failure).",
        "tensor_parallel_size": "vllm: GPUs per judge (70B bf16: 4-8); its step's pod requests as many.",
        "quantization": 'vllm: e.g. "fp8" (70B on 2 H100s).',
        "max_model_len": "vllm: the context length.",
        "concurrency": "http: requests in flight.",
        "timeout_s": "http: seconds per request.",
        "cache_every": "Verdicts are made durable every this many captions (how much a resumed run redoes).",
    }),
    cache_dir=(str | None, Field(default=None, description=CACHE_DIR)),
)  # fmt: skip


class JudgeResource(_JUDGE):
    """The paper's LLM judge. Llama-3-70B-Instruct through vLLM on GPU workers by default; "tiny" is a
    random toy Llama (meaningless verdicts) for tests and the CPU demo."""

    def settings(self) -> JudgeSettings:
        return settings_of(self, JudgeSettings)

    def gpus(self) -> int:
        """GPUs a judge step holds: none when a server judges (http), else one per tensor-parallel rank."""
        return 0 if self.backend == "http" else self.tensor_parallel_size


_CLIP_NAMES = {"model": "clip_model", "pretrained": "clip_pretrained", "prefix": "clip_prefix", "dtype": "clip_dtype"}
_SSIM_NAMES = {"size": "ssim_size", "low": "ssim_low"}
_SCORING = _base(
    "Scoring",
    settings_fields(ClipSettings, {
        "clip_model": 'open_clip name, e.g. ViT-B-32 or ViT-L-14-336; "tiny" offline.',
        "clip_pretrained": "open_clip pretrained tag, local file or s3:// file.",
        "clip_prefix": "Text before the caption.",
        "clip_dtype": "Precision of the CLIP towers on a GPU.",
        "batch_size": "Images per CLIP batch.",
        "decode": (
            "auto (device on a GPU, else workers), device (JPEG decode, resizes and grayscale on the GPU), "
            "device-resize (PIL decodes in CPU workers, the GPU resizes) or workers (decode and resizes in CPU "
            "processes). Execution only: resizes and grayscale are PIL's arithmetic; nvjpeg may decode a level off."
        ),
    }, _CLIP_NAMES),
    # SPEC §3 fixes SSIM's window and constants to scikit-image's defaults: only the sizes are settings.
    settings_fields(SSIMSettings, {
        "ssim_size": "SSIM: the size the image is resized to.",
        "ssim_low": "SSIM: the size of the round trip (the vision tower's input).",
    }, _SSIM_NAMES, exclude=("win_size", "k1", "k2")),
    workers=(int | None, Field(default=None, description=(
        "CPU processes decoding and resizing (default: all cores on a GPU box, 0 on a CPU)."))),
    cache_dir=(str | None, Field(default=None, description=CACHE_DIR)),
)  # fmt: skip


class ScoringResource(_SCORING):
    """Scoring: the CLIP model for CLIPScore (open_clip name + pretrained tag, a local file or an
    s3:// file; "tiny" for the random test model) and the SSIM sizes."""

    def clip_settings(self) -> ClipSettings:
        return settings_of(self, ClipSettings, _CLIP_NAMES)

    def ssim_settings(self) -> SSIMSettings:
        return settings_of(self, SSIMSettings, _SSIM_NAMES)

    def worker_count(self) -> int:
        import os

        if self.workers is not None:
            return self.workers
        import torch

        return min(16, os.cpu_count() or 1) if torch.cuda.is_available() else 0


_SELECTION = _base(
    "Selection",
    settings_fields(SelectionSettings, {
        "lam": "Weight of SSIM in the score.",
        "k": "How many captions to select.",
        "fraction": "Select this fraction of the scored captions instead of k.",
    }),
)  # fmt: skip


class SelectionResource(_SELECTION):
    """Selection: score = clip_score + lam * ssim; keep the global top k (or a fraction)."""

    def settings(self) -> SelectionSettings:
        return SelectionSettings(lam=self.lam, k=None if self.fraction is not None else self.k, fraction=self.fraction)


class TrainingResource(ConfigurableResource):
    """Training: the two pretrained parts (HF id, local folder or s3:// prefix at a pinned
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
    lr: float | None = Field(default=None, description="Stage-1 learning rate (1e-3).")
    epochs: int | None = Field(default=None, description="Stage-1 epochs (1).")
    warmup_ratio: float | None = Field(default=None, description="Warm-up fraction of the steps (0.03).")
    weight_decay: float | None = Field(default=None, description="Weight decay (0).")
    max_length: int | None = Field(default=None, description="Longest sequence in tokens (2048).")
    dtype: str | None = Field(default=None, description='"auto" (bf16 on GPUs), "bf16" or "fp32".')
    seed: int = Field(default=0, description="Seed of the projector's initialisation and the data order.")
    holdout_fraction: float | None = Field(
        default=None, description="Records kept out of training for the sanity evaluation."
    )
    checkpoint_every: int | None = Field(default=None, description="Optimizer steps between checkpoints.")
    gradient_checkpointing: bool = Field(
        default=False, description="Stage 1: recompute activations in the backward pass."
    )
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
    stage2_micro_batch: int | None = Field(default=None, description="Stage 2: per process and forward pass.")
    stage2_lr: float | None = Field(default=None, description="Stage 2: learning rate (2e-5).")
    stage2_epochs: int | None = Field(default=None, description="Stage 2: epochs (1).")
    fsdp: bool = Field(default=True, description="Stage 2: shard the model over the processes (FSDP).")
    stage2_gradient_checkpointing: bool | None = Field(
        default=None, description="Stage 2: on by default, as LLaVA's finetune."
    )
    eval_max_records: int = Field(
        default=256, description="Held-out records for the sanity evaluation's caption loss."
    )
    eval_retrieval_size: int = Field(default=16, description="Held-out items in the sanity evaluation's retrieval.")
    cache_dir: str | None = Field(default=None, description="Local cache for weights copied from s3://.")
    launcher: str = Field(default="subprocess", description=(
        '"subprocess": training runs beside the step (on Kubernetes: in the step\'s own GPU pod); "k8s": in a GPU pod '
        "of its own through Dagster Pipes (PipesK8sClient), with `processes` GPUs."))  # fmt: skip
    k8s_image: str | None = Field(
        default=None, description="The training pod's image (default: the run's own, DAGSTER_CURRENT_IMAGE)."
    )
    k8s_namespace: str | None = Field(default=None, description="Namespace of the training pod (launcher k8s).")
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
