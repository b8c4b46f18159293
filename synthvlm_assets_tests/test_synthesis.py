"""SDXL synthesis on the tiny preset: seeds, content addressing, resume, reruns, flags, loading."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from synthvlm_assets.models.sources import ModelWeightsError
from synthvlm_assets.models.tiny import tiny_sdxl_pipeline
from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.synthesis import sdxl
from synthvlm_assets.synthesis.sdxl import SDXLGenerator, image_flag
from synthvlm_assets.synthesis.settings import SynthesisSettings, image_key, seed_for
from synthvlm_assets.synthesis.stage import read_tar, synthesize_shard

SETTINGS = SynthesisSettings.tiny(steps=3, batch_size=4, images_per_caption=2)
CAPTIONS = pa.table(
    {"caption_id": [f"f:{i}" for i in range(6)], "caption": [f"A photo of a red bus number {i}." for i in range(6)]}
)


@pytest.fixture(scope="module")
def generator():
    return SDXLGenerator.load(SETTINGS)


class Counting:
    """A generator factory that counts the images it is asked for (and can crash midway)."""

    def __init__(self, gen, crash_after_batches: int | None = None):
        self.gen, self.crash_after, self.batches, self.images = gen, crash_after_batches, 0, 0
        self.model_revision = gen.model_revision

    def __call__(self):
        return self

    def generate(self, prompts, seeds):
        if self.crash_after is not None and self.batches >= self.crash_after:
            raise RuntimeError("simulated crash (GPU preempted)")
        self.batches += 1
        self.images += len(prompts)
        return self.gen.generate(prompts, seeds)


def tar_bytes(root: StorageRoot, shard: str) -> bytes:
    return root.read_bytes(root.manifest(f"sdxl_images/{shard}")["tar"]["key"])


def test_seeds_and_image_keys():
    assert seed_for("f:1", 0) == seed_for("f:1", 0) != seed_for("f:1", 1) != seed_for("f:2", 0)
    assert seed_for("coco-1a2b3c4d:17", 0) == 4_530_754_455_421_953_771  # pinned: seeds never drift
    assert 0 <= seed_for("x", 3) < 2**63
    k = image_key("a dog", 5, SETTINGS)
    assert k != image_key("a cat", 5, SETTINGS) != image_key("a dog", 6, SETTINGS)
    assert k != image_key("a dog", 5, SynthesisSettings.tiny(steps=4))
    assert k == image_key(
        "a dog", 5, SynthesisSettings.tiny(steps=3, batch_size=1, images_per_caption=2, compile=True)
    )


def test_an_image_regenerates_bit_for_bit_alone_or_in_a_batch(generator):
    batch = generator.generate(["a red bus", "a green tree", "a cat"], [11, 22, 33])
    alone = generator.generate(["a green tree"], [22])
    assert all(g.flag is None and g.pixels.shape == (32, 32, 3) for g in batch)
    assert np.array_equal(batch[1].pixels, alone[0].pixels)
    assert not np.array_equal(batch[0].pixels, batch[1].pixels)


def test_fused_qkv_is_the_same_math(generator):
    """fuse_qkv is an execution setting (not in the image key): the images must agree to rounding."""
    assert generator.settings.fuse_qkv
    unfused = SDXLGenerator(dataclasses.replace(SETTINGS, fuse_qkv=False), tiny_sdxl_pipeline())
    prompts, seeds = ["a red bus", "a green tree"], [11, 22]
    for a, b in zip(generator.generate(prompts, seeds), unfused.generate(prompts, seeds)):
        assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 1
    assert image_key("a", 1, generator.settings) == image_key("a", 1, unfused.settings)


def test_shard_output_is_deterministic_and_rerun_does_nothing(tmp_path, generator):
    roots = [StorageRoot(str(tmp_path / n)) for n in ("a", "b")]
    for root in roots:
        result = synthesize_shard(root, "s1", CAPTIONS, SETTINGS, Counting(generator))
        assert (result.generated, result.reused, result.skipped) == (12, 0, False)
    assert tar_bytes(roots[0], "s1") == tar_bytes(roots[1], "s1")  # byte-identical tars

    def must_not_load():
        raise AssertionError("a finished shard must not load the model")

    again = synthesize_shard(roots[0], "s1", CAPTIONS, SETTINGS, must_not_load)
    assert again.skipped and again.generated == 0
    with io.BytesIO(tar_bytes(roots[0], "s1")) as f:
        samples = dict(read_tar(f))
    manifest = roots[0].read_partition("sdxl_images/s1", "manifest").to_pylist()
    assert len(samples) == len(manifest) == 12
    for row in manifest:
        meta, jpeg = samples[row["key"]].meta, samples[row["key"]].jpeg
        assert (meta["caption_id"], meta["candidate"], meta["seed"]) == (
            row["caption_id"],
            row["candidate"],
            row["seed"],
        )
        assert row["seed"] == seed_for(row["caption_id"], row["candidate"])
        assert Image.open(io.BytesIO(jpeg)).size == (32, 32) and len(jpeg) == row["bytes"]


def test_new_captions_generate_only_what_is_new(tmp_path, generator):
    root = StorageRoot(str(tmp_path))
    synthesize_shard(root, "s1", CAPTIONS.slice(0, 4), SETTINGS, Counting(generator))
    counting = Counting(generator)
    result = synthesize_shard(root, "s1", CAPTIONS, SETTINGS, counting)  # two captions admitted
    assert counting.images == 4 and result.reused == 8
    fresh = StorageRoot(str(tmp_path / "fresh"))
    synthesize_shard(fresh, "s1", CAPTIONS, SETTINGS, Counting(generator))
    assert tar_bytes(root, "s1") == tar_bytes(fresh, "s1")


def test_crash_midway_resumes_without_regenerating(tmp_path, generator):
    root = StorageRoot(str(tmp_path))
    with pytest.raises(RuntimeError, match="simulated crash"):
        synthesize_shard(root, "s1", CAPTIONS, SETTINGS, Counting(generator, crash_after_batches=2))
    assert root.manifest("sdxl_images/s1") is None  # nothing a reader could take for a finished shard
    assert not root.exists("sdxl_images/s1/images.tar")
    resumed = Counting(generator)
    result = synthesize_shard(root, "s1", CAPTIONS, SETTINGS, resumed)
    assert resumed.images == 12 - 8 and result.reused == 8  # two batches of 4 were staged durably
    assert not root.list("sdxl_images/_staging")  # staging cleared once published
    clean = StorageRoot(str(tmp_path / "clean"))
    synthesize_shard(clean, "s1", CAPTIONS, SETTINGS, Counting(generator))
    assert tar_bytes(root, "s1") == tar_bytes(clean, "s1")


def test_interrupt_midway_keeps_staging_and_the_rerun_reuses_it(tmp_path, generator):
    """A terminated run (the interrupt lands in the progress callback, between batches) leaves its staged
    batches; the next run generates only the rest and publishes the same bytes as an uninterrupted run."""
    root = StorageRoot(str(tmp_path))
    calls: list[tuple[int, int]] = []

    def interrupt_after_two_batches(done: int, total: int) -> None:
        calls.append((done, total))
        if done == 8:
            raise KeyboardInterrupt

    first = Counting(generator)
    with pytest.raises(KeyboardInterrupt):
        synthesize_shard(root, "s1", CAPTIONS, SETTINGS, first, progress=interrupt_after_two_batches)
    assert calls == [(0, 12), (4, 12), (8, 12)] and first.images == 8
    (staged,) = root.list("sdxl_images/_staging/s1")  # one folder per image settings
    assert root.manifest("sdxl_images/s1") is None and len(root.list(staged)) == 2  # one tar per batch
    resumed, seen = Counting(generator), []
    result = synthesize_shard(root, "s1", CAPTIONS, SETTINGS, resumed, progress=lambda d, t: seen.append((d, t)))
    assert resumed.images == 4 and (result.generated, result.reused) == (4, 8)
    assert seen == [(8, 12), (12, 12)]  # staged images count as done from the start
    assert not root.list("sdxl_images/_staging")
    clean = StorageRoot(str(tmp_path / "clean"))
    synthesize_shard(clean, "s1", CAPTIONS, SETTINGS, Counting(generator))
    assert tar_bytes(root, "s1") == tar_bytes(clean, "s1")
    assert (
        root.read_partition("sdxl_images/s1", "manifest").to_pylist()
        == clean.read_partition("sdxl_images/s1", "manifest").to_pylist()
    )


def test_image_flags():
    rng = np.random.default_rng(0)
    assert image_flag(rng.random((8, 8, 3))) is None
    assert image_flag(np.zeros((8, 8, 3))) == "constant"
    assert image_flag(np.full((8, 8, 3), 0.5)) == "constant"
    assert image_flag(rng.random((8, 8, 3)) * 0.01) == "black"
    nan = rng.random((8, 8, 3))
    nan[0, 0, 0] = np.nan
    assert image_flag(nan) == "nan"


def test_flagged_images_are_reported_not_kept(tmp_path, generator):
    bad_seed = seed_for("f:2", 1)

    class Blackout(Counting):
        def generate(self, prompts, seeds):
            out = super().generate(prompts, seeds)
            return [sdxl.Generated(None, "black") if s == bad_seed else g for s, g in zip(seeds, out)]

    root = StorageRoot(str(tmp_path))
    result = synthesize_shard(root, "s1", CAPTIONS, SETTINGS, Blackout(generator))
    flagged = [r for r in result.manifest.to_pylist() if r["flag"]]
    assert [(r["caption_id"], r["candidate"], r["flag"]) for r in flagged] == [("f:2", 1, "black")]
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(root, "s1"))) as tar:
        names = tar.getnames()
    assert f"{flagged[0]['key']}.json" in names and f"{flagged[0]['key']}.jpg" not in names


def test_half_precision_overflow_is_redecoded_in_fp32(monkeypatch):
    gen = SDXLGenerator.load(SynthesisSettings.tiny(steps=2, dtype="bf16"))
    real = sdxl._vae_decode

    def overflowing(vae, latents):
        images = real(vae, latents)
        return images * np.nan if vae.dtype != __import__("torch").float32 else images

    monkeypatch.setattr(sdxl, "_vae_decode", overflowing)
    out = gen.generate(["a red bus", "a cat"], [1, 2])
    assert [g.flag for g in out] == [None, None] and gen.stats.redecoded_fp32 == 2


def test_missing_weights_fail_naming_the_setting(tmp_path, monkeypatch):
    with pytest.raises(ModelWeightsError, match=r"synthesis\.model='/no/such/sdxl': no such folder"):
        SDXLGenerator.load(SynthesisSettings(model="/no/such/sdxl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelWeightsError, match=r"could not load synthesis\.model='synthvlm-test/no-such-model'.*'tiny'"
    ):
        SDXLGenerator.load(SynthesisSettings(model="synthvlm-test/no-such-model"))


def test_saved_tiny_pipeline_loads_through_the_real_path(tmp_path, generator):
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "models--org--tiny-sdxl" / "snapshots" / commit  # the Hugging Face cache layout
    tiny_sdxl_pipeline().save_pretrained(folder)
    loaded = SDXLGenerator.load(SynthesisSettings(model=str(folder), height=32, width=32, steps=3, dtype="fp32"))
    a = loaded.generate(["a red bus"], [7])[0].pixels
    b = generator.generate(["a red bus"], [7])[0].pixels
    assert np.array_equal(a, b)  # same weights, same seed, same image
    assert loaded.model_revision == commit and generator.model_revision == "tiny-random"


def test_weights_from_an_s3_prefix(tmp_path, seaweedfs):
    import s3fs

    folder = tmp_path / "tiny-sdxl"
    tiny_sdxl_pipeline().save_pretrained(folder)
    bucket = seaweedfs.make_bucket()
    fs = s3fs.S3FileSystem(**seaweedfs.storage_options(), skip_instance_cache=True)
    fs.put(str(folder) + "/", f"{bucket}/models/tiny-sdxl/", recursive=True)
    settings = SynthesisSettings(model=f"s3://{bucket}/models/tiny-sdxl", height=32, width=32, steps=2, dtype="fp32")
    gen = SDXLGenerator.load(settings, cache_dir=str(tmp_path / "cache"), s3_endpoint_url=seaweedfs.endpoint)
    assert gen.generate(["a red bus"], [7])[0].flag is None
    with pytest.raises(ModelWeightsError, match="no files under this prefix"):
        SDXLGenerator.load(
            SynthesisSettings(model=f"s3://{bucket}/models/none"), str(tmp_path / "c2"), seaweedfs.endpoint
        )


def test_random_sdxl_architecture_matches_sdxl_base():
    """Parameter counts of SDXL base 1.0's UNet, VAE and text encoders, and BASELINES.md's 13.52 TFLOP
    per UNet step for the CFG pair at 1024², on the meta device (no memory, no weights)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from synthvlm_assets.models import sdxl_arch

    common = {"vocab_size": 49408, "max_position_embeddings": 77}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_arch.UNET)
        counts = [
            sum(p.numel() for p in m.parameters())
            for m in (
                unet,
                AutoencoderKL(**sdxl_arch.VAE),
                CLIPTextModel(CLIPTextConfig(**sdxl_arch.TEXT_ENCODER, **common)),
                CLIPTextModelWithProjection(CLIPTextConfig(**sdxl_arch.TEXT_ENCODER_2, **common)),
            )
        ]
        cond = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)}
        with FlopCounterMode(display=False) as counter:
            unet(
                torch.randn(2, 4, 128, 128),
                torch.tensor([500.0, 500.0]),
                encoder_hidden_states=torch.randn(2, 77, 2048),
                added_cond_kwargs=cond,
            )
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]
    assert counter.get_total_flops() / 1e12 == pytest.approx(13.52, abs=0.01)


def test_resource_presets():
    from synthvlm_assets.defs.resources import SynthesisResource

    tiny = SynthesisResource(model="tiny").settings()
    assert (tiny.height, tiny.dtype, tiny.steps, tiny.guidance_scale) == (32, "fp32", 60, 20.0)
    real = SynthesisResource().settings()
    assert (
        real.model,
        real.height,
        real.width,
        real.steps,
        real.guidance_scale,
        real.negative_prompt,
        real.dtype,
    ) == ("stabilityai/stable-diffusion-xl-base-1.0", 1024, 1024, 60, 20.0, "", "bf16")
    assert SynthesisResource(model="tiny", dtype="bf16", steps=4).settings().dtype == "bf16"


def test_image_checks_name_what_is_missing_misshapen_or_flagged():
    from synthvlm_assets.synthesis.settings import SynthesisSettings
    from synthvlm_assets.synthesis.stage import Wanted, image_checks

    settings = SynthesisSettings.tiny()
    size = (settings.width, settings.height)
    wanted = [Wanted(f"c{i}", 0, "a caption", i, f"k{i}") for i in range(4)]
    manifest = [
        {"caption_id": "c0", "candidate": 0, "key": "k0", "flag": None},
        {"caption_id": "c1", "candidate": 0, "key": "k1", "flag": None},
        {"caption_id": "c2", "candidate": 0, "key": "k2", "flag": "black"},
    ]
    good = image_checks(manifest[:2], {"k0": size, "k1": size}, wanted[:2], settings)
    assert all(passed for passed, _ in good.values())
    checks = image_checks(manifest, {"k0": size, "k1": (size[0] + 1, size[1])}, wanted, settings)
    assert checks["every_caption_has_its_images"] == (False, {"missing": 1, "first_missing": "[('c3', 0)]"})
    assert checks["image_size"][0] is False and checks["image_size"][1]["wrong"] == 1
    assert checks["no_unusable_images"] == (False, {"flagged": 1, "caption_ids": "['c2']"})
    # A manifest row whose JPEG is not in the tar is missing too.
    assert not image_checks(manifest[:2], {"k0": size}, wanted[:2], settings)["every_caption_has_its_images"][0]
