"""Scoring's device path (scoring/device.py) against the PIL + scikit-image reference, on the CPU.

On the CPU torchvision decodes with libjpeg-turbo, as PIL does, so the device path must reproduce the
reference's pixels exactly: SSIM's two grayscale images and CLIP's input tensor are compared pixel for
pixel, SSIM to SPEC's 1e-4 and CLIPScore (tiny model, fp32) to 1e-5 (measured: 2.7e-14 and 3.0e-8). The
pixel comparison catches what SSIM's tolerance can miss: truncating instead of rounding to grayscale moves
SSIM by 5e-4 on photo_1024 but by 1.3e-5 on cmyk (test_a_wrong_grayscale_rounding_is_caught). On a GPU
nvjpeg decodes, which is not bit-exact; benchmarks/scoring_benchmark.py measures that against the reference.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import synthvlm_assets.scoring.device as device
from synthvlm_assets.scoring.clip_score import ClipScorer, ClipSettings
from synthvlm_assets.scoring.device import (
    ClipPreprocess,
    DecodeCounts,
    decode_jpegs,
    pil_gray,
    pil_resize,
    prepare_on_device,
    resolve_decode,
    ssim_images,
)
from synthvlm_assets.scoring.ssim import SSIMSettings, ssim_pair, ssim_reference, ssim_torch
from synthvlm_assets.scoring.stage import score_images

SSIM_TOLERANCE = 1e-4  # SPEC §3
CLIP_TOLERANCE = 1e-5  # fp32 on the CPU, batched against one by one; the inputs are identical


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Photo-like content: a sky-to-ground gradient, smooth texture, hard-edged shapes, thin lines and
    sensor noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    base = rng.uniform(0, 255, 3) * (1 - y) + rng.uniform(0, 255, 3) * y
    small = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8))
    texture = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.float64)
    image = Image.fromarray(np.clip(0.6 * base + 0.4 * texture, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = [x0, y0, x0 + rng.integers(8, width // 2), y0 + rng.integers(8, height // 2)]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    for _ in range(40):
        xy = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(2)]
        draw.line(xy, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def fine_lines(size: int = 1024) -> Image.Image:
    """Lines 3 px apart: detail a 336-px round trip loses, where resampling errors show most in SSIM."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for i in range(0, size, 3):
        draw.line([(i, 0), (size - 1 - i, size - 1)], fill=(i % 256, 0, 255 - i % 256))
    return image


def jpeg(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **{"quality": 90, **options})
    return buf.getvalue()


def cmyk_photo(width: int, height: int, seed: int) -> Image.Image:
    """CMYK with a real black channel (PIL's RGB -> CMYK conversion leaves K at 0)."""
    rgb = np.asarray(photo(width, height, seed), dtype=np.int16)
    k = rgb.min(axis=2, keepdims=True) // 2
    return Image.fromarray(np.concatenate([255 - rgb - k, k], axis=2).clip(0, 255).astype(np.uint8), "CMYK")


@functools.cache
def varied_jpegs() -> dict[str, bytes]:
    checker = np.kron(np.random.default_rng(9).integers(0, 2, (64, 64, 1)) * 255, np.ones((16, 16, 3)))
    return {
        "photo_1024": jpeg(photo(1024, 1024, 0)),
        "photo_1024_q95_444": jpeg(photo(1024, 1024, 1), quality=95, subsampling=0),
        "landscape_1024x768": jpeg(photo(1024, 768, 2)),
        "portrait_832x1216": jpeg(photo(832, 1216, 3)),
        "small_300x200": jpeg(photo(300, 200, 4)),  # CLIP upscales it (shorter side 200 < 224)
        "wide_1024x256": jpeg(photo(1024, 256, 5)),
        "grayscale": jpeg(photo(768, 768, 6).convert("L")),
        "cmyk": jpeg(cmyk_photo(640, 480, 7)),
        "progressive": jpeg(photo(1024, 1024, 8), progressive=True),
        "low_quality": jpeg(photo(800, 800, 10), quality=25),
        "high_contrast": jpeg(Image.fromarray(checker.astype(np.uint8))),
        "fine_lines": jpeg(fine_lines(), quality=60),
        "flat": jpeg(Image.new("RGB", (512, 512), (90, 120, 200))),
    }


NAMES = (
    "photo_1024 photo_1024_q95_444 landscape_1024x768 portrait_832x1216 small_300x200 wide_1024x256 grayscale cmyk "
    "progressive low_quality high_contrast fine_lines flat"
).split()  # varied_jpegs' keys, without making the JPEGs at collection


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return ClipScorer.load(ClipSettings(model="tiny", batch_size=5))


def agreement(data: bytes, scorer: ClipScorer) -> dict:
    """The device path's steps on the CPU against the PIL reference, for one JPEG."""
    counts = DecodeCounts()
    (rgb,) = decode_jpegs([data], "cpu", counts)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    ref_a, ref_b = ssim_pair(image)
    a, b = ssim_images(rgb[None])
    pixels = ClipPreprocess(scorer.preprocess)(rgb[None])[0]
    return {
        "counts": counts,
        "decoded_pixels_differing": int((rgb.permute(1, 2, 0).numpy() != np.asarray(image)).sum()),
        "gray_pixels_differing": int((a[0].numpy() != ref_a).sum() + (b[0].numpy() != ref_b).sum()),
        "ssim_diff": abs(ssim_torch(a, b).item() - ssim_reference(image)),
        "clip_pixels_diff": (pixels - scorer.preprocess(image)).abs().max().item(),
    }


@pytest.mark.parametrize("name", NAMES)
def test_device_path_equals_the_reference(name, scorer):
    assert sorted(NAMES) == sorted(varied_jpegs())
    got = agreement(varied_jpegs()[name], scorer)
    assert got["decoded_pixels_differing"] == 0  # libjpeg-turbo both, or PIL's fallback
    assert got["gray_pixels_differing"] == 0
    assert got["ssim_diff"] <= SSIM_TOLERANCE
    assert got["clip_pixels_diff"] == 0.0
    # CMYK goes through PIL (its colour conversion is the reference's); the rest through decode_jpeg.
    assert (got["counts"].device, got["counts"].pil) == ((0, 1) if name == "cmyk" else (1, 0))
    if name == "cmyk":
        assert got["counts"].pil_reasons == {"JPEG CMYK": 1}


def reference_scores(
    samples: list[tuple[str, bytes, str]], scorer: ClipScorer, ssim_settings: SSIMSettings
) -> dict[str, tuple[float, float]]:
    """One by one, fp32: PIL decode, open_clip's PIL preprocessing, scikit-image SSIM."""
    out = {}
    for key, data, caption in samples:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        with torch.no_grad():
            i = F.normalize(scorer.model.encode_image(scorer.preprocess(image)[None]).float(), dim=-1)
            tokens = scorer.tokenizer([scorer.settings.prefix + caption])
            t = F.normalize(scorer.model.encode_text(tokens).float(), dim=-1)
        out[key] = (max((i * t).sum().item(), 0.0), ssim_reference(image, ssim_settings))
    return out


def test_every_path_scores_like_the_reference(scorer):
    """Batches mixing sizes, a CMYK fallback and output order, through score_images on every path (with
    smaller SSIM sizes, which also shows the settings reach the device path; 768/336 are tested above)."""
    ssim_settings = SSIMSettings(size=256, low=112)
    names = ["small_300x200", "cmyk", "wide_1024x256", "flat", "small_300x200", "grayscale"]
    samples = [(f"{i}:{n}", varied_jpegs()[n], f"a photo number {i} of {n}") for i, n in enumerate(names)]
    reference = reference_scores(samples, scorer, ssim_settings)
    assert any(c > 0 for c, _ in reference.values())  # not all clamped to 0: the comparison means something
    for path in ("device", "device-resize", "workers"):
        counts = DecodeCounts()
        got = list(score_images(samples, scorer, ssim_settings, decode=path, counts=counts))
        assert [k for k, _, _ in got] == [k for k, _, _ in samples]
        for key, clip, ssim in got:
            assert abs(clip - reference[key][0]) <= CLIP_TOLERANCE, (path, key)
            assert abs(ssim - reference[key][1]) <= SSIM_TOLERANCE, (path, key)
        expected = {"device": (5, 1), "device-resize": (0, 6), "workers": (0, 6)}[path]
        assert (counts.path, counts.device, counts.pil) == (path, *expected)


def test_chunking_does_not_change_the_values(monkeypatch, scorer):
    """Images of one size go through the float64 steps together, in chunks; one image per chunk gives the
    same values."""
    images = decode_jpegs([varied_jpegs()[n] for n in ("small_300x200", "flat", "small_300x200")], "cpu")
    settings, clip_preprocess = SSIMSettings(size=128, low=56), ClipPreprocess(scorer.preprocess)
    together = prepare_on_device(images, clip_preprocess, settings)
    monkeypatch.setattr(device, "CHUNK", 0)
    one_by_one = prepare_on_device(images, clip_preprocess, settings)
    assert all(torch.equal(a, b) for a, b in zip(together, one_by_one))


def test_images_the_batched_decode_rejects_fall_back_to_pil(monkeypatch):
    """decode_jpeg returns nothing for a batch with one bad image (nvjpeg rejects some JPEGs): the image
    is found one by one and decoded by PIL; anything that is not a JPEG goes to PIL from its header."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    rejected = varied_jpegs()["progressive"]

    def picky(data, **kwargs):
        if any(bytes(t.numpy()) == rejected for t in data):
            raise RuntimeError("Error while decoding JPEG images")
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    png = io.BytesIO()
    photo(64, 48, 11).save(png, "PNG")
    inputs = [varied_jpegs()["small_300x200"], rejected, png.getvalue(), varied_jpegs()["grayscale"]]
    counts = DecodeCounts()
    decoded = decode_jpegs(inputs, "cpu", counts)
    assert (counts.device, counts.pil) == (2, 2)
    assert counts.pil_reasons == {"decode_jpeg failed": 1, "PNG RGB": 1}
    for data, rgb in zip(inputs, decoded):
        assert np.array_equal(rgb.permute(1, 2, 0).numpy(), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_a_wrong_grayscale_rounding_is_caught(monkeypatch, scorer):
    """PIL's "L" rounds ((... + 0x8000) >> 16); truncating changes half of all colours by 1. SSIM moves
    out of tolerance on photo_1024 (5e-4) but not on cmyk (1.3e-5): the pixel comparison sees both."""

    def truncating(rgb):
        r, g, b = rgb.to(torch.int32).unbind(dim=1)
        return ((r * 19595 + g * 38470 + b * 7471) >> 16).to(torch.uint8)

    monkeypatch.setattr(device, "pil_gray", truncating)
    photo_1024, cmyk = (agreement(varied_jpegs()[name], scorer) for name in ("photo_1024", "cmyk"))
    assert photo_1024["gray_pixels_differing"] > 0 and photo_1024["ssim_diff"] > SSIM_TOLERANCE
    assert cmyk["gray_pixels_differing"] > 0


def test_float_interpolation_misses_the_tolerance(monkeypatch, scorer):
    """Why the resize reproduces Pillow's fixed point: F.interpolate(antialias=True), made after PIL's
    filters, resamples in one float pass without PIL's uint8 rounding between passes, and moves SSIM by
    more than 1e-4 (2.3e-4 on fine_lines; up to 9.9e-4 on this set) and CLIP's input by up to 0.24."""

    def interpolate(x, size, resample):
        mode = {Image.BILINEAR: "bilinear", Image.BICUBIC: "bicubic"}[resample]
        y = F.interpolate(x.to(torch.float32), size=size, mode=mode, antialias=True, align_corners=False)
        return torch.floor(y + 0.5).clamp(0, 255).to(torch.float64)

    monkeypatch.setattr(device, "pil_resize", interpolate)
    got = agreement(varied_jpegs()["fine_lines"], scorer)
    assert got["gray_pixels_differing"] > 0 and got["ssim_diff"] > SSIM_TOLERANCE and got["clip_pixels_diff"] > 0


@pytest.mark.parametrize("resample", [Image.BILINEAR, Image.BICUBIC])
@pytest.mark.parametrize(
    "in_size,out_size",
    [((1024, 1024), (768, 768)), ((768, 768), (336, 336)), ((336, 336), (768, 768)), ((200, 300), (224, 336)),
     ((1216, 832), (327, 224)), ((7, 5), (3, 11)), ((100, 1), (50, 1)),
     # Pillow 13 runs the vertical pass first when the height shrinks by over twice the width's pixels
     ((1216, 832), (768, 768)), ((1000, 600), (300, 500)), ((500, 300), (249, 175)), ((500, 300), (250, 175))],
)  # fmt: skip
def test_pil_resize_is_pillow_bit_for_bit(in_size, out_size, resample):
    rng = np.random.default_rng(sum(in_size) + sum(out_size) + resample)
    for channels in (3, 1):
        pixels = (rng.random((*in_size, channels)) * 255).astype(np.uint8)
        pixels[: in_size[0] // 2, : in_size[1] // 2] = 255 * (pixels[: in_size[0] // 2, : in_size[1] // 2] > 127)
        image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)
        expected = np.asarray(image.resize(out_size[::-1], resample)).reshape(*out_size, channels)
        got = pil_resize(torch.from_numpy(pixels).permute(2, 0, 1)[None], out_size, resample)
        assert got.dtype == torch.float64
        assert np.array_equal(got[0].permute(1, 2, 0).numpy(), expected)


def test_pil_gray_equals_pil_l_for_every_colour():
    v = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(pil_gray(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0].numpy(), expected)


def test_clip_preprocess_follows_the_transform_it_is_given():
    """The 336-px tower's transform, and a non-square image whose centre crop has an odd margin."""
    transform = open_clip.image_transform(336, is_train=False)
    image = photo(501, 337, 12)
    rgb = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]
    assert torch.equal(ClipPreprocess(transform)(rgb)[0], transform(image))
    with pytest.raises(ValueError, match="not implemented on the device"):
        ClipPreprocess(open_clip.image_transform(224, is_train=True))


def test_decode_setting():
    assert resolve_decode("auto", "cpu") == "workers"
    assert resolve_decode("auto", "cuda") == "device"
    assert resolve_decode("device-resize", "cpu") == "device-resize"
    with pytest.raises(ValueError, match="decode='gpu'"):
        resolve_decode("gpu", "cuda")
    assert ClipSettings().decode == "auto"
