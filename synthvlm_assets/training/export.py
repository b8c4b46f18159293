"""Export a trained model (stage 1 or 2): the whole model and its processor in Hugging Face format (loads
with `AutoModelForImageTextToText` / `LlavaForConditionalGeneration` and `AutoProcessor`, and with
lmms-eval's `llava_hf`), plus LLaVA's `mm_projector.bin` (what the LLaVA repository's stage 2 takes as
`--pretrain_mm_mlp_adapter`)."""

from __future__ import annotations

import json
import os
import tempfile

from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.model import ModelSettings, llava_mm_projector_state, load_model
from synthvlm_assets.training.loop import COMPLETE, load_weights
from synthvlm_assets.training.stage1 import PROJECTOR
from synthvlm_assets.training.stage2 import PROJECTOR_PREFIX, TRAINABLE

EXPORT = "llava_stage1_export"
STAGE2_EXPORT = "llava_stage2_export"


def trained_weights(storage: StorageRoot, run_prefix: str) -> dict:
    """A finished run's trained weights under LlavaForConditionalGeneration's names: stage 2's projector +
    LLM, or stage 1's projector."""
    if storage.exists(f"{run_prefix}/{TRAINABLE}"):
        return load_weights(storage, f"{run_prefix}/{TRAINABLE}")
    if storage.exists(f"{run_prefix}/{PROJECTOR}"):
        return {PROJECTOR_PREFIX + k: v for k, v in load_weights(storage, f"{run_prefix}/{PROJECTOR}").items()}
    raise FileNotFoundError(
        f"{storage.uri(run_prefix)} holds no trained weights ({TRAINABLE} or {PROJECTOR}): is the run finished?"
    )


def export_model(
    storage: StorageRoot, run_prefix: str, model_settings: ModelSettings, dest_prefix: str, info: dict | None = None,
    cache_dir: str | None = None, dtype: str | None = None,
) -> dict:  # fmt: skip
    """Write the export under `dest_prefix` (files first, `_COMPLETE` last) in `dtype` ("bf16", as
    LLaVA releases its models, or "fp32"; default fp32 for the tiny preset); returns its manifest."""
    import torch

    dtype = dtype or ("fp32" if model_settings.tiny else "bf16")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"export dtype must be 'bf16' or 'fp32', not {dtype!r}")
    dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    model, processor = load_model(
        model_settings, dtype=dtype, cache_dir=cache_dir, s3_endpoint_url=storage.s3_endpoint_url
    )
    trained = trained_weights(storage, run_prefix)
    unexpected = model.load_state_dict(trained, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(
            f"{storage.uri(run_prefix)}: {len(unexpected)} trained weights the model does not have, e.g. "
            f"{unexpected[:3]}"
        )
    model.to(dtype)
    storage.delete(f"{dest_prefix}/{COMPLETE}")
    files = {}
    with tempfile.TemporaryDirectory(prefix="synthvlm-export-") as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        torch.save(llava_mm_projector_state(model), os.path.join(tmp, "mm_projector.bin"))
        for dirpath, _, names in os.walk(tmp):
            for name in sorted(names):
                local = os.path.join(dirpath, name)
                rel = os.path.relpath(local, tmp).replace(os.sep, "/")
                storage.put_file(local, f"{dest_prefix}/{rel}")
                files[rel] = os.path.getsize(local)
    manifest = {
        "run_prefix": run_prefix,
        "model": model_settings.describe(),
        "files": files,
        "dtype": str(dtype).removeprefix("torch."),
        **(info or {}),
    }
    storage.write_bytes(f"{dest_prefix}/{COMPLETE}", json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def download_export(storage: StorageRoot, prefix: str, local_dir: str) -> str:
    """Copy a complete export to a local folder (what `from_pretrained` reads)."""
    if not storage.exists(f"{prefix}/{COMPLETE}"):
        raise FileNotFoundError(f"{storage.uri(prefix)} is not a complete export (no {COMPLETE})")
    manifest = json.loads(storage.read_bytes(f"{prefix}/{COMPLETE}"))
    for rel in manifest["files"]:
        target = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(storage.read_bytes(f"{prefix}/{rel}"))
    return local_dir
