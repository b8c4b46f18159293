"""Scoring's decode and preprocessing on the device (SPEC §3): batched JPEG decode (nvjpeg through
torchvision on CUDA, libjpeg-turbo on the CPU), then on the same device CLIP's resize, centre crop and
mean/std, and SSIM's two 8-bit grayscale images -- pixel for pixel what the PIL reference
(`stage.prepare`: PIL resizes, PIL "L") computes from the same decoded pixels.

Why not torch.nn.functional.interpolate(antialias=True), which is designed after PIL's filters: it
resamples in floating point in one 2-D pass, whereas PIL resamples one axis, rounds to uint8, then the
other, with 22-bit fixed-point coefficients. Measured on the tests' images (bilinear 768, 336 and back):
interpolate's grayscale images differ from PIL's in up to 280k pixels and SSIM by up to 9.9e-4 (SPEC
allows 1e-4); two 1-D interpolate passes with uint8 rounding between them still differ in ~4k pixels and
by up to 5e-5. So the resize here applies PIL's own integer coefficients as float64 matrices: every product and
partial sum is an integer below 2^53, exact on any device in any summation order, and the images equal
PIL's bit for bit. What the device can change is the decode only (nvjpeg is not bit-exact with
libjpeg-turbo); the benchmark measures that against the reference.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import PIL
from PIL import Image

from synthvlm_assets.scoring.ssim import SSIMSettings, ssim_torch

DECODE_PATHS = ("auto", "device", "device-resize", "workers")
CHUNK = 32  # 1024² images per float64 resize/SSIM step (one is 25 MB in float64); fewer when larger
BLOCK = 128  # outputs per matrix product of a resize pass
_PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c: 8 bits of result, 2 for overshoot, int32


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float) -> float:
    x = abs(x)  # a = -0.5, as Pillow
    if x < 1.0:
        return (1.5 * x - 2.5) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * -0.5
    return 0.0


# Pillow 13.0 runs the vertical pass first when the height shrinks by more than twice as many pixels as
# the width (Resample.c ImagingResampleInner); earlier versions always ran the horizontal pass first.
_VERTICAL_FIRST_RULE = int(PIL.__version__.split(".")[0]) >= 13
_FILTERS = {Image.BILINEAR: (_bilinear, 1.0), Image.BICUBIC: (_bicubic, 2.0)}  # Resample.c's, and supports


def resolve_decode(decode: str, device: str) -> str:
    """The path for a `ClipSettings.decode` value ("auto": "device" on a GPU, else "workers")."""
    if decode not in DECODE_PATHS:
        raise ValueError(f"scoring decode={decode!r}: expected one of {', '.join(DECODE_PATHS)}")
    if decode == "auto":
        return "device" if device.startswith("cuda") else "workers"
    return decode


@functools.lru_cache(maxsize=32)
def pil_coefficients(in_size: int, out_size: int, resample: int) -> np.ndarray:
    """Pillow's fixed-point resampling coefficients for one axis as an (out_size, in_size) matrix of
    integers (in float64): precompute_coeffs + normalize_coeffs_8bpc of Resample.c, operation for
    operation in Python floats (C doubles), for the default box (0, 0, width, height)."""
    if resample not in _FILTERS:
        raise ValueError(f"resample={resample}: only PIL's BILINEAR and BICUBIC are implemented")
    filter_, filter_support = _FILTERS[resample]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    ss = 1.0 / filterscale
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int(): C's truncation toward zero
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [filter_((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for v in w:
            ww += v
        for x, v in enumerate(w):
            k = v / ww if ww != 0.0 else v
            m[xx, xmin + x] = int((-0.5 if k < 0 else 0.5) + k * (1 << _PRECISION_BITS))
    return m


@functools.lru_cache(maxsize=32)
def _banded(in_size: int, out_size: int, resample: int, device: str) -> list:
    """The coefficient matrix cut into blocks of BLOCK outputs, each with the input columns its
    coefficients touch: (out0, out1, in0, block (out1 - out0, in1 - in0)). A dense matrix is mostly zeros
    (a 1024 -> 768 bilinear row has 3 non-zero of 1024); blocks do ~6x fewer multiply-adds."""
    import torch

    m = pil_coefficients(in_size, out_size, resample)
    blocks = []
    for o in range(0, out_size, BLOCK):
        rows = m[o : o + BLOCK]
        used = np.flatnonzero(rows.any(axis=0))
        lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
        blocks.append((o, o + rows.shape[0], lo, torch.from_numpy(rows[:, lo:hi].T.copy()).to(device)))
    return blocks


def _pass(x, in_size: int, out_size: int, resample: int):
    """One Pillow pass along the last axis of x: integer sums (exact in float64), + half, arithmetic
    shift, clip to 0..255."""
    import torch

    blocks = _banded(in_size, out_size, resample, str(x.device))
    y = torch.cat([x[..., lo : lo + k.shape[0]] @ k for _, _, lo, k in blocks], dim=-1)
    return torch.floor((y + (1 << (_PRECISION_BITS - 1))) * (1.0 / (1 << _PRECISION_BITS))).clamp_(0, 255)


def pil_resize(x, size: tuple[int, int], resample: int):
    """Image.resize((w, h), resample) of each uint8 RGB/L image of x (N, C, H, W), on x's device: two
    passes with uint8 rounding between them, in Pillow's order. Returns float64 holding the uint8 values
    (the next step needs them in float64)."""
    import torch

    h, w = size
    x = x.to(torch.float64)
    height, width = x.shape[-2:]

    def horizontal(t):
        return _pass(t, t.shape[-1], w, resample) if w != t.shape[-1] else t

    def vertical(t):
        return _pass(t.transpose(-1, -2), t.shape[-2], h, resample).transpose(-1, -2) if h != t.shape[-2] else t

    if _VERTICAL_FIRST_RULE and height - h > 0 and height - h > (width - w) * 2:
        return horizontal(vertical(x))
    return vertical(horizontal(x))


def pil_gray(rgb):
    """PIL's convert("L") of (N, 3, H, W) uint8 values: ITU-R 601-2 luma in 16-bit fixed point,
    (R*19595 + G*38470 + B*7471 + 0x8000) >> 16 (Convert.c rgb2l), as uint8 (N, H, W)."""
    import torch

    r, g, b = rgb.to(torch.int32).unbind(dim=1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)


def ssim_images(rgb, settings: SSIMSettings = SSIMSettings()):
    """`ssim.ssim_pair` on the device: A = bilinear to size², B = A to low² and back (RGB, uint8 after
    every resize), both then to PIL "L"."""
    a = pil_resize(rgb, (settings.size, settings.size), Image.BILINEAR)
    b = pil_resize(pil_resize(a, (settings.low, settings.low), Image.BILINEAR), (settings.size, settings.size),
                   Image.BILINEAR)  # fmt: skip
    return pil_gray(a), pil_gray(b)


class ClipPreprocess:
    """open_clip's image transform (torchvision Resize, CenterCrop, to-tensor, Normalize, applied to PIL
    images) for uint8 RGB tensors on the device, with the same numbers; raises ValueError for a transform
    it does not know (then score with decode="workers")."""

    _NO_OPS = ("MaybeConvertMode", "_convert_to_rgb", "MaybeToTensor", "ToTensor")

    def __init__(self, preprocess) -> None:
        from torchvision import transforms as T
        from torchvision.transforms.functional import pil_modes_mapping

        self.resize: list[int] | None = None
        self.resample = Image.BICUBIC
        self.crop: list[int] | None = None
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        for t in getattr(preprocess, "transforms", [preprocess]):
            name = getattr(t, "__name__", type(t).__name__)
            if isinstance(t, T.Resize) and t.max_size is None and self.crop is None:
                self.resize = [t.size] if isinstance(t.size, int) else list(t.size)
                self.resample = pil_modes_mapping[t.interpolation]
            elif isinstance(t, T.CenterCrop):
                self.crop = list(t.size)
            elif isinstance(t, T.Normalize):
                self.mean, self.std = list(t.mean), list(t.std)
            elif name not in self._NO_OPS:
                raise ValueError(f"CLIP preprocessing step {t!r} is not implemented on the device")
        if self.resample not in _FILTERS:
            raise ValueError(f"CLIP resize filter {self.resample} is not implemented on the device")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's Resize size rule (_compute_resized_output_size): one number is the shorter side."""
        if self.resize is None:
            return height, width
        if len(self.resize) == 2:
            return self.resize[0], self.resize[1]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize[0], int(self.resize[0] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, rgb):
        """(N, 3, H, W) uint8 -> (N, 3, S, S) float32, CLIP's input."""
        import torch
        from torchvision.transforms import functional as F

        x = pil_resize(rgb, self.output_size(*rgb.shape[-2:]), self.resample)
        if self.crop is not None:
            x = F.center_crop(x, self.crop)
        x = x.to(torch.float32).div(255)  # to_tensor's arithmetic on uint8
        return F.normalize(x, self.mean, self.std) if self.mean is not None else x


@dataclass
class DecodeCounts:
    """Where the images of a run were decoded: nvjpeg/libjpeg-turbo on the device path, or PIL (the
    workers path, and the device path's per-image fallback for JPEGs it does not decode)."""

    path: str = ""
    device: int = 0
    pil: int = 0
    pil_reasons: dict[str, int] = field(default_factory=dict)

    def fallback(self, reason: str) -> None:
        self.pil += 1
        self.pil_reasons[reason] = self.pil_reasons.get(reason, 0) + 1


def _pil_rgb(jpeg: bytes, device: str):
    import torch

    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).to(device)


def decode_jpegs(jpegs: list[bytes], device: str, counts: DecodeCounts | None = None) -> list:
    """(3, H, W) uint8 RGB tensors on `device`: one batched torchvision decode_jpeg (nvjpeg on CUDA) of
    the baseline/progressive RGB and grayscale JPEGs; PIL (then copied to the device) for the rest --
    CMYK/YCCK and other modes, whose colour conversion is PIL's and not nvjpeg's, anything that is not a
    JPEG, and any image the batched decode rejects (retried one by one to find it)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    counts = counts if counts is not None else DecodeCounts()
    out: list = [None] * len(jpegs)
    batch = []
    for i, jpeg in enumerate(jpegs):
        header = Image.open(io.BytesIO(jpeg))  # reads the header only; raises for bytes PIL cannot read
        if header.format == "JPEG" and header.mode in ("RGB", "L"):
            batch.append(i)
        else:
            out[i] = _pil_rgb(jpeg, device)
            counts.fallback(f"{header.format} {header.mode}")

    def decode(indices: list[int]) -> list:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            data = [torch.frombuffer(bytearray(jpegs[i]), dtype=torch.uint8) for i in indices]
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    if batch:
        try:
            decoded = decode(batch)
        except RuntimeError:  # the batched call returns nothing when one image fails: find which
            decoded = []
            for i in batch:
                try:
                    decoded.append(decode([i])[0])
                except RuntimeError:
                    decoded.append(None)
        for i, image in zip(batch, decoded):
            if image is None:
                out[i] = _pil_rgb(jpegs[i], device)
                counts.fallback("decode_jpeg failed")
            else:
                out[i] = image
                counts.device += 1
    return out


def prepare_on_device(images: list, clip_preprocess: ClipPreprocess, ssim_settings: SSIMSettings) -> tuple:
    """CLIP's input (N, 3, S, S) float32 and SSIM of decoded images ((3, H, W) uint8, any sizes) on
    their device; images of one size go through the float64 steps together, CHUNK 1024² images' worth."""
    import torch

    pixels: list = [None] * len(images)
    ssim = torch.empty(len(images), dtype=torch.float64, device=images[0].device if images else "cpu")
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
    for (height, width), indices in by_size.items():
        step = max(1, CHUNK * 1024 * 1024 // max(height * width, ssim_settings.size**2))
        for c in range(0, len(indices), step):
            chunk = indices[c : c + step]
            rgb = torch.stack([images[i] for i in chunk])
            for i, p in zip(chunk, clip_preprocess(rgb)):
                pixels[i] = p
            a, b = ssim_images(rgb, ssim_settings)
            ssim[chunk] = ssim_torch(a, b, ssim_settings)
    return torch.stack(pixels) if pixels else torch.empty(0), ssim


def score_jpegs_on_device(
    jpegs: list[bytes],
    captions: list[str],
    scorer,
    ssim_settings: SSIMSettings,
    clip_preprocess: ClipPreprocess,
    counts: DecodeCounts | None = None,
    decode_device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(clip_score, ssim) of one batch of JPEGs, decoded and preprocessed on `scorer.device`
    (`decode_device` decodes elsewhere, e.g. "cpu" to take nvjpeg out of a comparison)."""
    images = decode_jpegs(jpegs, decode_device or scorer.device, counts)
    images = [im.to(scorer.device) for im in images]
    pixels, ssim = prepare_on_device(images, clip_preprocess, ssim_settings)
    return scorer.clip_scores(pixels, captions), ssim.cpu().numpy()


def score_decoded_on_device(
    images: list[np.ndarray],
    captions: list[str],
    scorer,
    ssim_settings: SSIMSettings,
    clip_preprocess: ClipPreprocess,
) -> tuple[np.ndarray, np.ndarray]:
    """(clip_score, ssim) of one batch of decoded (H, W, 3) uint8 images, preprocessed on `scorer.device`."""
    import torch

    on_device = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).to(scorer.device) for a in images]
    pixels, ssim = prepare_on_device(on_device, clip_preprocess, ssim_settings)
    return scorer.clip_scores(pixels, captions), ssim.cpu().numpy()
