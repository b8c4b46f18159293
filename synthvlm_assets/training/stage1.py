"""Stage 1 of LLaVA-1.5 (SPEC §6): train the projector only on SynthVLM-100K, "plain" template, with
the shared loop (`loop.py`: data parallel over torchrun's processes, each summing the projector's
gradients; resumable checkpoints).

Under the storage root, per training run (`run_name`: dataset version + settings, so a retried run
resumes):

    llava_stage1/<run>/checkpoints/step-0000040/...     loop.py's checkpoint (weights: projector.safetensors)
    llava_stage1/<run>/metrics/step-0000040.json        one row per optimizer step (watchable)
    llava_stage1/<run>/projector.safetensors            the trained projector
    llava_stage1/<run>/_result.json                     written last: the run is complete
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.data import PlainCollator, synthvlm_dataset
from synthvlm_assets.training.loop import (
    COMPLETE,
    RESULT,
    Distributed,
    LoopSettings,
    RunResult,
    Trainee,
    complete_checkpoints,
    compute_dtype,
    finish_run,
    finished_run,
    first_label_position,
    label_cross_entropy_sum,
    optimizer_step,
    step_indices,
    train_loop,
)
from synthvlm_assets.training.model import (
    COMPILED_LENGTH_MULTIPLE,
    ModelSettings,
    compile_layers,
    freeze_all_but_projector,
    load_model,
    projector_state,
    tiny_cpu_threads,
    vision_token_count,
)

__all__ = ["COMPLETE", "RESULT", "Stage1Settings", "complete_checkpoints", "optimizer_step", "step_indices",
           "token_loss_sum", "train_stage1"]  # fmt: skip

PROJECTOR = "projector.safetensors"
ASSET = "llava_stage1"


@dataclass(frozen=True)
class Stage1Settings(LoopSettings):
    """LLaVA-1.5's stage-1 recipe (scripts/v1_5/pretrain.sh: the loop's defaults) plus how it is executed.
    `seed` orders the data; the projector's initialisation is ModelSettings.seed."""

    holdout_fraction: float = 0.01  # records kept out of training for the sanity evaluation
    # Execution only: regional torch.compile of the vision and decoder layers; None = on when training on
    # CUDA (1.44x the eager step's samples/s for the 7B shape on an H100: README, Training).
    compile: bool | None = None

    EXECUTION: ClassVar[frozenset[str]] = LoopSettings.EXECUTION | {"compile"}

    @classmethod
    def tiny_preset(cls, **overrides) -> Stage1Settings:
        """Small batches for the tiny model on a CPU (the demo); everything else as LLaVA-1.5."""
        return replace(cls(global_batch=16, micro_batch=8, holdout_fraction=0.1, checkpoint_every=5), **overrides)


def run_name(dataset_version: str, model: ModelSettings, settings: Stage1Settings) -> str:
    digest = hashlib.sha256(json.dumps([model.describe(), settings.recipe()], sort_keys=True).encode()).hexdigest()[
        :10
    ]
    return f"{dataset_version}-{digest}"


def train_stage1(
    storage: StorageRoot,
    model_settings: ModelSettings,
    settings: Stage1Settings,
    report: Callable[[dict], None] | None = None,
    cache_dir: str | None = None,
) -> RunResult:
    """Train (or resume, or find finished) one stage-1 run on the current `synthvlm_100k`.
    Every process of a torchrun launch calls this; only rank 0 writes the shared files."""
    d = Distributed()
    try:
        with tiny_cpu_threads(model_settings):
            return _train(storage, model_settings, settings, report, cache_dir, d)
    finally:
        d.close()


def _train(
    storage: StorageRoot,
    model_settings: ModelSettings,
    settings: Stage1Settings,
    report: Callable[[dict], None] | None,
    cache_dir: str | None,
    d: Distributed,
) -> RunResult:
    dataset, manifest = synthvlm_dataset(storage, "train", settings.holdout_fraction)
    if len(dataset) == 0:
        raise RuntimeError(
            f"no training records in {storage.uri(manifest['prefix'])} after holding out "
            f"{settings.holdout_fraction:.0%}"
        )
    run_prefix = f"{ASSET}/{run_name(manifest['version'], model_settings, settings)}"
    finished = finished_run(storage, run_prefix)
    if finished is not None:
        return finished

    dtype = compute_dtype(settings.dtype, d.device)
    model, processor = load_model(
        model_settings, dtype=dtype, cache_dir=cache_dir, s3_endpoint_url=storage.s3_endpoint_url
    )
    # Frozen parts in the compute dtype (half the memory of fp32 + autocast), the projector in fp32.
    model.to(d.device)
    model.model.vision_tower.to(dtype)
    model.model.language_model.to(dtype)
    model.lm_head.to(dtype)
    params = freeze_all_but_projector(model)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    compiled = settings.compile or (settings.compile is None and d.device.type == "cuda")
    if compiled:
        compile_layers(model)
    model.train()
    projector = model.model.multi_modal_projector
    collator = PlainCollator(processor, vision_token_count(model), settings.max_length,
                             pad_to_multiple_of=COMPILED_LENGTH_MULTIPLE if compiled else 1)  # fmt: skip
    trainee = Trainee(
        model=model,
        params=params,
        collator=collator,
        loss_sum=token_loss_sum,
        weights_file=PROJECTOR,
        trainable_state=lambda: projector_state(model),
        load_trainable_state=projector.load_state_dict,
    )
    loop = train_loop(storage, d, run_prefix, dataset, trainee, settings, dtype, report)
    facts = {
        "dataset_version": manifest["version"],
        "dataset_records": manifest["records"],
        "train_records": len(dataset),
        "model": model_settings.describe(),
        "recipe": settings.recipe(),
        "micro_batch": settings.micro_batch,
        "tiny": model_settings.tiny,
    }
    trained = projector_state(model) if loop.steps == loop.total_steps else None
    return finish_run(storage, d, run_prefix, loop, facts, PROJECTOR, trained)


def token_loss_sum(model, batch: dict):
    """Summed cross-entropy over the caption tokens (next-token prediction), in fp32, through
    transformers' own LLaVA forward (the LM head only from the first caption position on)."""
    labels = batch["labels"]
    start = first_label_position(labels)
    # No attention mask: the collator pads on the right, so under the causal mask no real token attends to
    # padding, and SDPA keeps its causal kernels (an explicit mask takes it off them). use_cache=False:
    # a KV cache in training only costs memory (and made compiled layers recompile per layer).
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                   logits_to_keep=labels.shape[1] - start, use_cache=False).logits  # fmt: skip
    return label_cross_entropy_sum(logits, labels, start)
