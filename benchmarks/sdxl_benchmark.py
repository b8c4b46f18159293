"""SDXL synthesis speed: SynthVLM's code path (a) against this project's default path (b), side by
side in one process on one device, with random weights of the real SDXL base architecture.

    .venv/bin/python benchmarks/sdxl_benchmark.py                  # on a GPU: SDXL base at 1024², 60 steps
    .venv/bin/python benchmarks/sdxl_benchmark.py --preset tiny    # on a CPU: the tiny preset (shapes only)

(a) fp16, batch 1, eager, VAE decoded in fp32: one pipeline call per caption, as SynthVLM's script.
(b) SDXLGenerator with the project's defaults (bf16, batch 8, torch.compile + channels_last on CUDA).
Timing (BASELINES.md's method): the pipeline with output_type="latent" for 2 and 12 steps, the faster
of two runs each, per step = (t12 - t2) / 10; text encoding and VAE decode timed on their own;
s/image = (text + steps * step + VAE) / batch. `--validate` also times one real full call of (b).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from synthvlm_assets.synthesis.sdxl import DTYPES, SDXLGenerator, _vae_decode
from synthvlm_assets.synthesis.settings import SynthesisSettings


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


def measure(pipe, batch: int, settings: SynthesisSettings, device: str, vae_dtype: torch.dtype) -> dict:
    prompts = [f"A photo of a red double-decker bus number {i} driving down a busy street." for i in range(batch)]

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


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["sdxl", "tiny"], default="sdxl" if torch.cuda.is_available() else "tiny")
    p.add_argument("--batch", type=int, default=None, help="batch of path (b) (default: the project's default)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="SETTING=VALUE[,SETTING=VALUE]",
        help="also measure (b) with these execution settings changed, e.g. fuse_qkv=true (repeatable)",
    )
    p.add_argument("--validate", action="store_true", help="also time one real full-length call of (b)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.preset == "sdxl" and device != "cuda":
        raise SystemExit(
            "the SDXL-size benchmark needs a GPU (the full UNet takes ~30 s per step on a CPU): use --preset tiny"
        )

    if args.preset == "sdxl":
        from synthvlm_assets.models.sdxl_arch import UNET, random_sdxl_pipeline

        ours = SynthesisSettings()
        build = lambda dtype: random_sdxl_pipeline(device, dtype)  # noqa: E731
        unet_config = UNET
    else:
        from synthvlm_assets.models.tiny import tiny_sdxl_pipeline

        ours = SynthesisSettings.tiny()
        build = lambda dtype: tiny_sdxl_pipeline().to(device, dtype)  # noqa: E731
        unet_config = dict(tiny_sdxl_pipeline().unet.config)
    if args.batch:
        ours = SynthesisSettings(**{**ours.__dict__, "batch_size": args.batch})
    half = torch.float16 if device == "cuda" else torch.float32  # CPUs have no fast fp16 path
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(
        f"device: {name}; torch {torch.__version__}; preset {args.preset}; {ours.height}x{ours.width}, {ours.steps} "
        f"steps, guidance {ours.guidance_scale}"
    )

    results = {}
    pipe = build(half)
    results["a"] = measure(pipe, 1, ours, device, torch.float32)  # SynthVLM: fp16, batch 1, eager, VAE in fp32
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    gen = SDXLGenerator(ours, build(getattr(torch, DTYPES[ours.dtype])), device=device)
    results["b"] = measure(gen.base, ours.batch_size, ours, device, gen.base.vae.dtype)
    if args.validate:
        prompts = [f"validation prompt {i}" for i in range(ours.batch_size)]
        t = best_of(lambda: gen.generate(prompts, list(range(ours.batch_size))), device, runs=1)
        results["b"]["validated_s_per_image"] = t / ours.batch_size

    rows = [
        (
            f"(a) SynthVLM: {'fp16' if half == torch.float16 else 'fp32 (no fast fp16 on this device)'}, batch 1, "
            "eager, VAE fp32",
            results["a"],
        ),
        (
            f"(b) this project: {ours.dtype}, batch {ours.batch_size}, compile={ours.compile and device == 'cuda'}, "
            f"fuse_qkv={ours.fuse_qkv}",
            results["b"],
        ),
    ]
    for i, variant in enumerate(args.variant):
        del gen
        if device == "cuda":
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        changes = dict(kv.split("=", 1) for kv in variant.split(","))
        typed = {
            k: (v.lower() in ("1", "true", "yes")) if isinstance(getattr(ours, k), bool) else type(getattr(ours, k))(v)
            for k, v in changes.items()
        }
        settings = SynthesisSettings(**{**ours.__dict__, **typed})
        gen = SDXLGenerator(settings, build(getattr(torch, DTYPES[settings.dtype])), device=device)
        results[f"variant{i}"] = measure(gen.base, settings.batch_size, settings, device, gen.base.vae.dtype)
        results[f"variant{i}"]["settings"] = typed
        rows.append((f"(b{i + 1}) (b) with {variant}", results[f"variant{i}"]))

    tflop = unet_tflop_per_image(unet_config, ours, gen.base.vae_scale_factor)
    peak = bf16_peak_tflops(device)
    print("\n| path | UNet step (ms) | text enc (ms) | VAE (ms) | s / image | images / s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(
            f"| {label} | {r['step_s'] * 1e3:.1f} | {r['text_s'] * 1e3:.1f} | {r['vae_s'] * 1e3:.1f} | "
            f"{r['s_per_image']:.3f} | {r['images_per_s']:.3f} | {r.get('peak_gib', float('nan')):.1f} |"
        )
    ratio = results["b"]["images_per_s"] / results["a"]["images_per_s"]
    for label, r in rows[2:]:
        print(f"ratio {label.split(')')[0]})/a: {r['images_per_s'] / results['a']['images_per_s']:.2f}x")
    print(f"\nratio b/a: {ratio:.2f}x   UNet FLOPs per image: {tflop:.4g} TFLOP ({ours.steps} steps, CFG pair)")
    if peak:
        results["bf16_peak_tflops"] = peak
        print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s")
        for label, r in rows:
            r["unet_tflops"] = tflop / (r["step_s"] * ours.steps / r["batch"])
            print(
                f"  {label.split(')')[0]}) UNet reaches {r['unet_tflops']:.0f} TFLOP/s = "
                f"{r['unet_tflops'] / peak:.0%} of it"
            )
    if "validated_s_per_image" in results["b"]:
        print(f"validation: one full call of (b) took {results['b']['validated_s_per_image']:.3f} s/image")
    results.update({"device": name, "preset": args.preset, "ratio_b_over_a": ratio, "unet_tflop_per_image": tflop})
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
