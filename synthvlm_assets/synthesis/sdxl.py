"""SDXL generation in small explicit steps: load, encode + denoise (diffusers' pipeline, latents
out), decode with the VAE ourselves so a half-precision overflow is caught and re-decoded in fp32."""

from __future__ import annotations

import copy
import logging
import re
import time
from dataclasses import dataclass

import numpy as np

from synthvlm_assets.models.sources import TINY, load_error, resolve_model
from synthvlm_assets.synthesis.settings import SynthesisSettings

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def image_flag(pixels: np.ndarray) -> str | None:
    """Why a decoded image (float, HxWx3 in [0, 1]) is unusable: NaN, black or constant; else None."""
    if not np.isfinite(pixels).all():
        return "nan"
    u8 = to_uint8(pixels)
    if int(u8.max()) - int(u8.min()) == 0:
        return "constant"
    if int(u8.max()) <= 4:
        return "black"
    return None


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """As diffusers' numpy_to_pil: round(x * 255)."""
    return (np.nan_to_num(pixels, nan=0.0) * 255).round().clip(0, 255).astype(np.uint8)


@dataclass
class Generated:
    pixels: np.ndarray | None  # uint8 HxWx3, None when flagged
    flag: str | None


@dataclass
class GenerationStats:
    images: int = 0
    seconds: float = 0.0
    redecoded_fp32: int = 0


class SDXLGenerator:
    """Generates SDXL images for (prompt, seed) pairs, batched, with per-image seeded noise."""

    def __init__(self, settings: SynthesisSettings, base, refiner=None, device: str | None = None) -> None:
        import torch

        self.settings = settings
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, DTYPES[settings.dtype])
        self.base, self.refiner = base, refiner
        self.deepcache = {}  # id(pipeline) -> its UNet's DeepCache (deepcache_interval > 1)
        for pipe in filter(None, (self.base, self.refiner)):
            if pipe.device.type != self.device:
                pipe.to(self.device)
            if pipe.dtype != self.dtype:
                pipe.to(dtype=self.dtype)
            pipe.set_progress_bar_config(disable=True)
            if settings.fuse_qkv:
                pipe.fuse_qkv_projections(unet=True, vae=False)
            if self.device == "cuda":
                pipe.unet.to(memory_format=torch.channels_last)
            # Fast paths, after fusing (the fused layers are the ones quantised) and before compiling.
            if settings.fp8_linear:
                from synthvlm_assets.synthesis.fp8 import apply_fp8_linear

                apply_fp8_linear(pipe.unet)
            if settings.deepcache_interval > 1:
                from synthvlm_assets.synthesis.deepcache import DeepCache

                self.deepcache[id(pipe)] = DeepCache(pipe.unet, settings.deepcache_interval)
            if self.device == "cuda" and settings.compile:
                pipe.unet = torch.compile(pipe.unet)
        self.stats = GenerationStats()
        self._vae_fp32 = None
        self.model_revision = resolved_revision(base, settings)
        # SDXL reads 77 tokens by design; the per-batch "truncated" warning is noise in run logs.
        logging.getLogger("diffusers.pipelines.stable_diffusion_xl").setLevel(logging.ERROR)

    @classmethod
    def load(
        cls, settings: SynthesisSettings, cache_dir: str | None = None, s3_endpoint_url: str | None = None
    ) -> SDXLGenerator:
        """Weights from a Hugging Face id, a local folder, an s3:// prefix, or the tiny preset."""
        if settings.is_tiny:
            from synthvlm_assets.models.tiny import tiny_sdxl_pipeline

            return cls(settings, tiny_sdxl_pipeline())
        import torch
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        dtype = getattr(torch, DTYPES[settings.dtype])
        base = _load(
            StableDiffusionXLPipeline,
            "synthesis.model",
            settings.model,
            settings.revision,
            dtype,
            cache_dir,
            s3_endpoint_url,
        )
        refiner = None
        if settings.refiner_model:
            if settings.refiner_model == TINY:
                raise ValueError("the tiny preset has no refiner")
            refiner = _load(
                StableDiffusionXLImg2ImgPipeline,
                "synthesis.refiner_model",
                settings.refiner_model,
                settings.refiner_revision,
                dtype,
                cache_dir,
                s3_endpoint_url,
                text_encoder_2=base.text_encoder_2,
                vae=base.vae,
            )
        return cls(settings, base, refiner)

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Generated]:
        import torch

        s = self.settings
        # CPU generators: the initial noise of a seed is the same on every device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        common = {
            "prompt": prompts,
            "negative_prompt": [s.negative_prompt] * len(prompts),
            "num_inference_steps": s.steps,
            "guidance_scale": s.guidance_scale,
            "generator": generators,
            "output_type": "latent",
        }
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.refiner is None:
                latents = self.run_pipeline(self.base, **common, height=s.height, width=s.width)
            else:
                # The hand-over of SPEC §2: base stops at `refiner_switch`, the refiner starts there.
                # (SynthVLM's code passes denoising_end to the refiner too, returning noisy images.)
                handover = self.run_pipeline(
                    self.base, **common, height=s.height, width=s.width, denoising_end=s.refiner_switch
                )
                latents = self.run_pipeline(self.refiner, **common, image=handover, denoising_start=s.refiner_switch)
            out = self._decode(latents)
        self.stats.images += len(prompts)
        self.stats.seconds += time.perf_counter() - t0
        return out

    def run_pipeline(self, pipe, **kwargs):
        """One pipeline call (latents out), with the UNet's step cache driven by the step-end callback."""
        cache = self.deepcache.get(id(pipe))
        if cache is None:
            return pipe(**kwargs).images
        cache.reset()
        try:
            return pipe(**kwargs, callback_on_step_end=cache.step_end).images
        finally:
            cache.reset()  # frees the kept feature; an interrupted call leaves no state behind

    def _vae(self, fp32: bool):
        import torch

        vae = (self.refiner or self.base).vae
        if not fp32 or vae.dtype == torch.float32:
            return vae
        if self._vae_fp32 is None:  # a float32 copy, made the first time a decode needs it
            self._vae_fp32 = copy.deepcopy(vae).to(torch.float32)
        return self._vae_fp32

    def _decode(self, latents) -> list[Generated]:
        images = _vae_decode(self._vae(self.settings.vae_fp32), latents)
        out = []
        for i, pixels in enumerate(images):
            flag = image_flag(pixels)
            vae = self._vae(True)
            if flag is not None and vae is not self._vae(self.settings.vae_fp32):
                # SDXL's VAE overflows in half precision: decode this one again in fp32.
                pixels = _vae_decode(vae, latents[i : i + 1])[0]
                flag = image_flag(pixels)
                self.stats.redecoded_fp32 += 1
            out.append(Generated(None if flag else to_uint8(pixels), flag))
        return out


def _vae_decode(vae, latents) -> np.ndarray:
    """Latents -> float images HxWx3 in [0, 1], as the SDXL pipeline's own decode step."""
    import torch

    z = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        z = z * std / vae.config.scaling_factor + mean
    else:
        z = z / vae.config.scaling_factor
    image = vae.decode(z, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def resolved_revision(pipe, settings: SynthesisSettings) -> str | None:
    """The weights' revision: the Hugging Face cache's snapshot commit when loaded through it, else the
    configured revision ("tiny-random" for the tiny preset)."""
    if settings.is_tiny:
        return "tiny-random"
    m = re.search(r"/snapshots/([0-9a-f]{40})(/|$)", str(getattr(pipe.config, "_name_or_path", "")))
    return m.group(1) if m else settings.revision


def _load(cls, setting, value, revision, dtype, cache_dir, s3_endpoint_url, **components):
    source = resolve_model(setting, value, cache_dir, s3_endpoint_url)
    try:
        return cls.from_pretrained(source, revision=revision, dtype=dtype, **components)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise load_error(setting, value, exc) from exc
