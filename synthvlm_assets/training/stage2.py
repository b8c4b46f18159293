"""Stage 2 of LLaVA-1.5 (SPEC §6): instruction tuning on a LLaVA-665K-format JSON the user provides.
The projector (from a stage-1 run) and the whole LLM train, the vision tower stays frozen;
"vicuna_v1" conversations with the loss on the answers; LLaVA-1.5's finetune recipe (global batch 128,
lr 2e-5, 1 epoch, warm-up 3%, cosine, weight decay 0, bf16). With several processes the model is
sharded with FSDP (PyTorch's `fully_shard`: each vision and decoder layer a unit, fp32
master weights, bf16 compute); the shared loop (`loop.py`) runs it and checkpoints it.

    llava_stage2/<run>/checkpoints/step-0000040/...   loop.py's checkpoint (sharded under FSDP, else
                                                      trainable.safetensors)
    llava_stage2/<run>/metrics/step-0000040.json      one row per optimizer step
    llava_stage2/<run>/trainable.safetensors          the trained projector + LLM (LlavaForConditionalGeneration
                                                      names, fp32)
    llava_stage2/<run>/_result.json                   written last: the run is complete
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.data import ConversationCollator, DatasetError, InstructDataset
from synthvlm_assets.training.loop import (
    Distributed,
    LoopSettings,
    RunResult,
    Trainee,
    compute_dtype,
    finish_run,
    finished_run,
    first_label_position,
    label_cross_entropy_sum,
    load_weights,
    local_state,
    train_loop,
)
from synthvlm_assets.training.model import (
    ModelSettings,
    load_model,
    tiny_cpu_threads,
    transformer_layers,
    vision_token_count,
)

ASSET = "llava_stage2"
TRAINABLE = "trainable.safetensors"
PROJECTOR_PREFIX = "model.multi_modal_projector."


@dataclass(frozen=True)
class Stage2Settings(LoopSettings):
    """LLaVA-1.5's finetune recipe (scripts/v1_5/finetune.sh) plus where the data is and how it runs."""

    global_batch: int = 128
    lr: float = 2e-5
    gradient_checkpointing: bool = True  # LLaVA's finetune default: activations of 2048-token sequences
    instruct_json: str = ""  # LLaVA-665K-format JSON: a local path or an s3:// URI
    image_folder: str = ""  # the folder its "image" paths are relative to (local or s3://); part of the run's name
    fsdp: bool = True  # shard the model over the processes (else every process holds all of it)

    # The JSON's bytes name the run (InstructDataset.version), not its path.
    EXECUTION: ClassVar[frozenset[str]] = LoopSettings.EXECUTION | {"fsdp", "instruct_json"}

    @classmethod
    def tiny_preset(cls, **overrides) -> Stage2Settings:
        """Small batches for the tiny model on a CPU; everything else as LLaVA-1.5."""
        return replace(
            cls(global_batch=8, micro_batch=4, checkpoint_every=5, gradient_checkpointing=False), **overrides
        )


def instruct_dataset(settings: Stage2Settings, s3_endpoint_url: str | None = None) -> InstructDataset:
    if not settings.instruct_json:
        raise DatasetError(
            "stage 2 needs instruct_json: a LLaVA-665K-format JSON (local path or s3:// URI) and its image_folder"
        )
    parent, name = (
        settings.instruct_json.rstrip("/").rsplit("/", 1)
        if "/" in settings.instruct_json
        else (".", settings.instruct_json)
    )
    images = StorageRoot(settings.image_folder, s3_endpoint_url) if settings.image_folder else None
    return InstructDataset(StorageRoot(parent, s3_endpoint_url), name, images)


def run_name(data_version: str, stage1_run: str, model: ModelSettings, settings: Stage2Settings) -> str:
    digest = hashlib.sha256(
        json.dumps([model.describe(), stage1_run, settings.recipe()], sort_keys=True).encode()
    ).hexdigest()[:10]
    return f"{data_version}-{digest}"


def llava_loss_module(llava):
    """LLaVA's forward in one module whose output is the summed answer-token cross-entropy. FSDP hooks
    the forward of the modules it shards: this root module runs the vision tower on every micro-batch
    (a text-only one brings a blank image whose features count zero), so all processes issue the same
    collectives, and the LM head only runs from the first label on."""
    import torch

    class _LlavaLoss(torch.nn.Module):
        def __init__(self, llava) -> None:
            super().__init__()
            self.llava = llava

        def forward(self, input_ids, attention_mask, pixel_values, labels, dummy_image):
            m, cfg = self.llava.model, self.llava.config
            embeds = m.language_model.get_input_embeddings()(input_ids)
            hidden = m.vision_tower(pixel_values, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
            if cfg.vision_feature_select_strategy == "default":
                hidden = hidden[:, 1:]  # drop CLS
            features = m.multi_modal_projector(hidden).to(embeds.dtype)
            if bool(dummy_image):
                embeds = embeds + 0.0 * features.sum()
            else:
                mask = (input_ids == cfg.image_token_id).unsqueeze(-1).expand_as(embeds)
                embeds = embeds.masked_scatter(mask, features)
            out = m.language_model(
                inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            start = first_label_position(labels)
            return label_cross_entropy_sum(self.llava.lm_head(out[:, start:-1]), labels, start)

    return _LlavaLoss(llava)


def loss_sum(module, batch: dict):
    return module(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["labels"],
        batch.get("dummy_image", False),
    )


def stage2_trainable(model) -> list[str]:
    """Stage 2 trains the projector and the whole LLM (embeddings and LM head included); the vision
    tower stays frozen. Sets requires_grad and returns the trainable parameters' names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("model.vision_tower."))
        if p.requires_grad:
            names.append(name)
    return names


def _shard(module, model, dtype) -> None:
    """FSDP (fully_shard): each vision and decoder layer a unit, the rest (embeddings, projector, norms,
    LM head) the root's. Parameters stay fp32 (the optimizer's master
    weights); compute runs in `dtype`, gradients are reduced in fp32."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if dtype != torch.float32
        else MixedPrecisionPolicy()
    )
    # The vision tower's layers, not the tower: transformers finds a model's output recorders by its
    # class, which fully_shard replaces (the tower would return no hidden states).
    for tower in (model.model.vision_tower, model.model.language_model):
        for layer in transformer_layers(tower):
            fully_shard(layer, mp_policy=mp)
    fully_shard(module, mp_policy=mp)


def _sharded_checkpoints(module, storage_options: dict):
    """Save and load a sharded module's checkpoint with torch.distributed.checkpoint: each process
    writes its own shards of the weights and the optimizer state straight to the storage (local or
    S3, through fsspec), so no process ever holds the whole 7B/13B state (fp32 weights + Adam's two
    moments: 12 bytes a parameter)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import (
        FsspecReader,
        FsspecWriter,
    )  # stable since torch 2.2, not re-exported
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def state(optimizer) -> dict:
        return {"model": get_model_state_dict(module), "optimizer": get_optimizer_state_dict(module, optimizer)}

    def save_shards(uri: str, optimizer) -> None:
        dcp.save(state(optimizer), storage_writer=FsspecWriter(uri, **storage_options))

    def load_shards(uri: str, optimizer) -> None:
        target = state(optimizer)  # the shapes and placements to load into (also initialises Adam's state)
        dcp.load(target, storage_reader=FsspecReader(uri, **storage_options))
        set_model_state_dict(module, target["model"])
        set_optimizer_state_dict(module, optimizer, target["optimizer"])

    return save_shards, load_shards


def _fits_one_device(model, d: Distributed) -> None:
    """Unsharded, every process holds the trainable weights in fp32 with their gradients and Adam's two
    moments (16 bytes a parameter): say so before a 7B model fills a GPU, rather than run out of memory."""
    import torch

    if d.device.type != "cuda":
        return
    need = sum(p.numel() * (16 if p.requires_grad else 2) for p in model.parameters())
    have = torch.cuda.get_device_properties(d.device).total_memory
    if need > have:
        raise RuntimeError(
            f"stage 2 without sharding needs about {need / 2**30:.0f} GiB per GPU for weights, gradients and Adam's "
            "state "
            f"before activations; this GPU has {have / 2**30:.0f} GiB: run it on several GPUs (processes > 1, fsdp on)"
        )


def _sharded_from_rank0(load: Callable, d: Distributed, dtype, gradient_checkpointing: bool):
    """The FSDP model with only rank 0 reading the weights: rank 0 loads the model (`load()`), every
    process builds the same architecture on the meta device from rank 0's configuration and shards it,
    then rank 0's weights are broadcast shard by shard and its buffers (rotary frequencies, position
    ids: not in the state dict when non-persistent) copied to all. A 7B model then costs one process
    28 GB of host memory, not every process. Returns (module, model, processor, trainable names)."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import LlavaForConditionalGeneration

    full, buffers, shared = {}, {}, [None, None]
    if d.rank == 0:
        loaded, processor = load()
        full = {f"llava.{k}": v for k, v in loaded.state_dict().items()}
        buffers = {f"llava.{k}": v for k, v in loaded.named_buffers()}
        shared = [loaded.config, processor]
    d.dist.broadcast_object_list(shared, src=0)
    config, processor = shared
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    names = stage2_trainable(model)
    if gradient_checkpointing:
        model.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    module = llava_loss_module(model)
    _shard(module, model, dtype)
    module.to_empty(device=d.device)
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if d.rank == 0:
                buf.copy_(buffers[name])
            d.dist.broadcast(buf, src=0)
    return module, model, processor, names


def _gathered_trainable(module, names: list[str]) -> Callable[[], dict]:
    """The full trainable weights of a sharded module (every process takes part; rank 0 gets them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    wanted = set(names)

    def trainable_state() -> dict:
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {
            k.removeprefix("llava."): v.float().contiguous()
            for k, v in state.items()
            if k.removeprefix("llava.") in wanted
        }

    return trainable_state


def train_stage2(
    storage: StorageRoot, model_settings: ModelSettings, stage1_run_prefix: str, settings: Stage2Settings,
    report: Callable[[dict], None] | None = None, cache_dir: str | None = None,
) -> RunResult:  # fmt: skip
    """Train (or resume, or find finished) one stage-2 run starting from the stage-1 run's projector.
    Every process of a torchrun launch calls this; rank 0 writes the shared files."""
    d = Distributed()
    try:
        with tiny_cpu_threads(model_settings):
            return _train(storage, model_settings, stage1_run_prefix, settings, report, cache_dir, d)
    finally:
        d.close()


def _train(storage, model_settings, stage1_run_prefix, settings, report, cache_dir, d: Distributed) -> RunResult:
    import torch

    from synthvlm_assets.training.stage1 import PROJECTOR

    dataset = instruct_dataset(settings, storage.s3_endpoint_url)
    if len(dataset) == 0:
        raise DatasetError(f"{dataset.json_uri} has no records")
    stage1_run = stage1_run_prefix.rstrip("/").rsplit("/", 1)[-1]
    run_prefix = f"{ASSET}/{run_name(dataset.version, stage1_run, model_settings, settings)}"
    finished = finished_run(storage, run_prefix)
    if finished is not None:
        return finished
    projector_key = f"{stage1_run_prefix}/{PROJECTOR}"
    if not storage.exists(projector_key):
        raise FileNotFoundError(
            f"{storage.uri(projector_key)} does not exist: stage 2 starts from a finished stage-1 run"
        )

    dtype = compute_dtype(settings.dtype, d.device)
    sharded = settings.fsdp and d.world > 1

    def load():  # fp32: the master weights of everything that trains
        model, processor = load_model(
            model_settings, dtype=torch.float32, cache_dir=cache_dir, s3_endpoint_url=storage.s3_endpoint_url
        )
        model.model.multi_modal_projector.load_state_dict(load_weights(storage, projector_key))
        return model, processor

    if sharded:
        module, model, processor, names = _sharded_from_rank0(load, d, dtype, settings.gradient_checkpointing)
    else:
        model, processor = load()
        names = stage2_trainable(model)
        _fits_one_device(model, d)
        model.model.vision_tower.to(dtype)  # frozen: stored in the compute dtype
        if settings.gradient_checkpointing:
            model.model.language_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.to(d.device)
        model.train()
        module = llava_loss_module(model)
    params = [p for p in module.parameters() if p.requires_grad]  # (sharded ones under FSDP)
    collator = ConversationCollator(processor, vision_token_count(model), settings.max_length)
    if sharded:
        save_shards, load_shards = _sharded_checkpoints(module, storage.fsspec_options())
        trainee = Trainee(module, params, collator, loss_sum, TRAINABLE, _gathered_trainable(module, names),
                          save_shards=save_shards, load_shards=load_shards)  # fmt: skip
    else:

        def load_local(state: dict) -> None:
            missing = sorted(set(names) - set(state))
            if missing:
                raise RuntimeError(f"checkpoint lacks {len(missing)} trainable weights, e.g. {missing[:3]}")
            model.load_state_dict(state, strict=False)

        trainee = Trainee(module, params, collator, loss_sum, TRAINABLE, lambda: local_state(model, names), load_local)
    loop = train_loop(storage, d, run_prefix, dataset, trainee, settings, dtype, report)
    trained = trainee.trainable_state() if loop.steps == loop.total_steps else None  # collective under FSDP
    facts = {"fsdp": sharded, "data": settings.instruct_json, "data_version": dataset.version, "records": len(dataset),
             "stage1_run_prefix": stage1_run_prefix, "model": model_settings.describe(), "recipe": settings.recipe(),
             "micro_batch": settings.micro_batch, "tiny": model_settings.tiny}  # fmt: skip
    return finish_run(storage, d, run_prefix, loop, facts, TRAINABLE, trained)
