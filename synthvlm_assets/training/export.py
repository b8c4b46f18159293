"""Export a trained stage-1 model: the whole model and its processor in Hugging Face format (loads with
`AutoModelForImageTextToText` / `LlavaForConditionalGeneration` and `AutoProcessor`), plus LLaVA's
`mm_projector.bin` (what the LLaVA repository's stage 2 takes as `--pretrain_mm_mlp_adapter`)."""

from __future__ import annotations

import json
import os
import tempfile

from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.model import ModelSettings, llava_mm_projector_state, load_model
from synthvlm_assets.training.stage1 import COMPLETE, load_projector

EXPORT = "llava_stage1_export"


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
    model, processor = load_model(model_settings, dtype=dtype, cache_dir=cache_dir, s3_endpoint_url=storage.s3_endpoint_url)
    model.model.multi_modal_projector.load_state_dict(load_projector(storage, f"{run_prefix}/projector.safetensors"))
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
    manifest = {"run_prefix": run_prefix, "model": model_settings.describe(), "files": files, "dtype": str(dtype).removeprefix("torch."),
                **(info or {})}  # fmt: skip
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
