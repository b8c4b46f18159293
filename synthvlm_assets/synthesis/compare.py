"""A fast path against the exact path: the same captions and seeds rendered both ways, compared per image.

    python -m synthvlm_assets.synthesis.compare --fast deepcache_interval=3 --model /weights/sdxl-base \\
        --captions coco_captions_val2017.json --n 200 --clip-model ViT-L-14-336 --clip-pretrained openai

renders the captions with the exact settings (bf16, every fast path off) and with the fast path, and
reports per-image PSNR and SSIM (their distribution) and, when a CLIP model is given, the mean
CLIPScore of each and its drop. It checks them against the fast path's tolerance (settings.py:
FAST_PATH_TOLERANCES, or --min-psnr / --min-ssim / --max-clip-drop) and exits 1 when one is missed.
With `--model tiny` it runs on a CPU in seconds (random weights: the numbers say only that it works).

PSNR is over the 8-bit RGB pixels (data range 255; identical images: inf). SSIM is scikit-image's
structural_similarity with its defaults on each RGB channel, averaged (the project's batched torch
copy of it, scoring/ssim.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from synthvlm_assets.synthesis.sdxl import Generated, SDXLGenerator
from synthvlm_assets.synthesis.settings import (
    FAST_PATHS,
    FastPathTolerance,
    SynthesisSettings,
    seed_for,
    tolerance_for,
)

# Used when no --captions file is given: varied scenes, COCO-like.
DEFAULT_CAPTIONS = (
    "A red double-decker bus driving down a busy city street.",
    "A plate of pasta with tomatoes and basil on a wooden table.",
    "Two zebras grazing in a dry grassland under a blue sky.",
    "A man riding a surfboard on a large ocean wave.",
    "A cat sleeping on a windowsill next to a potted plant.",
    "A kitchen with white cabinets, a steel fridge and a bowl of fruit.",
    "A snowy mountain road with a yellow truck and pine trees.",
    "A little girl flying a kite on a windy beach.",
    "A bowl of ramen with an egg, noodles and green onions.",
    "An old stone bridge over a river in autumn.",
    "A group of people playing frisbee in a park.",
    "A vintage bicycle leaning against a brick wall.",
    "A giraffe standing next to a tall tree at the zoo.",
    "A living room with a grey sofa, a lamp and bookshelves.",
    "A train arriving at a station platform at dusk.",
    "A close-up of a colorful parrot perched on a branch.",
)


@dataclass(frozen=True)
class Distribution:
    n: int
    min: float
    p10: float
    median: float
    mean: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        v = np.asarray(values, dtype=np.float64)
        if not len(v):
            return cls(0, *(math.nan,) * 5)
        finite = v[np.isfinite(v)]
        # PSNR is inf for identical images: the mean is over the finite ones (inf when all are identical).
        mean = float(finite.mean()) if len(finite) else math.inf
        return cls(
            len(v),
            float(v.min()),
            float(np.percentile(v, 10, method="lower")),
            float(np.median(v)),
            mean,
            float(v.max()),
        )

    def format(self, digits: int = 2) -> str:
        f = lambda x: "inf" if math.isinf(x) else f"{x:.{digits}f}"  # noqa: E731
        return (
            f"min {f(self.min)}, p10 {f(self.p10)}, median {f(self.median)}, mean {f(self.mean)}, "
            f"max {f(self.max)} (n={self.n})"
        )


@dataclass
class FastPathComparison:
    path: str  # the fast paths, e.g. "deepcache_interval=3" or "deepcache_interval=2,fp8_linear=True"
    tolerance: FastPathTolerance
    psnr_db: np.ndarray  # per image pair (both usable)
    ssim: np.ndarray
    flagged_one_side: int = 0  # images flagged (NaN, black, constant) by one path and not the other
    flagged_both: int = 0
    clip_exact: np.ndarray | None = None  # per caption, real weights only
    clip_fast: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def psnr(self) -> Distribution:
        return Distribution.of(self.psnr_db)

    @property
    def ssim_distribution(self) -> Distribution:
        return Distribution.of(self.ssim)

    @property
    def mean_clip_drop(self) -> float | None:
        if self.clip_exact is None or self.clip_fast is None:
            return None
        return float(np.mean(self.clip_exact) - np.mean(self.clip_fast))

    def failures(self) -> list[str]:
        t, out = self.tolerance, []
        if len(self.psnr_db) and self.psnr.min < t.min_psnr_db:
            n = int((self.psnr_db < t.min_psnr_db).sum())
            out.append(f"{n} image(s) below PSNR {t.min_psnr_db} dB (min {self.psnr.min:.2f})")
        if len(self.ssim) and self.ssim_distribution.min < t.min_ssim:
            n = int((self.ssim < t.min_ssim).sum())
            out.append(f"{n} image(s) below SSIM {t.min_ssim} (min {self.ssim_distribution.min:.4f})")
        if self.flagged_one_side:
            out.append(f"{self.flagged_one_side} image(s) flagged (NaN/black/constant) by one path only")
        if not len(self.psnr_db):
            out.append("no image pair to compare")
        drop = self.mean_clip_drop
        if drop is not None and drop > t.max_mean_clip_drop:
            out.append(f"mean CLIPScore drop {drop:.4f} > {t.max_mean_clip_drop}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def report(self) -> str:
        t = self.tolerance
        lines = [
            f"fast path {self.path} vs the exact path, {len(self.psnr_db)} image pairs"
            + (f" ({self.flagged_both} flagged by both, left out)" if self.flagged_both else ""),
            f"  PSNR dB: {self.psnr.format()}   tolerance: every image >= {t.min_psnr_db}",
            f"  SSIM:    {self.ssim_distribution.format(4)}   tolerance: every image >= {t.min_ssim}",
        ]
        if self.mean_clip_drop is not None:
            lines.append(
                f"  CLIPScore: exact mean {np.mean(self.clip_exact):.4f}, fast mean {np.mean(self.clip_fast):.4f}, "
                f"drop {self.mean_clip_drop:.4f}   tolerance: drop <= {t.max_mean_clip_drop}"
            )
        else:
            lines.append("  CLIPScore: not computed (needs real weights and --clip-model)")
        lines += [f"  note: {n}" for n in self.notes]
        failures = self.failures()
        lines.append("  PASS" if not failures else "  FAIL: " + "; ".join(failures))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "tolerance": self.tolerance.__dict__,
            "psnr_db": [None if math.isinf(x) else float(x) for x in self.psnr_db],
            "psnr_distribution": self.psnr.__dict__,
            "ssim": [float(x) for x in self.ssim],
            "ssim_distribution": self.ssim_distribution.__dict__,
            "flagged_one_side": self.flagged_one_side,
            "flagged_both": self.flagged_both,
            "mean_clip_exact": None if self.clip_exact is None else float(np.mean(self.clip_exact)),
            "mean_clip_fast": None if self.clip_fast is None else float(np.mean(self.clip_fast)),
            "mean_clip_drop": self.mean_clip_drop,
            "passed": self.passed,
            "failures": self.failures(),
        }


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images (data range 255); inf when they are identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim_rgb(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 HxWx3 images: scikit-image's defaults per channel, averaged over the channels."""
    import torch

    from synthvlm_assets.scoring.ssim import ssim_torch

    x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
    y = torch.from_numpy(np.ascontiguousarray(b.transpose(2, 0, 1)))
    return float(ssim_torch(x, y).mean())


def path_name(settings: SynthesisSettings) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.fast_paths().items()) or "exact"


def compare_images(
    exact: Sequence[Generated],
    fast: Sequence[Generated],
    tolerance: FastPathTolerance,
    path: str,
    captions: Sequence[str] | None = None,
    clip=None,
) -> FastPathComparison:
    """Per-image PSNR/SSIM of two renderings of the same captions and seeds; with `clip` (a ClipScorer)
    and `captions`, each rendering's CLIPScores too (over the images both paths made)."""
    if len(exact) != len(fast):
        raise ValueError(f"{len(exact)} exact images but {len(fast)} fast ones")
    psnrs, ssims, keep = [], [], []
    one_side = both = 0
    for i, (e, f) in enumerate(zip(exact, fast)):
        if e.pixels is None and f.pixels is None:
            both += 1
        elif e.pixels is None or f.pixels is None:
            one_side += 1
        else:
            psnrs.append(psnr_db(e.pixels, f.pixels))
            ssims.append(ssim_rgb(e.pixels, f.pixels))
            keep.append(i)
    result = FastPathComparison(path, tolerance, np.array(psnrs), np.array(ssims), one_side, both)
    if clip is not None and captions is not None and keep:
        texts = [captions[i] for i in keep]
        result.clip_exact = clip_scores(clip, [exact[i].pixels for i in keep], texts)
        result.clip_fast = clip_scores(clip, [fast[i].pixels for i in keep], texts)
    return result


def clip_scores(scorer, images: Sequence[np.ndarray], captions: Sequence[str]) -> np.ndarray:
    """SPEC §3's CLIPScore of uint8 images (the scorer's own preprocessing), in its batches."""
    import torch
    from PIL import Image

    out, size = [], scorer.settings.batch_size
    for i in range(0, len(images), size):
        pixels = torch.stack([scorer.preprocess(Image.fromarray(p)) for p in images[i : i + size]])
        out.append(scorer.clip_scores(pixels, list(captions[i : i + size])))
    return np.concatenate(out)


def render(
    settings: SynthesisSettings,
    captions: Sequence[str],
    seeds: Sequence[int],
    load: Callable[[SynthesisSettings], SDXLGenerator] = SDXLGenerator.load,
) -> list[Generated]:
    """Every caption with its seed, in batches of settings.batch_size; the model is freed afterwards."""
    gen = load(settings)
    out: list[Generated] = []
    for i in range(0, len(captions), settings.batch_size):
        out += gen.generate(list(captions[i : i + settings.batch_size]), list(seeds[i : i + settings.batch_size]))
    del gen
    _free_device_memory()
    return out


def compare_fast_path(
    settings: SynthesisSettings,
    captions: Sequence[str],
    seeds: Sequence[int],
    tolerance: FastPathTolerance | None = None,
    clip=None,
    load: Callable[[SynthesisSettings], SDXLGenerator] = SDXLGenerator.load,
) -> FastPathComparison:
    """Render with `settings.exact()` and with `settings` (one model in memory at a time) and compare."""
    if not settings.fast_paths():
        raise ValueError("no fast path is on: nothing to compare with the exact path")
    exact = render(settings.exact(), captions, seeds, load)
    fast = render(settings, captions, seeds, load)
    result = compare_images(exact, fast, tolerance or tolerance_for(settings), path_name(settings), captions, clip)
    if settings.is_tiny:
        result.notes.append("tiny preset: random weights, the numbers only show that the path works")
    return result


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_captions(path: str | None, n: int) -> list[str]:
    """The first `n` captions of a COCO captions JSON ({"annotations": [{"caption": ...}]}), a JSON list of
    strings, or a text file with one caption a line; the built-in ones without a file."""
    if path is None:
        captions = list(DEFAULT_CAPTIONS)
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        items = doc["annotations"] if isinstance(doc, dict) else doc
        captions = [a["caption"] if isinstance(a, dict) else a for a in items]
    else:
        with open(path, encoding="utf-8") as f:
            captions = [line.strip() for line in f if line.strip()]
    return [" ".join(c.split()) for c in captions[:n]]


def parse_fast(values: Sequence[str]) -> dict:
    """['deepcache_interval=3', 'fp8_linear=true'] -> {'deepcache_interval': 3, 'fp8_linear': True}."""
    out = {}
    for item in values:
        for kv in item.split(","):
            k, _, v = kv.partition("=")
            if k not in FAST_PATHS:
                raise SystemExit(f"unknown fast path {k!r}: one of {', '.join(FAST_PATHS)}")
            off = FAST_PATHS[k]
            if isinstance(off, bool):
                out[k] = v.lower() in ("", "1", "true", "yes", "on")
            else:
                out[k] = type(off)(v)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m synthvlm_assets.synthesis.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--fast", action="append", required=True, metavar="SETTING=VALUE[,SETTING=VALUE]")
    p.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0", help="HF id, folder, s3://, tiny")
    p.add_argument("--revision", default=None)
    p.add_argument("--captions", default=None, help="COCO JSON, JSON list or text file (default: 16 built in)")
    p.add_argument("--n", type=int, default=16, help="how many captions (one image each)")
    p.add_argument("--steps", type=int, default=None, help="default: the settings' (60)")
    p.add_argument("--size", type=int, default=None, help="height = width (default: 1024; tiny: 32)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--clip-model", default=None, help="open_clip name (e.g. ViT-L-14-336) or tiny: adds CLIPScore")
    p.add_argument("--clip-pretrained", default="openai", help="open_clip tag, local file or s3:// file")
    p.add_argument("--min-psnr", type=float, default=None)
    p.add_argument("--min-ssim", type=float, default=None)
    p.add_argument("--max-clip-drop", type=float, default=None)
    p.add_argument("--cache-dir", default=None, help="local copy of weights read from s3://")
    p.add_argument("--out", default=None, help="write the comparison as JSON here")
    args = p.parse_args(argv)

    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    if args.size:
        overrides.update(height=args.size, width=args.size)
    fast = parse_fast(args.fast)
    if args.model == "tiny":
        settings = SynthesisSettings.tiny(dtype="bf16", **overrides, **fast)
    else:
        settings = SynthesisSettings(model=args.model, revision=args.revision, **overrides, **fast)
    tolerance = tolerance_for(settings)
    tolerance = replace(
        tolerance,
        **{
            k: v
            for k, v in (
                ("min_psnr_db", args.min_psnr),
                ("min_ssim", args.min_ssim),
                ("max_mean_clip_drop", args.max_clip_drop),
            )
            if v is not None
        },
    )
    captions = read_captions(args.captions, args.n)
    seeds = [seed_for(f"compare:{i}", 0) for i in range(len(captions))]
    clip = None
    if args.clip_model:
        from synthvlm_assets.scoring.clip_score import ClipScorer, ClipSettings

        clip = ClipScorer.load(ClipSettings(model=args.clip_model, pretrained=args.clip_pretrained), args.cache_dir)
    result = compare_fast_path(
        settings, captions, seeds, tolerance, clip, load=lambda s: SDXLGenerator.load(s, args.cache_dir)
    )
    print(
        f"{settings.model}: {len(captions)} captions, {settings.steps} steps, {settings.height}x{settings.width}, "
        f"guidance {settings.guidance_scale}, exact path {settings.dtype}"
    )
    print(result.report())
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": settings.image_settings(), **result.to_dict()}, f, indent=1)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
