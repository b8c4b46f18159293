"""SDXL fast paths on the tiny preset (CPU): step caching (deepcache_interval) and FP8 linear layers
(fp8_linear): opt-in, in the image key, wired into the generator, and the quality comparison."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from synthvlm_assets.models.tiny import tiny_sdxl_pipeline
from synthvlm_assets.synthesis import compare
from synthvlm_assets.synthesis.deepcache import DeepCache
from synthvlm_assets.synthesis.fp8 import FP8Linear, apply_fp8_linear, fp8_layer_names, fp8_support_error
from synthvlm_assets.synthesis.sdxl import Generated, SDXLGenerator
from synthvlm_assets.synthesis.settings import (
    FAST_PATH_TOLERANCES,
    FastPathTolerance,
    SynthesisSettings,
    image_key,
    tolerance_for,
)

EXACT = SynthesisSettings.tiny(steps=7, batch_size=4, dtype="bf16")
PROMPTS, SEEDS = ["a red bus", "a green tree", "a cat on a sofa"], [11, 22, 33]


@pytest.fixture(scope="module")
def exact_images():
    return SDXLGenerator(EXACT, tiny_sdxl_pipeline()).generate(PROMPTS, SEEDS)


def pixels(images: list[Generated]) -> list[np.ndarray]:
    assert all(g.flag is None for g in images)
    return [g.pixels for g in images]


def same(a: list[Generated], b: list[Generated]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))


def max_diff(a: list[Generated], b: list[Generated]) -> int:
    return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(pixels(a), pixels(b)))


# -- settings and image keys ----------------------------------------------------------------------
def test_fast_paths_are_opt_in_and_part_of_the_image_key():
    # Pinned: the keys of images made before the fast paths existed are unchanged (fast paths off: not in the key).
    assert image_key("a dog", 5, SynthesisSettings()) == "fec6ce93137213137aced2228f470f75"
    assert image_key("a dog", 5, SynthesisSettings.tiny()) == "627702ce99cfc8559293341813c35ed8"
    assert SynthesisSettings().fast_paths() == {} and "deepcache_interval" not in SynthesisSettings().image_settings()

    keys = {
        image_key("a dog", 5, s)
        for s in (
            EXACT,
            dataclasses.replace(EXACT, deepcache_interval=2),
            dataclasses.replace(EXACT, deepcache_interval=3),
            dataclasses.replace(EXACT, fp8_linear=True),
            dataclasses.replace(EXACT, fp8_linear=True, deepcache_interval=3),
        )
    }
    assert len(keys) == 5  # an image made with a fast path is never served as the exact one
    fast = dataclasses.replace(EXACT, fp8_linear=True, deepcache_interval=3)
    assert fast.fast_paths() == {"deepcache_interval": 3, "fp8_linear": True}
    assert fast.image_settings()["deepcache_interval"] == 3 and fast.image_settings()["fp8_linear"] is True
    assert fast.exact() == EXACT and image_key("a", 1, fast.exact()) == image_key("a", 1, EXACT)


def test_fast_path_settings_are_checked():
    with pytest.raises(ValueError, match="deepcache_interval must be >= 1"):
        SynthesisSettings(deepcache_interval=0)
    with pytest.raises(ValueError, match="fp8_linear needs dtype='bf16'"):
        SynthesisSettings.tiny(fp8_linear=True)  # the tiny preset's default dtype is fp32
    with pytest.raises(ValueError, match="no fast path is on"):
        tolerance_for(EXACT)
    assert tolerance_for(dataclasses.replace(EXACT, fp8_linear=True)) == FAST_PATH_TOLERANCES["fp8_linear"]
    both = tolerance_for(dataclasses.replace(EXACT, fp8_linear=True, deepcache_interval=2))
    parts = FAST_PATH_TOLERANCES.values()
    assert both.min_psnr_db == min(t.min_psnr_db for t in parts) and both.min_ssim == min(t.min_ssim for t in parts)


# -- step caching ---------------------------------------------------------------------------------
def test_deepcache_with_every_step_a_key_step_is_the_exact_path(exact_images):
    """Interval 1 with the hooks installed: every block runs through them, and the images are bit for bit
    the exact path's (the hooks change nothing on key steps)."""
    gen = SDXLGenerator(EXACT, tiny_sdxl_pipeline())
    cache = DeepCache(gen.base.unet, 1)
    gen.deepcache[id(gen.base)] = cache
    assert same(gen.generate(PROMPTS, SEEDS), exact_images)
    assert (cache.key_steps, cache.skipped_steps) == (7, 0)


def test_deepcache_skips_the_deep_blocks_on_non_key_steps(exact_images):
    settings = dataclasses.replace(EXACT, deepcache_interval=3)
    gen = SDXLGenerator(settings, tiny_sdxl_pipeline())
    (cache,) = gen.deepcache.values()
    unet = gen.base.unet
    calls = {"deep": 0, "shallow": 0}
    unet.mid_block.resnets[0].register_forward_hook(lambda *_: calls.__setitem__("deep", calls["deep"] + 1))
    unet.down_blocks[0].resnets[0].register_forward_hook(lambda *_: calls.__setitem__("shallow", calls["shallow"] + 1))
    images = gen.generate(PROMPTS, SEEDS)
    assert calls == {"deep": 3, "shallow": 7}  # key steps 0, 3 and 6 of 7; the shallow blocks every step
    assert (cache.key_steps, cache.skipped_steps) == (3, 4)
    assert not same(images, exact_images)  # an approximation: not the exact path's pixels
    assert all(compare.psnr_db(a, b) > 20 for a, b in zip(pixels(images), pixels(exact_images)))
    # The same images again: no state is kept between calls. Alone, to rounding: CPU kernels are not exactly
    # batch-invariant, in the exact path either (~1e-6 in the UNet's output; the fp32 path's pixels happen to agree).
    assert same(gen.generate(PROMPTS, SEEDS), images)
    assert max_diff(gen.generate(PROMPTS[1:2], SEEDS[1:2]), images[1:2]) <= 2
    assert cache.state.feature is None and not cache.state.skip


def test_deepcache_skip_step_rebuilds_the_output_from_the_kept_feature():
    """With the same input twice, a skip step (shallow blocks + the kept deep feature) must give exactly the
    full step's output: the skip connections are wired as the UNet's own forward wires them."""
    unet = tiny_sdxl_pipeline().unet
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 77, 64),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)},
    }
    with torch.inference_mode():
        plain = unet(x, 500, **kwargs).sample
        cache = DeepCache(unet, 2)
        cache.reset()
        key = unet(x, 500, **kwargs).sample
        cache.step_end(None, 0, 500, {})
        assert cache.state.skip
        skipped = unet(x, 500, **kwargs).sample
        other = unet(x * 0.5, 400, **kwargs).sample  # a skip step on another input: the shallow path differs
        cache.remove()
        after = unet(x, 500, **kwargs).sample
    assert torch.equal(key, plain) and torch.equal(skipped, plain) and torch.equal(after, plain)
    assert not torch.equal(other, plain)
    with pytest.raises(RuntimeError, match="skip step before any key step"):
        cache = DeepCache(unet, 2)
        cache.state.skip = True
        with torch.inference_mode():
            unet(x, 500, **kwargs)


# -- FP8 linear layers ----------------------------------------------------------------------------
@pytest.mark.parametrize("fuse_qkv", [True, False])
def test_fp8_replaces_the_transformer_linear_layers(fuse_qkv):
    pipe = tiny_sdxl_pipeline().to(dtype=torch.bfloat16)
    if fuse_qkv:
        pipe.fuse_qkv_projections(unet=True, vae=False)
    unet = pipe.unet
    untouched = dict(unet.time_embedding.linear_1.named_parameters())
    reference = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    names = apply_fp8_linear(unet)
    # 4 transformer models of one block each (down 1, mid, up 0 x2): proj_in/out, the used attention
    # projections except the text-side k/v, and the feed-forward pair.
    attn1 = ["attn1.to_qkv"] if fuse_qkv else ["attn1.to_q", "attn1.to_k", "attn1.to_v"]
    per_block = [*attn1, "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
    models = ["down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0"]
    models.append("up_blocks.0.attentions.1")
    expected = [f"{m}.{p}" for m in models for p in ["proj_in", "proj_out"]]
    expected += [f"{m}.transformer_blocks.0.{p}" for m in models for p in per_block]
    assert sorted(names) == sorted(expected)
    for name in names:
        layer = unet.get_submodule(name)
        assert isinstance(layer, FP8Linear) and layer.weight_fp8.dtype == torch.float8_e4m3fn
        assert layer.weight_scale.shape == (1, layer.out_features) and layer.weight_scale.dtype == torch.float32
        x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
        y, ref = layer(x), reference[name](x)
        assert y.shape == ref.shape and y.dtype == torch.bfloat16
        assert ((y.float() - ref.float()).norm() / ref.float().norm()) < 0.08  # FP8 rounding, not a wrong layer
    assert isinstance(unet.time_embedding.linear_1, torch.nn.Linear)  # outside the transformers: untouched
    assert dict(unet.time_embedding.linear_1.named_parameters()).keys() == untouched.keys()
    text_side = [n for n in fp8_layer_names(tiny_sdxl_pipeline().unet) if ".attn2.to_k" in n or ".attn2.to_v" in n]
    assert text_side == []


def test_fp8_generator_makes_images_close_to_the_exact_ones(exact_images):
    gen = SDXLGenerator(dataclasses.replace(EXACT, fp8_linear=True), tiny_sdxl_pipeline())
    assert sum(isinstance(m, FP8Linear) for m in gen.base.unet.modules()) == 32
    images = gen.generate(PROMPTS, SEEDS)
    assert not same(images, exact_images)
    assert all(compare.psnr_db(a, b) > 25 for a, b in zip(pixels(images), pixels(exact_images)))
    assert (
        same(gen.generate(PROMPTS, SEEDS), images) and max_diff(gen.generate(PROMPTS[2:], SEEDS[2:]), images[2:]) <= 2
    )


def test_fp8_on_hardware_without_fp8_fails_naming_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    error = fp8_support_error("cuda")
    assert "synthesis.fp8_linear=True" in error and "sm_80" in error and "A100" in error
    assert "synthesis.fp8_linear" in fp8_support_error("mps")
    assert fp8_support_error("cpu") is None  # torch's CPU kernel: what these tests run
    with pytest.raises(ValueError, match=r"synthesis\.fp8_linear=True needs synthesis\.dtype='bf16'"):
        apply_fp8_linear(tiny_sdxl_pipeline().unet)  # fp32


# -- quality comparison ---------------------------------------------------------------------------
def test_compare_images_reports_distributions_and_the_tolerance():
    rng = np.random.default_rng(0)
    base = [Generated(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), None) for _ in range(5)]
    tol = FastPathTolerance(min_psnr_db=30.0, min_ssim=0.9)
    identical = compare.compare_images(base, base, tol, "x")
    assert identical.passed and identical.psnr.min == math.inf and identical.ssim_distribution.min == pytest.approx(1)
    noisy = [
        Generated(
            np.clip(g.pixels.astype(int) + rng.integers(-n, n + 1, g.pixels.shape), 0, 255).astype(np.uint8), None
        )
        for g, n in zip(base, (1, 2, 4, 8, 40))
    ]
    result = compare.compare_images(base, noisy, tol, "x")
    assert len(result.psnr_db) == len(result.ssim) == 5
    assert list(np.argsort(-result.psnr_db)) == [0, 1, 2, 3, 4]  # more noise, lower PSNR
    assert result.psnr.min < result.psnr.median < result.psnr.max and not result.passed
    assert any("below PSNR 30.0" in f for f in result.failures())
    assert "FAIL" in result.report() and "PSNR dB: min" in result.report()
    flagged = compare.compare_images(base, [Generated(None, "black"), *base[1:]], tol, "x")
    assert flagged.flagged_one_side == 1 and len(flagged.psnr_db) == 4 and not flagged.passed
    # SSIM is scikit-image's (defaults) per RGB channel, averaged.
    from skimage.metrics import structural_similarity

    ref = structural_similarity(base[4].pixels, noisy[4].pixels, channel_axis=2, data_range=255)
    assert compare.ssim_rgb(base[4].pixels, noisy[4].pixels) == pytest.approx(ref, abs=1e-9)


def test_compare_fast_path_with_clip_scores(exact_images):
    from synthvlm_assets.scoring.clip_score import ClipScorer, ClipSettings

    clip = ClipScorer.load(ClipSettings(model="tiny"))
    settings = dataclasses.replace(EXACT, deepcache_interval=2)
    result = compare.compare_fast_path(settings, PROMPTS, SEEDS, clip=clip)
    assert result.path == "deepcache_interval=2" and len(result.psnr_db) == 3
    assert np.all(np.isfinite(result.psnr_db)) and result.clip_exact.shape == result.clip_fast.shape == (3,)
    assert result.mean_clip_drop == pytest.approx(float(result.clip_exact.mean() - result.clip_fast.mean()))
    assert result.tolerance == FAST_PATH_TOLERANCES["deepcache_interval"]
    # The exact side is the exact path itself: what the generator makes without a fast path.
    exact_again = compare.render(EXACT, PROMPTS, SEEDS)
    assert same(exact_again, exact_images)


def test_compare_command(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    argv = ["--model", "tiny", "--fast", "deepcache_interval=3", "--n", "3", "--steps", "4", "--out", str(out)]
    assert compare.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["passed"] and len(doc["psnr_db"]) == 3 and doc["settings"]["deepcache_interval"] == 3
    assert doc["mean_clip_drop"] is None and "PASS" in capsys.readouterr().out
    assert compare.main([*argv, "--clip-model", "tiny", "--min-psnr", "1000"]) == 1  # the tolerance is a setting
    printed = capsys.readouterr().out
    assert "FAIL: 3 image(s) below PSNR 1000.0 dB" in printed and "CLIPScore: exact mean" in printed
    with pytest.raises(SystemExit, match="unknown fast path"):
        compare.main(["--model", "tiny", "--fast", "turbo=1"])
