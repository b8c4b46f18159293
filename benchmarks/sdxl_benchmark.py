"""SDXL synthesis speed: SynthVLM's code path (a), this project's default path (b) and (b) with each fast
path, side by side in one process on one device, with random weights of the real SDXL base architecture
(the same weights for every path: each build is seeded).

    .venv/bin/python benchmarks/sdxl_benchmark.py                  # on a GPU: SDXL base at 1024², 60 steps
    .venv/bin/python benchmarks/sdxl_benchmark.py --preset tiny    # on a CPU: the tiny preset (shapes only)

(a) fp16, batch 1, eager, VAE decoded in fp32: one pipeline call per caption, as SynthVLM's script.
(b) SDXLGenerator with the project's defaults (bf16, batch 8, torch.compile + channels_last on CUDA, fused QKV).
(f) (b) with a fast path (--fast, repeatable; default: deepcache_interval=2, fp8_linear=true, both, then
    deepcache_interval=3). A fast path changes the pixels: its images are compared with (b)'s.

Two measurements:
1. Step-extrapolated, for (a) and (b) (BASELINES.md's method, as before): the pipeline with output_type="latent"
   for 2 and 12 steps, the faster of two runs each, per step = (t12 - t2) / 10; text encoding and VAE decode
   timed on their own; s/image = (text + steps * step + VAE) / batch.
2. Full calls, for every path: one real full-length generate() of the same `batch` captions and seeds (after a
   2-step warm-up call that compiles), s/image = its wall time / batch. (a) makes the first caption alone. A fast
   path skips steps unevenly, so only this measurement is fair to it; the ratios are against (a)'s full call.
   Each fast path's images against (b)'s (same captions, seeds, weights): PSNR and SSIM per image, their
   distribution, and pass/fail against the path's tolerance (settings.FAST_PATH_TOLERANCES). (a)'s image
   against (b)'s first: fp16 against bf16, the precision floor the fast paths can be read against.
Fast paths start only while the run is within --budget-s (the rest are printed as skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from synthvlm_assets.synthesis.compare import compare_images, parse_fast, path_name, psnr_db, ssim_rgb
from synthvlm_assets.synthesis.sdxl import DTYPES, SDXLGenerator, _vae_decode, to_uint8
from synthvlm_assets.synthesis.settings import SynthesisSettings, tolerance_for

DEFAULT_FAST = [
    "deepcache_interval=2",
    "fp8_linear=true",
    "deepcache_interval=2,fp8_linear=true",
    "deepcache_interval=3",
]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_of(fn, device: str, runs: int = 2) -> float:
    best = float("inf")
    for _ in range(runs):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def prompts_for(batch: int) -> list[str]:
    return [f"A photo of a red double-decker bus number {i} driving down a busy street." for i in range(batch)]


def measure(pipe, batch: int, settings: SynthesisSettings, device: str, vae_dtype: torch.dtype) -> dict:
    prompts = prompts_for(batch)

    def run(steps: int):
        return pipe(
            prompt=prompts,
            negative_prompt=[""] * batch,
            num_inference_steps=steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            output_type="latent",
            generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)],
        ).images

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    latents = run(2)  # warm-up (and compilation)
    t2, t12 = best_of(lambda: run(2), device), best_of(lambda: run(12), device)
    step = (t12 - t2) / 10
    text = best_of(
        lambda: pipe.encode_prompt(
            prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[""] * batch,
        ),
        device,
    )
    vae = pipe.vae if pipe.vae.dtype == vae_dtype else pipe.vae.to(vae_dtype)
    decode = best_of(lambda: _vae_decode(vae, latents), device)
    total = text + settings.steps * step + decode
    out = {
        "batch": batch,
        "step_s": step,
        "text_s": text,
        "vae_s": decode,
        "s_per_image": total / batch,
        "images_per_s": batch / total,
    }
    if device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def full_call_a(pipe, settings: SynthesisSettings, device: str) -> tuple[float, np.ndarray]:
    """SynthVLM's call for the first caption: fp16 pipeline, latents decoded by the VAE in fp32."""
    vae = pipe.vae.to(torch.float32)

    def call():
        latents = pipe(
            prompt=prompts_for(1),
            negative_prompt=[""],
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            output_type="latent",
            generator=[torch.Generator("cpu").manual_seed(0)],
        ).images
        return to_uint8(_vae_decode(vae, latents)[0])

    sync(device)
    t = time.perf_counter()
    pixels = call()
    sync(device)
    return time.perf_counter() - t, pixels


def full_call(gen: SDXLGenerator, batch: int, device: str) -> dict:
    """A 2-step warm-up generate() (compiles; the VAE's first decode), then one timed full-length one."""
    prompts, seeds = prompts_for(batch), list(range(batch))
    settings = gen.settings
    t = time.perf_counter()
    gen.settings = dataclasses.replace(settings, steps=2)
    try:
        gen.generate(prompts, seeds)
    finally:
        gen.settings = settings
    sync(device)
    warm = time.perf_counter() - t
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    images = gen.generate(prompts, seeds)
    sync(device)
    seconds = time.perf_counter() - t
    out = {"warmup_s": warm, "full_s": seconds, "s_per_image": seconds / batch, "images": images}
    out["flagged"] = sum(g.flag is not None for g in images)
    if device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def unet_tflop_per_image(unet_config: dict, settings: SynthesisSettings, vae_scale: int) -> float:
    """UNet FLOPs of one image (the CFG pair, every step), counted on the meta device."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        x = torch.randn(2, 4, settings.height // vae_scale, settings.width // vae_scale)
        cond = {
            "text_embeds": torch.randn(
                2, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            ),
            "time_ids": torch.randn(2, 6),
        }
        with FlopCounterMode(display=False) as counter:
            unet(
                x,
                torch.tensor([500.0, 500.0]),
                encoder_hidden_states=torch.randn(2, 77, unet.config.cross_attention_dim),
                added_cond_kwargs=cond,
            )
    return counter.get_total_flops() * settings.steps / 1e12


def bf16_peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t = best_of(lambda: [a @ b for _ in range(20)], device, runs=3)
    return 20 * 2 * 8192**3 / t / 1e12


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch._dynamo.reset()  # the next path compiles its own UNet


def header(device: str, preset: str, settings: SynthesisSettings) -> dict:
    import diffusers
    import transformers

    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    info = {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": commit or None,
        "preset": preset,
    }
    print(
        f"device: {name}; {info['date']}; torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers "
        f"{diffusers.__version__}, transformers {transformers.__version__}, Python {info['python']}"
        + (f", commit {commit}" if commit else "")
    )
    print(
        f"preset {preset}: {settings.height}x{settings.width}, {settings.steps} steps, guidance "
        f"{settings.guidance_scale}, random weights (the same for every path)"
    )
    return info


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["sdxl", "tiny"], default="sdxl" if torch.cuda.is_available() else "tiny")
    p.add_argument("--batch", type=int, default=None, help="batch of (b) and the fast paths (default: the project's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 60, SPEC §2)")
    p.add_argument(
        "--fast",
        action="append",
        default=None,
        metavar="SETTING=VALUE[,SETTING=VALUE]",
        help=f"a fast path to measure (repeatable; default: {' '.join(DEFAULT_FAST)}); --fast none: none",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="SETTING=VALUE[,SETTING=VALUE]",
        help="also measure (b) with these execution settings changed (step-extrapolated), e.g. fuse_qkv=false",
    )
    p.add_argument("--budget-s", type=float, default=200.0, help="start no fast path after this many seconds")
    p.add_argument("--validate", action="store_true", help="(kept for old command lines: (b)'s full call is timed)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.preset == "sdxl" and device != "cuda":
        raise SystemExit(
            "the SDXL-size benchmark needs a GPU (the full UNet takes ~30 s per step on a CPU): use --preset tiny"
        )
    fast_specs = DEFAULT_FAST if args.fast is None else [f for f in args.fast if f != "none"]

    if args.preset == "sdxl":
        from synthvlm_assets.models.sdxl_arch import UNET, random_sdxl_pipeline

        ours = SynthesisSettings()

        def build(dtype):
            torch.manual_seed(0)  # the same random weights for every path
            return random_sdxl_pipeline(device, dtype)

        unet_config = UNET
    else:
        from synthvlm_assets.models.tiny import tiny_sdxl_pipeline

        # bf16 as on the GPU: the fp8_linear path needs it, and the exact path is the bf16 one.
        ours = SynthesisSettings.tiny(dtype="bf16")
        build = lambda dtype: tiny_sdxl_pipeline().to(device, dtype)  # noqa: E731 (seeded inside)
        unet_config = dict(tiny_sdxl_pipeline().unet.config)
    changes = {k: v for k, v in (("batch_size", args.batch), ("steps", args.steps)) if v}
    ours = dataclasses.replace(ours, **changes)
    batch = ours.batch_size
    half = torch.float16 if device == "cuda" else torch.float32  # CPUs have no fast fp16 path
    results: dict = {"info": header(device, args.preset, ours), "settings": ours.__dict__, "paths": {}}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str))

    # (a) SynthVLM: fp16, batch 1, eager, VAE in fp32.
    pipe = build(half)
    results["a"] = measure(pipe, 1, ours, device, torch.float32)
    a_seconds, a_pixels = full_call_a(pipe, ours, device)
    results["a"]["full_s_per_image"] = a_seconds
    del pipe
    free(device)

    # (b) this project's default path.
    t = time.perf_counter()
    gen = SDXLGenerator(ours, build(getattr(torch, DTYPES[ours.dtype])), device=device)
    results["b"] = measure(gen.base, batch, ours, device, gen.base.vae.dtype)
    b_full = full_call(gen, batch, device)
    b_wall = time.perf_counter() - t
    b_images = b_full.pop("images")
    results["b"]["full"] = b_full
    tflop = unet_tflop_per_image(unet_config, ours, gen.base.vae_scale_factor)
    vae_scale = gen.base.vae_scale_factor
    del gen
    free(device)

    rows = [
        (
            f"(a) SynthVLM: {'fp16' if half == torch.float16 else 'fp32 (no fast fp16 on this device)'}, batch 1, "
            "eager, VAE fp32",
            results["a"],
        ),
        (
            f"(b) this project: {ours.dtype}, batch {batch}, compile={ours.compile and device == 'cuda'}, "
            f"fuse_qkv={ours.fuse_qkv}",
            results["b"],
        ),
    ]
    for i, variant in enumerate(args.variant):
        typed = parse_variant(ours, variant)
        settings = dataclasses.replace(ours, **typed)
        gen = SDXLGenerator(settings, build(getattr(torch, DTYPES[settings.dtype])), device=device)
        results[f"variant{i}"] = measure(gen.base, settings.batch_size, settings, device, gen.base.vae.dtype)
        results[f"variant{i}"]["settings"] = typed
        rows.append((f"(b{i + 1}) (b) with {variant}", results[f"variant{i}"]))
        del gen
        free(device)

    print("\nStep-extrapolated (method 1):")
    print("| path | UNet step (ms) | text enc (ms) | VAE (ms) | s / image | images / s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(
            f"| {label} | {r['step_s'] * 1e3:.1f} | {r['text_s'] * 1e3:.1f} | {r['vae_s'] * 1e3:.1f} | "
            f"{r['s_per_image']:.3f} | {r['images_per_s']:.3f} | {r.get('peak_gib', float('nan')):.1f} |"
        )
    ratio = results["b"]["images_per_s"] / results["a"]["images_per_s"]
    for label, r in rows[2:]:
        print(f"ratio {label.split(')')[0]})/a: {r['images_per_s'] / results['a']['images_per_s']:.2f}x")
    print(f"ratio b/a: {ratio:.2f}x   UNet FLOPs per image: {tflop:.4g} TFLOP ({ours.steps} steps, CFG pair)")
    peak = bf16_peak_tflops(device)
    if peak:
        results["bf16_peak_tflops"] = peak
        print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s")
        for label, r in rows:
            r["unet_tflops"] = tflop / (r["step_s"] * ours.steps / r["batch"])
            print(
                f"  {label.split(')')[0]}) UNet reaches {r['unet_tflops']:.0f} TFLOP/s = "
                f"{r['unet_tflops'] / peak:.0%} of it"
            )
    results.update({"ratio_b_over_a": ratio, "unet_tflop_per_image": tflop, "vae_scale": vae_scale})

    floor_psnr, floor_ssim = psnr_db(a_pixels, b_images[0].pixels), ssim_rgb(a_pixels, b_images[0].pixels)
    results["precision_floor"] = {"psnr_db": floor_psnr, "ssim": floor_ssim}
    print(
        f"\nFull calls (method 2): {batch} captions x {ours.steps} steps, one generate() each; (a) the first caption "
        f"alone. Precision floor, (a) against (b) on the first image: PSNR {floor_psnr:.2f} dB, SSIM "
        f"{floor_ssim:.4f}."
    )
    print(
        "| path | s / image | ratio vs (a) | warm-up + compile (s) | peak GiB "
        "| PSNR dB vs (b): min / p10 / median / max | SSIM vs (b): min / median | tolerance (PSNR, SSIM) | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    a_full, b_per_image = results["a"]["full_s_per_image"], b_full["s_per_image"]
    print(f"| (a) | {a_full:.3f} | 1.00x | - | - | - | - | - | - |")
    print(
        f"| (b) | {b_per_image:.3f} | {a_full / b_per_image:.2f}x | {b_full['warmup_s']:.1f} | "
        f"{b_full.get('peak_gib', float('nan')):.1f} | "
        "(reference) | (reference) | - | - |",
        flush=True,
    )
    b_full["ratio_vs_a"] = a_full / b_per_image
    save()
    print(f"  ((a) and (b) took {time.perf_counter() - t_start:.0f} s, (b)'s build + compile + calls {b_wall:.0f} s)")

    for spec in fast_specs:
        settings = dataclasses.replace(ours, **parse_fast([spec]))
        name = path_name(settings)
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            print(f"| {name} | skipped: {elapsed:.0f} s elapsed > --budget-s {args.budget_s:.0f} | | | | | | | |")
            results["paths"][name] = {"skipped": f"budget ({elapsed:.0f} s elapsed)"}
            continue
        gen = SDXLGenerator(settings, build(getattr(torch, DTYPES[settings.dtype])), device=device)
        r = full_call(gen, batch, device)
        images = r.pop("images")
        del gen
        free(device)
        cmp = compare_images(b_images, images, tolerance_for(settings), name)
        r.update(
            {
                "ratio_vs_a": a_full / r["s_per_image"],
                "ratio_vs_b": b_per_image / r["s_per_image"],
                "comparison": cmp.to_dict(),
                "elapsed_s": time.perf_counter() - t_start,
            }
        )
        results["paths"][name] = r
        ps, ss, tol = cmp.psnr, cmp.ssim_distribution, cmp.tolerance
        verdict = "pass" if cmp.passed else "FAIL: " + "; ".join(cmp.failures())
        print(
            f"| {name} | {r['s_per_image']:.3f} | {r['ratio_vs_a']:.2f}x | {r['warmup_s']:.1f} | "
            f"{r.get('peak_gib', float('nan')):.1f} | {ps.min:.2f} / {ps.p10:.2f} / {ps.median:.2f} / {ps.max:.2f} | "
            f"{ss.min:.4f} / {ss.median:.4f} | >= {tol.min_psnr_db} dB, >= {tol.min_ssim} | {verdict} |",
            flush=True,
        )
        save()
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    results["wall_s"] = time.perf_counter() - t_start
    save()


def parse_variant(ours: SynthesisSettings, variant: str) -> dict:
    changes = dict(kv.split("=", 1) for kv in variant.split(","))
    return {
        k: (v.lower() in ("1", "true", "yes")) if isinstance(getattr(ours, k), bool) else type(getattr(ours, k))(v)
        for k, v in changes.items()
    }


if __name__ == "__main__":
    sys.exit(main())
