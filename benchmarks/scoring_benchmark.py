"""Scoring throughput and agreement, per path, on the same JPEGs: the reference (PIL + open_clip in fp32
at batch 1, scikit-image SSIM on the CPU) and the three paths of `ClipSettings.decode`, each timed from
JPEG bytes to scores (decode included):

  workers        PIL decodes and resizes in worker processes; CLIP (fp16) and SSIM batched on the device
  device-resize  PIL decodes in the worker processes; resizes, CLIP and SSIM on the device
  device         nvjpeg decodes on the GPU (libjpeg-turbo on a CPU); everything else on the device too

with the max abs differences of each path's values from the reference's, and nvjpeg's pixels against
PIL's decode (the one step of the device path that is not bit-identical to the reference).

    .venv/bin/python benchmarks/scoring_benchmark.py            # GPU: ViT-B-32 and ViT-L-14-336, 512 JPEGs
    .venv/bin/python benchmarks/scoring_benchmark.py --tiny     # anywhere: the tiny CLIP, 16 JPEGs

Random weights of the real towers (speed does not depend on the weights); images are 1024² JPEGs (q95)
of smooth random content plus noise, made in threads before any timing.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from synthvlm_assets.scoring.clip_score import ClipScorer, ClipSettings
from synthvlm_assets.scoring.device import DecodeCounts, decode_jpegs
from synthvlm_assets.scoring.ssim import SSIMSettings, ssim_reference
from synthvlm_assets.scoring.stage import decode_pool, score_images

PATHS = ("workers", "device-resize", "device")


def make_jpeg(seed: int, size: int = 1024) -> bytes:
    rng = np.random.default_rng(seed)
    small = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    noise = rng.normal(0, 8, (size, size, 3)).astype(np.int16)
    pixels = np.clip(np.asarray(image).astype(np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def make_jpegs(n: int, size: int = 1024) -> list[bytes]:
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL and numpy's generators release the GIL
        return list(pool.map(lambda i: make_jpeg(i, size), range(n)))


def reference(
    jpegs: list[bytes], captions: list[str], scorer: ClipScorer, ssim: SSIMSettings
) -> tuple[list[float], list[float], float]:
    """SPEC §3 one image at a time: PIL decode, open_clip's PIL preprocessing, fp32, scikit-image."""
    import torch.nn.functional as F

    model = scorer.model.float()
    clip, ss = [], []
    t = time.perf_counter()
    for jpeg, caption in zip(jpegs, captions):
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        with torch.inference_mode():
            i = F.normalize(model.encode_image(scorer.preprocess(image)[None].to(scorer.device)).float(), dim=-1)
            tokens = scorer.tokenizer([scorer.settings.prefix + caption]).to(scorer.device)
            tt = F.normalize(model.encode_text(tokens).float(), dim=-1)
        clip.append(max((i * tt).sum().item(), 0.0))
        ss.append(ssim_reference(image, ssim))
    sync()
    seconds = time.perf_counter() - t
    model.to(scorer.dtype)  # back to the scorer's precision for the paths
    return clip, ss, seconds


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_agreement(jpegs: list[bytes], device: str) -> str:
    """decode_jpegs on `device` (nvjpeg on CUDA) against PIL's decode: where the device path can differ."""
    counts = DecodeCounts()
    worst, total, differing, values = 0, 0, 0, 0
    for jpeg, image in zip(jpegs, decode_jpegs(jpegs, device, counts)):
        pil = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int16)
        d = np.abs(image.cpu().permute(1, 2, 0).numpy().astype(np.int16) - pil)
        worst, total, differing, values = (
            max(worst, int(d.max())),
            total + int(d.sum()),
            differing + int((d > 0).sum()),
            values + d.size,
        )
    return (
        f"decode on {device} vs PIL's, {len(jpegs)} JPEGs: max abs diff {worst}, mean {total / values:.3f}, "
        f"{differing / values:.1%} of values differ ({counts.device} decoded on the device, {counts.pil} by PIL)"
    )


def header(args: argparse.Namespace) -> None:
    import open_clip
    import PIL
    import skimage
    import torchvision

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()})"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; commit {commit or 'unknown'}")
    print(f"device: {device}, {os.cpu_count()} CPUs, {args.workers} decode workers; {args.images} JPEGs of 1024x1024")
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision {torchvision.__version__}, "
        f"open_clip {open_clip.__version__}, Pillow {PIL.__version__}, scikit-image {skimage.__version__}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--models", default="ViT-B-32,ViT-L-14-336" if gpu else "tiny")
    p.add_argument("--images", type=int, default=512 if gpu else 16)
    p.add_argument("--reference-images", type=int, default=64 if gpu else 8, help="the slow path scores this many")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--batch", type=int, default=256 if gpu else 8)
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--tiny", action="store_true", help="the tiny CLIP on 16 JPEGs (8 for the reference), 2 workers")
    args = p.parse_args()
    if args.tiny:
        args.models, args.images, args.reference_images, args.workers, args.batch = "tiny", 16, 8, 2, 8
    header(args)
    jpegs = make_jpegs(args.images)
    captions = [f"A red bus number {i} parked next to a tall building on a sunny day." for i in range(args.images)]
    ssim = SSIMSettings()
    n_ref = min(args.reference_images, args.images)
    for name in args.models.split(","):
        settings = ClipSettings(model=name, pretrained="none", batch_size=args.batch, dtype="fp16")
        torch.manual_seed(0)
        scorer = ClipScorer.load(settings)
        ref_clip, ref_ssim, ref_s = reference(jpegs[:n_ref], captions[:n_ref], scorer, ssim)
        pool = decode_pool(scorer, ssim, args.workers)  # started once, as score_shard does per shard
        rows = [f"| {name} | reference (fp32, batch 1, PIL + scikit-image) | {n_ref / ref_s:.1f} | | | | |"]
        rates = {}
        for path in args.paths.split(","):
            try:  # one device run for all figures: a path that fails prints its error, the others still run
                rows.append(
                    time_path(path, name, scorer, ssim, pool, jpegs, captions, ref_clip, ref_ssim, rates, args)
                )
            except Exception as exc:  # noqa: BLE001
                rows.append(f"| {name} | {path} | {type(exc).__name__}: {str(exc)[:200]} | | | | |")
        if pool:
            pool.shutdown()
        print(
            f"\n{name}:\n\n| model | path | images/s (JPEG bytes to scores) | vs workers | max abs diff clip "
            f"| max abs diff ssim | decoded on device / by PIL |\n|---|---|---|---|---|---|---|"
        )
        print("\n".join(rows))
        try:
            print(decode_agreement(jpegs[:n_ref], scorer.device))
        except Exception as exc:  # noqa: BLE001
            print(f"decode agreement: {type(exc).__name__}: {exc}")


def time_path(
    path: str,
    name: str,
    scorer: ClipScorer,
    ssim: SSIMSettings,
    pool,
    jpegs: list[bytes],
    captions: list[str],
    ref_clip: list[float],
    ref_ssim: list[float],
    rates: dict[str, float],
    args: argparse.Namespace,
) -> str:
    """One table row: `path` timed from JPEG bytes to scores after a warm-up, and its values' max abs
    differences from the reference's."""

    def samples(n: int):
        return zip(map(str, range(n)), jpegs[:n], captions[:n])

    # Warm-up: workers up, kernels loaded (a whole batch where that is cheap: CLIP's batch shape).
    warm = min(args.images, 2 * args.workers if path == "workers" else args.batch)
    list(score_images(samples(warm), scorer, ssim, pool=pool, decode=path))
    counts = DecodeCounts()
    sync()
    t = time.perf_counter()
    ours = list(score_images(samples(args.images), scorer, ssim, pool=pool, decode=path, counts=counts))
    sync()
    rates[path] = args.images / (time.perf_counter() - t)
    d_clip = max(abs(a - o[1]) for a, o in zip(ref_clip, ours))
    d_ssim = max(abs(a - o[2]) for a, o in zip(ref_ssim, ours))
    ratio = f"{rates[path] / rates['workers']:.2f}x" if "workers" in rates else ""
    return (
        f"| {name} | {path} | {rates[path]:.1f} | {ratio} | {d_clip:.1e} | {d_ssim:.1e} | "
        f"{counts.device} / {counts.pil} |"
    )


if __name__ == "__main__":
    main()
