"""The training loop both LLaVA-1.5 stages share (SPEC §6): a plain PyTorch loop over torchrun's
processes (NCCL on GPUs, gloo on CPUs). Not transformers' Trainer: in 5.x it saves LLaVA checkpoints
under the legacy key names and resumes with a plain `load_state_dict`, so no weight is restored
(test_trainer_resume_claim.py shows it and fails once that is fixed).

Each optimizer step is one global batch: a seeded permutation per epoch cut into global batches,
each process taking its share in micro-batches. The loss is the mean over all the global batch's
label tokens, so the result does not depend on how the batch is split. A stage hands the loop a
`Trainee` (what to call, what trains, how its weights are gathered and restored); stage 1 sums the
projector's gradients itself, stage 2 lets FSDP shard the model and reduce its gradients.

Checkpoints, under the run's prefix in the storage root:

    <run>/checkpoints/step-0000040/<weights_file>      the trainable weights only (fp32 safetensors)
    <run>/checkpoints/step-0000040/shards/             or, under FSDP, every process's shards of weights
                                                       and optimizer state (torch.distributed.checkpoint)
    <run>/checkpoints/step-0000040/trainer_state.pt    optimizer (unless sharded), scheduler, step, losses
    <run>/checkpoints/step-0000040/rng-rank<r>.pt      each process's RNG state
    <run>/checkpoints/step-0000040/_COMPLETE           written last
    <run>/metrics/step-0000040.json                    one row per optimizer step (watchable)
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.data import IGNORE_INDEX

COMPLETE = "_COMPLETE"
RESULT = "_result.json"
SHARDS = "shards"  # a sharded checkpoint's torch.distributed.checkpoint folder


class Distributed:
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


def torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_load(data: bytes) -> Any:
    """Training state saved by `torch_bytes`, unpickled with weights_only=True: the storage root is shared, so a
    file there must not be able to run code when a run resumes. Only what our state holds is allowed beyond
    tensors and plain containers: numpy's RNG state (an array of uint32)."""
    import numpy as np
    import torch

    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(io.BytesIO(data), weights_only=True)


def save_weights(storage: StorageRoot, key: str, state: dict) -> None:
    from safetensors.torch import save

    storage.write_bytes(key, save(state))


def load_weights(storage: StorageRoot, key: str) -> dict:
    from safetensors.torch import load

    return load(storage.read_bytes(key))


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


def step_indices(n: int, settings: LoopSettings, step: int, steps_per_epoch: int) -> list[int]:
    """Dataset indices of one optimizer step's global batch: a seeded permutation per epoch, cut into
    global batches (the last one of an epoch may be smaller)."""
    epoch, i = divmod(step, steps_per_epoch)
    return _epoch_permutation(n, settings.seed, epoch)[i * settings.global_batch : (i + 1) * settings.global_batch]


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """Drawn once per epoch, not once per step (LLaVA-665K: 5,200 steps over a 665K permutation)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def rank_micro_batches(indices: list[int], rank: int, world: int, micro_batch: int) -> list[list[int]]:
    mine = indices[rank::world]
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]


def compute_dtype(setting: str, device):
    import torch

    return {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "bf16": torch.bfloat16,
        "fp32": torch.float32,
    }[setting]


def local_state(model, names: list[str]) -> dict:
    """The named weights of an unsharded model, fp32 on the CPU."""
    state = model.state_dict()
    return {n: state[n].detach().float().cpu().contiguous() for n in names}


@dataclass(frozen=True)
class LoopSettings:
    """What the loop reads: the recipe's batch, schedule and optimizer (LLaVA-1.5's stage-1 values
    here; each stage's settings override its own) and how the run executes."""

    global_batch: int = 256  # = processes x micro_batch x accumulation
    micro_batch: int = 16  # per process and forward pass (execution only)
    lr: float = 1e-3
    epochs: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # HF Trainer's default, which LLaVA trains with
    max_length: int = 2048
    dtype: str = "auto"  # bf16 compute on a GPU, fp32 on a CPU
    seed: int = 0  # data order
    checkpoint_every: int = 50  # optimizer steps
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False  # execution only: trades speed for memory
    num_workers: int = 0  # image decoding processes per training process
    stop_after_steps: int | None = None  # stop early (the schedule is unchanged): for interruption tests

    # Fields that say how a run executes, not what it computes: left out of the run's name.
    EXECUTION: ClassVar[frozenset[str]] = frozenset(
        {
            "micro_batch",
            "checkpoint_every",
            "keep_checkpoints",
            "gradient_checkpointing",
            "num_workers",
            "stop_after_steps",
        }
    )

    def recipe(self) -> dict:
        """The settings that change the result (not how it is executed)."""
        return {k: v for k, v in asdict(self).items() if k not in self.EXECUTION}


@dataclass
class Trainee:
    """What a stage hands the loop. `loss_sum(model, batch)` returns the summed cross-entropy over the
    batch's label tokens. Unsharded, rank 0 writes the trainable weights (`trainable_state()`) and the
    optimizer's state, and every process restores them (`load_trainable_state`); sharded (FSDP), every
    process writes and reads its own shards of both at a URI (torch.distributed.checkpoint) and
    `trainable_state()` gathers the final weights."""

    model: Any
    params: list
    collator: Callable[[list], dict]
    loss_sum: Callable[[Any, dict], Any]
    weights_file: str
    trainable_state: Callable[[], dict]
    load_trainable_state: Callable[[dict], None] | None = None
    save_shards: Callable[[str, Any], None] | None = None  # (uri, optimizer): FSDP
    load_shards: Callable[[str, Any], None] | None = None

    @property
    def sharded(self) -> bool:
        """FSDP: each process checkpoints its shards, and FSDP reduces the gradients itself."""
        return self.save_shards is not None


@dataclass
class LoopResult:
    steps: int
    total_steps: int
    samples: int  # samples of all steps up to `steps` (resumed ones included)
    resumed_from_step: int
    losses: list[float]
    samples_per_second: float
    peak_memory_gib: float
    accumulation: int


@dataclass
class RunResult:
    """One training run: where it lives, what the loop did, and its `_result.json` summary (the loop's
    figures and the stage's own facts)."""

    run_prefix: str
    loop: LoopResult
    summary: dict


def finished_run(storage: StorageRoot, run_prefix: str) -> RunResult | None:
    """The run under `run_prefix` if it is complete (same data and recipe: nothing to train)."""
    if not storage.exists(f"{run_prefix}/{RESULT}"):
        return None
    summary = storage.read_json(f"{run_prefix}/{RESULT}")
    loop = LoopResult(**{f.name: summary[f.name] for f in fields(LoopResult)})
    return RunResult(run_prefix, replace(loop, resumed_from_step=loop.steps), summary)


def finish_run(storage: StorageRoot, d: Distributed, run_prefix: str, loop: LoopResult, facts: dict, weights_file: str,
               trained: dict | None) -> RunResult:  # fmt: skip
    """Rank 0 writes a complete run's trained weights, then `_result.json` last (the run is complete)."""
    summary = {**asdict(loop), "processes": d.world, "device": device_name(d.device), **facts}
    if loop.steps == loop.total_steps and d.rank == 0:
        save_weights(storage, f"{run_prefix}/{weights_file}", trained)
        storage.write_json(f"{run_prefix}/{RESULT}", summary)
    d.barrier()
    return RunResult(run_prefix, loop, summary)


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def train_loop(
    storage: StorageRoot, d: Distributed, run_prefix: str, dataset, trainee: Trainee, settings: LoopSettings, dtype,
    report: Callable[[dict], None] | None = None,
) -> LoopResult:  # fmt: skip
    """Train `trainee` on `dataset` with the settings' recipe (AdamW, warm-up + cosine), resuming from
    the newest complete checkpoint under `run_prefix`."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    per_step = d.world * settings.micro_batch
    if settings.global_batch % per_step:
        raise ValueError(
            f"global_batch={settings.global_batch} is not a multiple of processes ({d.world}) x micro_batch "
            f"({settings.micro_batch})"
        )
    accumulation = settings.global_batch // per_step
    steps_per_epoch = math.ceil(len(dataset) / settings.global_batch)
    total_steps = steps_per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(
        trainee.params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.999), eps=1e-8
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(settings.warmup_ratio * total_steps), total_steps)
    start, losses = 0, []
    checkpoints = complete_checkpoints(storage, run_prefix)
    if checkpoints:
        start, ckpt = checkpoints[-1]
        state = torch_load(storage.read_bytes(f"{ckpt}/trainer_state.pt"))
        if trainee.load_shards is not None:
            trainee.load_shards(storage.uri(f"{ckpt}/{SHARDS}"), optimizer)
        else:
            trainee.load_trainable_state(load_weights(storage, f"{ckpt}/{trainee.weights_file}"))
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        losses = state["losses"]
        rng_key = f"{ckpt}/rng-rank{d.rank}.pt"
        if storage.exists(rng_key):
            _set_rng_state(torch_load(storage.read_bytes(rng_key)))
    resumed_from = start

    end = total_steps if settings.stop_after_steps is None else min(total_steps, settings.stop_after_steps)
    plan = [(s, mb) for s in range(start, end) for mb in rank_micro_batches(
        step_indices(len(dataset), settings, s, steps_per_epoch), d.rank, d.world, settings.micro_batch)]  # fmt: skip
    cuda = d.device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[mb for _, mb in plan], collate_fn=trainee.collator, num_workers=settings.num_workers,
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
        step_loss, step_samples, grad_norm, lr = optimizer_step(
            trainee.model,
            micro,
            trainee.params,
            optimizer,
            scheduler,
            d,
            dtype,
            settings.max_grad_norm,
            trainee.loss_sum,
            trainee.sharded,
        )
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
            _checkpoint(
                storage, d, run_prefix, step + 1, trainee, optimizer, scheduler, losses, settings.keep_checkpoints
            )
    elapsed = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(d.device) / 2**30 if cuda else 0.0
    samples = sum(
        min(settings.global_batch, len(dataset) - (s % steps_per_epoch) * settings.global_batch) for s in range(end)
    )
    return LoopResult(
        end,
        total_steps,
        samples,
        resumed_from,
        losses,
        samples_done / elapsed if elapsed > 0 else 0.0,
        peak,
        accumulation,
    )


def optimizer_step(
    model, micro: list[dict], params: list, optimizer, scheduler, d: Distributed | None, dtype, max_grad_norm: float,
    loss_sum: Callable[[Any, dict], Any], sharded: bool = False,
):  # fmt: skip
    """One optimizer step over this process's micro-batches of a global batch. The loss is the mean
    over all the global batch's label tokens (across processes). Returns (loss, samples, grad norm, lr)."""
    import torch

    device = next(iter(model.parameters())).device
    counts = torch.tensor([float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)),
                           float(sum(b["labels"].shape[0] for b in micro))], device=device)  # fmt: skip
    if d is not None:
        d.sum_(counts)
    tokens, samples = max(counts[0].item(), 1.0), int(counts[1].item())
    # FSDP averages gradients over processes; the loss is scaled back so they sum, as the unsharded path does.
    scale = (d.world if d is not None else 1) if sharded else 1
    loss_total = torch.zeros((), device=device, dtype=torch.float64)
    for b in micro:
        b = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        b["pixel_values"] = b["pixel_values"].to(dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and not sharded):
            loss = loss_sum(model, b)
        (loss * (scale / tokens)).backward()
        loss_total += loss.detach().double()
    if not sharded:
        for p in params:  # data parallel: every process applies the same summed gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if d is not None:
                d.sum_(p.grad)
    if d is not None:
        d.sum_(loss_total)
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
    grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # a DTensor under FSDP
    lr = scheduler.get_last_lr()[0] if scheduler is not None else optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return (loss_total / tokens).item(), samples, grad_norm, lr


def label_cross_entropy_sum(logits, labels, start: int):
    """Summed next-token cross-entropy in fp32 of `logits` (positions `start`.. of the sequence) against
    the labels that follow them."""
    import torch

    target = labels[:, start + 1 :]
    keep = target != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[:, : target.shape[1]][keep].float(), target[keep], reduction="sum")


def first_label_position(labels) -> int:
    """The position whose logits predict the batch's first label token: the LM head runs only from
    there on, so the (576) image positions before it never make vocabulary-sized logits."""
    valid = labels != IGNORE_INDEX
    first = int(valid.int().argmax(1)[valid.any(1)].min()) if valid.any() else labels.shape[1] - 1
    return max(first - 1, 0)


def _checkpoint(
    storage: StorageRoot,
    d: Distributed,
    run_prefix: str,
    step: int,
    trainee: Trainee,
    optimizer,
    scheduler,
    losses: list,
    keep: int,
) -> None:
    prefix = f"{run_prefix}/checkpoints/step-{step:07d}"
    storage.write_bytes(f"{prefix}/rng-rank{d.rank}.pt", torch_bytes(_rng_state()))
    state = {"scheduler": scheduler.state_dict(), "step": step, "losses": list(losses)}
    if trainee.save_shards is not None:
        trainee.save_shards(storage.uri(f"{prefix}/{SHARDS}"), optimizer)  # every process its shards
    else:
        weights, state["optimizer"] = trainee.trainable_state(), optimizer.state_dict()
    d.barrier()  # every process's files are written before the marker
    if d.rank == 0:
        if trainee.save_shards is None:
            save_weights(storage, f"{prefix}/{trainee.weights_file}", weights)
        storage.write_bytes(f"{prefix}/trainer_state.pt", torch_bytes(state))
        storage.write_json(f"{prefix}/{COMPLETE}", {"step": step, "world_size": d.world})
        for _, old in complete_checkpoints(storage, run_prefix)[:-keep]:
            storage.delete(old)
    d.barrier()
