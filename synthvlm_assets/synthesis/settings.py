"""Every SPEC §2 setting, with its default; what changes the pixels goes into the image key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from synthvlm_assets.models.sources import TINY
from synthvlm_assets.models.tiny import TINY_SDXL_IMAGE_SIZE


# Settings that change how fast images are made, not what they are: they stay out of the image key.
EXECUTION_ONLY = ("batch_size", "compile", "fuse_qkv")


@dataclass(frozen=True)
class SynthesisSettings:
    model: str = "stabilityai/stable-diffusion-xl-base-1.0"  # HF id, local folder, s3:// prefix, or "tiny"
    revision: str | None = None
    refiner_model: str | None = None  # e.g. "stabilityai/stable-diffusion-xl-refiner-1.0"
    refiner_revision: str | None = None
    refiner_switch: float = 0.8  # base runs denoising_end=0.8, the refiner denoising_start=0.8
    height: int = 1024
    width: int = 1024
    steps: int = 60
    guidance_scale: float = 20.0
    negative_prompt: str = ""
    images_per_caption: int = 1
    dtype: str = "bf16"  # "bf16" | "fp16" (SynthVLM's) | "fp32"
    vae_fp32: bool = False  # decode in fp32 always; fp16 decodes are re-done in fp32 when flagged anyway
    jpeg_quality: int = 95
    # Execution only (same sampling math): how many prompts share a UNet call, and torch.compile.
    batch_size: int = 8
    compile: bool = True  # torch.compile the UNet on CUDA (never on CPU, never in tests)
    fuse_qkv: bool = True  # one matmul for q, k and v in every self-attention (same math, fewer kernels)

    def __post_init__(self) -> None:
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"synthesis dtype must be bf16, fp16 or fp32, got {self.dtype!r}")
        if not 0.0 < self.refiner_switch < 1.0:
            raise ValueError(f"refiner_switch must be in (0, 1), got {self.refiner_switch}")
        if self.images_per_caption < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("images_per_caption, batch_size and steps must be >= 1")

    @classmethod
    def tiny(cls, **overrides) -> SynthesisSettings:
        """The tiny preset's settings: the same sampling math at the tiny model's image size."""
        base = {
            "model": TINY,
            "height": TINY_SDXL_IMAGE_SIZE,
            "width": TINY_SDXL_IMAGE_SIZE,
            "dtype": "fp32",
            "batch_size": 16,
        }
        return cls(**{**base, **overrides})

    @property
    def is_tiny(self) -> bool:
        return self.model == TINY

    def image_settings(self) -> dict:
        """The settings that determine the stored image (not EXECUTION_ONLY)."""
        d = asdict(self)
        for k in EXECUTION_ONLY:
            d.pop(k)
        return d

    def image_settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.image_settings(), sort_keys=True).encode()).hexdigest()[:16]


def seed_for(caption_id: str, candidate: int) -> int:
    """The official code sets no seed; ours is a function of (caption_id, candidate), so every image
    can be regenerated bit for bit on the same hardware and software."""
    digest = hashlib.blake2b(f"{caption_id}\x00{candidate}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def image_key(caption: str, seed: int, settings: SynthesisSettings) -> str:
    """What an image is addressed by: everything that determines it (text, seed, model, settings)."""
    doc = json.dumps({"caption": caption, "seed": seed, "settings": settings.image_settings()}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:32]
