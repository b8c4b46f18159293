"""Stage 1 of LLaVA-1.5 (SPEC §6): train the projector only on SynthVLM-100K, "plain" template.

A plain PyTorch loop (transformers 5's Trainer loses LLaVA's weights on resume), data parallel over
torchrun's processes (NCCL on GPUs, gloo on CPUs): each process runs its share of every global batch
and the projector's gradients are summed across processes before each optimizer step.

Under the storage root, per training run (`run_name`: dataset version + settings, so a retried run
resumes):

    llava_stage1/<run>/checkpoints/step-0000040/projector.safetensors   trainable weights only (fp32)
    llava_stage1/<run>/checkpoints/step-0000040/trainer_state.pt        optimizer, scheduler, step, RNG
    llava_stage1/<run>/checkpoints/step-0000040/rng-rank<r>.pt          each process's RNG state
    llava_stage1/<run>/checkpoints/step-0000040/_COMPLETE               written last
    llava_stage1/<run>/metrics/step-0000040.json                        one row per optimizer step (watchable)
    llava_stage1/<run>/projector.safetensors                            the trained projector
    llava_stage1/<run>/_result.json                                     written last: the run is complete
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.data import IGNORE_INDEX, PlainCollator, synthvlm_dataset
from synthvlm_assets.training.model import (
    ModelSettings,
    freeze_all_but_projector,
    load_model,
    projector_state,
    tiny_cpu_threads,
    vision_token_count,
)

ASSET = "llava_stage1"
COMPLETE = "_COMPLETE"
RESULT = "_result.json"


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
    stop_after_steps: int | None = None  # stop early (the schedule is unchanged): for interruption tests

    @classmethod
    def tiny_preset(cls, **overrides) -> Stage1Settings:
        """Small batches for the tiny model on a CPU (the demo); everything else as LLaVA-1.5."""
        return replace(cls(global_batch=16, micro_batch=8, holdout_fraction=0.1, checkpoint_every=5), **overrides)

    def recipe(self) -> dict:
        """The settings that change the result (not how it is executed)."""
        skip = {"micro_batch", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing", "num_workers", "stop_after_steps"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def run_name(dataset_version: str, model: ModelSettings, settings: Stage1Settings) -> str:
    digest = hashlib.sha256(json.dumps([model.describe(), settings.recipe()], sort_keys=True).encode()).hexdigest()[:10]
    return f"{dataset_version}-{digest}"


def step_indices(n: int, settings: Stage1Settings, step: int, steps_per_epoch: int) -> list[int]:
    """Dataset indices of one optimizer step's global batch: a seeded permutation per epoch, cut into
    global batches (the last one of an epoch may be smaller)."""
    import torch

    epoch, i = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return perm[i * settings.global_batch : (i + 1) * settings.global_batch]


def rank_micro_batches(indices: list[int], rank: int, world: int, micro_batch: int) -> list[list[int]]:
    mine = indices[rank::world]
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]


class _Dist:
    """torch.distributed when torchrun started several processes; a no-op otherwise."""

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dist = dist
        self.started_here = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.started_here = True

    def sum_(self, tensor):
        if self.world > 1:
            self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    def close(self) -> None:
        if self.started_here:
            self.dist.destroy_process_group()


def _torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)  # our own files: optimizer state and RNG tuples


def _rng_state() -> dict:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(storage: StorageRoot, run_prefix: str) -> list[tuple[int, str]]:
    """(step, prefix) of every checkpoint with its completion marker, oldest first."""
    out = []
    for key in storage.list(f"{run_prefix}/checkpoints"):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("step-") and storage.exists(f"{key}/{COMPLETE}"):
            out.append((int(name[5:]), key))
    return sorted(out)


def _save_projector(storage: StorageRoot, key: str, state: dict) -> None:
    from safetensors.torch import save

    storage.write_bytes(key, save(state))


def load_projector(storage: StorageRoot, key: str) -> dict:
    from safetensors.torch import load

    return load(storage.read_bytes(key))


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
    d = _Dist()
    try:
        with tiny_cpu_threads(model_settings):
            return _train(storage, model_settings, settings, report, cache_dir, d)
    finally:
        d.close()


def _train(
    storage: StorageRoot, model_settings: ModelSettings, settings: Stage1Settings, report: Callable[[dict], None] | None,
    cache_dir: str | None, d: _Dist,
) -> Stage1Result:  # fmt: skip
    import torch
    from transformers import get_cosine_schedule_with_warmup

    dataset, manifest = synthvlm_dataset(storage, "train", settings.holdout_fraction)
    if len(dataset) == 0:
        raise RuntimeError(f"no training records in {storage.uri(manifest['prefix'])} after holding out {settings.holdout_fraction:.0%}")
    per_step = d.world * settings.micro_batch
    if settings.global_batch % per_step:
        raise ValueError(
            f"global_batch={settings.global_batch} is not a multiple of processes ({d.world}) x micro_batch ({settings.micro_batch})"
        )
    accumulation = settings.global_batch // per_step
    steps_per_epoch = math.ceil(len(dataset) / settings.global_batch)
    total_steps = steps_per_epoch * settings.epochs
    run_prefix = f"{ASSET}/{run_name(manifest['version'], model_settings, settings)}"

    finished = storage.exists(f"{run_prefix}/{RESULT}")
    if finished:  # a complete run with the same data and recipe: nothing to train
        summary = storage.read_json(f"{run_prefix}/{RESULT}")
        return Stage1Result(run_prefix, summary["steps"], summary["samples"], summary["steps"], summary["losses"],
                            summary["samples_per_second"], summary["peak_memory_gib"], summary)  # fmt: skip

    cuda = d.device.type == "cuda"
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}[settings.dtype]
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
    model.train()
    collator = PlainCollator(processor, vision_token_count(model), settings.max_length)

    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(settings.warmup_ratio * total_steps), total_steps)
    start, losses = 0, []
    checkpoints = complete_checkpoints(storage, run_prefix)
    if checkpoints:
        start, ckpt = checkpoints[-1]
        model.model.multi_modal_projector.load_state_dict(load_projector(storage, f"{ckpt}/projector.safetensors"))
        state = _torch_load(storage.read_bytes(f"{ckpt}/trainer_state.pt"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        losses = state["losses"]
        rng_key = f"{ckpt}/rng-rank{d.rank}.pt"
        if storage.exists(rng_key):
            _set_rng_state(_torch_load(storage.read_bytes(rng_key)))
    resumed_from = start

    end = total_steps if settings.stop_after_steps is None else min(total_steps, settings.stop_after_steps)
    plan = [(s, mb) for s in range(start, end) for mb in rank_micro_batches(
        step_indices(len(dataset), settings, s, steps_per_epoch), d.rank, d.world, settings.micro_batch)]  # fmt: skip
    loader = torch.utils.data.DataLoader(
        _Indexed(dataset), batch_sampler=[mb for _, mb in plan], collate_fn=collator, num_workers=settings.num_workers,
        pin_memory=cuda, persistent_workers=False,
    )  # fmt: skip
    batches = iter(loader)
    if cuda:
        torch.cuda.reset_peak_memory_stats(d.device)
    t_start, samples_done = time.perf_counter(), 0
    plan_pos = 0
    for step in range(start, end):
        t_step = time.perf_counter()
        micro = []  # this process's micro-batches of the step (none when the last batch is small)
        while plan_pos < len(plan) and plan[plan_pos][0] == step:
            micro.append(next(batches))
            plan_pos += 1
        step_loss, step_samples, grad_norm, lr = optimizer_step(model, micro, params, optimizer, scheduler, d, dtype, settings.max_grad_norm)
        losses.append(step_loss)
        samples_done += step_samples
        dt = time.perf_counter() - t_step
        row = {"step": step + 1, "total_steps": total_steps, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
               "samples": step_samples, "samples_per_second": step_samples / dt if dt > 0 else 0.0,
               "gpu_memory_gib": torch.cuda.max_memory_allocated(d.device) / 2**30 if cuda else 0.0}  # fmt: skip
        if d.rank == 0:
            storage.write_bytes(f"{run_prefix}/metrics/step-{step + 1:07d}.json", json.dumps(row).encode())
            if report:
                report(row)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == total_steps:
            _checkpoint(storage, d, run_prefix, step + 1, model, optimizer, scheduler, losses, settings.keep_checkpoints)
    elapsed = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(d.device) / 2**30 if cuda else 0.0
    sps = samples_done / elapsed if elapsed > 0 else 0.0
    summary = {"steps": end, "total_steps": total_steps, "samples": sum(
        len(step_indices(len(dataset), settings, s, steps_per_epoch)) for s in range(end)),  # fmt: skip
        "losses": losses, "samples_per_second": sps, "peak_memory_gib": peak, "processes": d.world,
        "accumulation": accumulation, "device": str(d.device) if not cuda else torch.cuda.get_device_name(d.device),
        "dataset_version": manifest["version"], "dataset_records": manifest["records"], "train_records": len(dataset),
        "model": model_settings.describe(), "recipe": settings.recipe(), "micro_batch": settings.micro_batch,
        "resumed_from_step": resumed_from, "tiny": model_settings.tiny}  # fmt: skip
    if end == total_steps and d.rank == 0:
        _save_projector(storage, f"{run_prefix}/projector.safetensors", projector_state(model))
        storage.write_json(f"{run_prefix}/{RESULT}", summary)  # written last: the run is complete
    d.barrier()
    return Stage1Result(run_prefix, end, summary["samples"], resumed_from, losses, sps, peak, summary)


class _Indexed:
    """Dataset wrapper the DataLoader indexes (keeps the dataset picklable for worker processes)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]


def optimizer_step(model, micro: list[dict], params: list, optimizer, scheduler, d: _Dist | None, dtype, max_grad_norm: float):
    """One optimizer step over this process's micro-batches of a global batch. The loss is the mean
    over all the global batch's caption tokens (across processes), so the result does not depend on how
    the batch is split into processes and micro-batches. Returns (loss, samples, grad norm, lr)."""
    import torch

    device = params[0].device
    counts = torch.tensor([float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)),
                           float(sum(b["labels"].shape[0] for b in micro))], device=device)  # fmt: skip
    if d is not None:
        d.sum_(counts)
    tokens, samples = counts[0].item(), int(counts[1].item())
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for b in micro:
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        b["pixel_values"] = b["pixel_values"].to(dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = token_loss_sum(model, b)
        (loss / tokens).backward()
        loss_sum += loss.detach().double()
    for p in params:  # data parallel: every process applies the same summed gradient
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if d is not None:
            d.sum_(p.grad)
    if d is not None:
        d.sum_(loss_sum)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    lr = scheduler.get_last_lr()[0] if scheduler is not None else optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return (loss_sum / tokens).item(), samples, grad_norm, lr


def token_loss_sum(model, batch: dict):
    """Summed cross-entropy over the caption tokens (next-token prediction), in fp32. The LM head runs
    only from the first caption position on (the plain template puts the image tokens first), so the
    576 image positions never make vocabulary-sized logits."""
    import torch

    labels = batch["labels"]
    valid = labels != IGNORE_INDEX
    first = int(valid.int().argmax(1)[valid.any(1)].min()) if valid.any() else labels.shape[1] - 1
    start = max(first - 1, 0)  # the position whose logits predict the first caption token
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                   logits_to_keep=labels.shape[1] - start).logits  # fmt: skip
    target = labels[:, start + 1 :]
    keep = target != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum")


def _checkpoint(storage: StorageRoot, d: _Dist, run_prefix: str, step: int, model, optimizer, scheduler, losses: list, keep: int) -> None:
    prefix = f"{run_prefix}/checkpoints/step-{step:07d}"
    storage.write_bytes(f"{prefix}/rng-rank{d.rank}.pt", _torch_bytes(_rng_state()))
    d.barrier()  # every process's RNG is written before the marker
    if d.rank == 0:
        _save_projector(storage, f"{prefix}/projector.safetensors", projector_state(model))
        storage.write_bytes(f"{prefix}/trainer_state.pt", _torch_bytes(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "losses": list(losses)}))  # fmt: skip
        storage.write_json(f"{prefix}/{COMPLETE}", {"step": step, "world_size": d.world})
        for _, old in complete_checkpoints(storage, run_prefix)[:-keep]:
            storage.delete(old)
    d.barrier()
