"""Scoring throughput: the reference path (PIL + open_clip in fp32 at batch 1, scikit-image SSIM on
the CPU) against the project's path (decode/resize in worker processes, CLIP batched in half precision
and SSIM in torch on the device), side by side on the same JPEGs, with the values compared.

    .venv/bin/python benchmarks/scoring_benchmark.py                       # GPU: ViT-B-32 and ViT-L-14-336
    .venv/bin/python benchmarks/scoring_benchmark.py --models tiny         # CPU: the tiny CLIP

Random weights of the real towers (speed does not depend on the weights); images are 1024² JPEGs
(q95) of smooth random content, decoded as part of the timing.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time

import numpy as np
import torch
from PIL import Image

from synthvlm_assets.scoring.clip_score import ClipScorer, ClipSettings
from synthvlm_assets.scoring.ssim import SSIMSettings, ssim_reference
from synthvlm_assets.scoring.stage import decode_pool, prepare, score_images, score_prepared


def make_jpegs(n: int, size: int = 1024, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        noise = (rng.normal(0, 8, (size, size, 3))).astype(np.int16)
        pixels = np.clip(np.asarray(image).astype(np.int16) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def reference(
    jpegs: list[bytes], captions: list[str], scorer: ClipScorer, ssim: SSIMSettings
) -> tuple[list[float], list[float], float]:
    import torch.nn.functional as F

    model = scorer.model.float()
    clip, ss = [], []
    t = time.perf_counter()
    for jpeg, caption in zip(jpegs, captions):
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        with torch.inference_mode():
            i = F.normalize(model.encode_image(scorer.preprocess(image)[None].to(scorer.device)).float(), dim=-1)
            tt = F.normalize(
                model.encode_text(scorer.tokenizer([scorer.settings.prefix + caption]).to(scorer.device)).float(),
                dim=-1,
            )
        clip.append(max((i * tt).sum().item(), 0.0))
        ss.append(ssim_reference(image, ssim))
    if scorer.device == "cuda":
        torch.cuda.synchronize()
    return clip, ss, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--models", default="ViT-B-32,ViT-L-14-336" if gpu else "tiny")
    p.add_argument("--images", type=int, default=512 if gpu else 64)
    p.add_argument("--reference-images", type=int, default=64 if gpu else 16, help="the slow path scores this many")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()})"
    print(f"device: {device}, {os.cpu_count()} CPUs, {args.workers} decode workers; {args.images} JPEGs of 1024x1024")
    jpegs = make_jpegs(args.images)
    captions = [f"A red bus number {i} parked next to a tall building on a sunny day." for i in range(args.images)]
    ssim = SSIMSettings()
    print(
        "\n| model | reference images/s (fp32, batch 1, scikit-image) | ours images/s | ratio | decode+resize only "
        "(workers) | CLIP+SSIM only (device) | max abs diff clip | max abs diff ssim |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        settings = ClipSettings(model=name, pretrained="none", batch_size=args.batch, dtype="fp16")
        torch.manual_seed(0)
        scorer = ClipScorer.load(settings)
        n_ref = min(args.reference_images, args.images)
        pool = decode_pool(scorer, ssim, args.workers)  # started once, as score_shard does per shard
        samples = lambda n: zip(map(str, range(n)), jpegs[:n], captions[:n])  # noqa: E731
        list(score_images(samples(2 * args.workers), scorer, ssim, pool=pool))  # warm-up: workers up, kernels loaded
        sync(gpu)
        t = time.perf_counter()
        ours = list(score_images(samples(args.images), scorer, ssim, pool=pool))
        sync(gpu)
        fast = args.images / (time.perf_counter() - t)
        # Where the time goes: the CPU side alone, then the device side alone on prepared inputs.
        t = time.perf_counter()
        prepared = list(pool.map(prepare, jpegs, chunksize=8)) if pool else [prepare(j) for j in jpegs]
        decode_rate = args.images / (time.perf_counter() - t)
        if pool:
            pool.shutdown()
        device_rate = device_only(prepared, captions, scorer, ssim, gpu)
        ref_clip, ref_ssim, ref_s = reference(jpegs[:n_ref], captions[:n_ref], scorer, ssim)
        slow = n_ref / ref_s
        d_clip = max(abs(a - o[1]) for a, o in zip(ref_clip, ours))
        d_ssim = max(abs(a - o[2]) for a, o in zip(ref_ssim, ours))
        print(
            f"| {name} | {slow:.1f} | {fast:.1f} | {fast / slow:.1f}x | {decode_rate:.1f} | {device_rate:.1f} | "
            f"{d_clip:.1e} | {d_ssim:.1e} |"
        )


def sync(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()


def device_only(prepared: list, captions: list[str], scorer: ClipScorer, ssim: SSIMSettings, gpu: bool) -> float:
    """images/s of the device work alone (CLIP towers + SSIM) on already prepared inputs."""
    b = scorer.settings.batch_size
    t = time.perf_counter()
    for i in range(0, len(prepared), b):
        score_prepared(prepared[i : i + b], captions[i : i + b], scorer, ssim)
    sync(gpu)
    return len(prepared) / (time.perf_counter() - t)


if __name__ == "__main__":
    main()
