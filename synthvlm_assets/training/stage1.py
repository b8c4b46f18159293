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
from dataclasses import asdict, dataclass, replace

from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.data import PlainCollator, synthvlm_dataset
from synthvlm_assets.training.loop import (
    COMPLETE,
    RESULT,
    Distributed,
    Trainee,
    complete_checkpoints,
    compute_dtype,
    first_label_position,
    label_cross_entropy_sum,
    load_weights,
    optimizer_step,
    save_weights,
    step_indices,
    train_loop,
)
from synthvlm_assets.training.model import (
    ModelSettings,
    compile_layers,
    freeze_all_but_projector,
    load_model,
    projector_state,
    tiny_cpu_threads,
    vision_token_count,
)

__all__ = ["COMPLETE", "RESULT", "Stage1Settings", "complete_checkpoints", "load_projector", "optimizer_step", "step_indices",
           "token_loss_sum", "train_stage1"]  # fmt: skip

PROJECTOR = "projector.safetensors"
ASSET = "llava_stage1"


@dataclass(frozen=True)
class Stage1Settings:
    """LLaVA-1.5's stage-1 recipe (scripts/v1_5/pretrain.sh) plus how it is executed."""

    global_batch: int = 256  # = processes x micro_batch x accumulation
    micro_batch: int = 16  # per process and forward pass (execution only)
    lr: float = 1e-3
    epochs: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # HF Trainer's default, which LLaVA trains with
    max_length: int = 2048
    dtype: str = "auto"  # bf16 on a GPU, fp32 on a CPU
    seed: int = 0  # data order (the projector's initialisation is ModelSettings.seed)
    holdout_fraction: float = 0.01  # records kept out of training for the sanity evaluation
    checkpoint_every: int = 50  # optimizer steps
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False  # execution only: trades speed for memory
    num_workers: int = 0  # image decoding processes per training process
    compile: bool = False  # execution only: regional torch.compile of the vision and decoder layers
    stop_after_steps: int | None = None  # stop early (the schedule is unchanged): for interruption tests

    @classmethod
    def tiny_preset(cls, **overrides) -> Stage1Settings:
        """Small batches for the tiny model on a CPU (the demo); everything else as LLaVA-1.5."""
        return replace(cls(global_batch=16, micro_batch=8, holdout_fraction=0.1, checkpoint_every=5), **overrides)

    def recipe(self) -> dict:
        """The settings that change the result (not how it is executed)."""
        skip = {"micro_batch", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing", "num_workers", "compile", "stop_after_steps"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def run_name(dataset_version: str, model: ModelSettings, settings: Stage1Settings) -> str:
    digest = hashlib.sha256(json.dumps([model.describe(), settings.recipe()], sort_keys=True).encode()).hexdigest()[:10]
    return f"{dataset_version}-{digest}"


def load_projector(storage: StorageRoot, key: str) -> dict:
    """A projector's weights under transformers' names (`linear_1.weight`, ...)."""
    return load_weights(storage, key)


@dataclass
class Stage1Result:
    run_prefix: str
    steps: int
    samples: int
    resumed_from_step: int
    losses: list[float]
    samples_per_second: float
    peak_memory_gib: float
    summary: dict


def train_stage1(
    storage: StorageRoot,
    model_settings: ModelSettings,
    settings: Stage1Settings,
    report: Callable[[dict], None] | None = None,
    cache_dir: str | None = None,
) -> Stage1Result:
    """Train (or resume, or find finished) one stage-1 run on the current `synthvlm_100k`.
    Every process of a torchrun launch calls this; only rank 0 writes the shared files."""
    d = Distributed()
    try:
        with tiny_cpu_threads(model_settings):
            return _train(storage, model_settings, settings, report, cache_dir, d)
    finally:
        d.close()


def _result(run_prefix: str, summary: dict) -> Stage1Result:
    return Stage1Result(run_prefix, summary["steps"], summary["samples"], summary["resumed_from_step"], summary["losses"],
                        summary["samples_per_second"], summary["peak_memory_gib"], summary)  # fmt: skip


def _train(
    storage: StorageRoot, model_settings: ModelSettings, settings: Stage1Settings, report: Callable[[dict], None] | None,
    cache_dir: str | None, d: Distributed,
) -> Stage1Result:  # fmt: skip
    dataset, manifest = synthvlm_dataset(storage, "train", settings.holdout_fraction)
    if len(dataset) == 0:
        raise RuntimeError(f"no training records in {storage.uri(manifest['prefix'])} after holding out {settings.holdout_fraction:.0%}")
    run_prefix = f"{ASSET}/{run_name(manifest['version'], model_settings, settings)}"
    if storage.exists(f"{run_prefix}/{RESULT}"):  # a complete run with the same data and recipe: nothing to train
        summary = storage.read_json(f"{run_prefix}/{RESULT}")
        return _result(run_prefix, {**summary, "resumed_from_step": summary["steps"]})

    dtype = compute_dtype(settings.dtype, d.device)
    model, processor = load_model(model_settings, dtype=dtype, cache_dir=cache_dir, s3_endpoint_url=storage.s3_endpoint_url)
    # Frozen parts in the compute dtype (half the memory of fp32 + autocast), the projector in fp32.
    model.to(d.device)
    model.model.vision_tower.to(dtype)
    model.model.language_model.to(dtype)
    model.lm_head.to(dtype)
    params = freeze_all_but_projector(model)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if settings.compile:
        compile_layers(model)
    model.train()
    projector = model.model.multi_modal_projector
    trainee = Trainee(
        model=model, params=params, collator=PlainCollator(processor, vision_token_count(model), settings.max_length),
        loss_sum=token_loss_sum, weights_file=PROJECTOR, trainable_state=lambda: projector_state(model),
        load_trainable_state=lambda read: projector.load_state_dict(read()),
    )  # fmt: skip
    loop = train_loop(storage, d, run_prefix, dataset, trainee, settings, dtype, report)
    cuda = d.device.type == "cuda"
    summary = {"steps": loop.steps, "total_steps": loop.total_steps, "samples": loop.samples, "losses": loop.losses,
               "samples_per_second": loop.samples_per_second, "peak_memory_gib": loop.peak_memory_gib, "processes": d.world,
               "accumulation": loop.accumulation, "device": torch_device_name(d.device) if cuda else str(d.device),
               "dataset_version": manifest["version"], "dataset_records": manifest["records"], "train_records": len(dataset),
               "model": model_settings.describe(), "recipe": settings.recipe(), "micro_batch": settings.micro_batch,
               "resumed_from_step": loop.resumed_from_step, "tiny": model_settings.tiny}  # fmt: skip
    if loop.steps == loop.total_steps and d.rank == 0:
        save_weights(storage, f"{run_prefix}/{PROJECTOR}", projector_state(model))
        storage.write_json(f"{run_prefix}/{RESULT}", summary)  # written last: the run is complete
    d.barrier()
    return _result(run_prefix, summary)


def torch_device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)


def token_loss_sum(model, batch: dict):
    """Summed cross-entropy over the caption tokens (next-token prediction), in fp32, through
    transformers' own LLaVA forward (the LM head only from the first caption position on)."""
    labels = batch["labels"]
    start = first_label_position(labels)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                   logits_to_keep=labels.shape[1] - start).logits  # fmt: skip
    return label_cross_entropy_sum(logits, labels, start)
