"""SPEC §1's optional pair filters (BLIP ITM probability, CLIP cosine) on the captions' original images."""

from __future__ import annotations

import statistics

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from synthvlm_assets.captions.pair_filters import (
    PairFilterSettings,
    PairScorer,
    open_image,
    pair_filter_checks,
    pair_filter_shard,
)
from synthvlm_assets.models.sources import ModelWeightsError
from synthvlm_assets.models.tiny import tiny_blip_itm, tiny_hf_clip
from synthvlm_assets.storage import StorageRoot

TINY = PairFilterSettings(enabled=True, blip_model="tiny", clip_model="tiny", batch_size=4)


@pytest.fixture(scope="module")
def scorer():
    return PairScorer.load(TINY)


def _images(folder, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"img{i}.jpg"
        Image.fromarray((rng.random((48 + i, 80, 3)) * 255).astype(np.uint8)).save(folder / name)
        names.append(name)
    return names


def _curated(root: StorageRoot, refs: list[str | None]) -> list[str]:
    captions = [f"A photo of thing number {i} on a table." for i in range(len(refs))]
    table = pa.table({"caption_id": [f"f:{i}" for i in range(len(refs))], "caption": captions, "image_ref": refs})
    root.publish_partition("curated_captions/s1", {"kept": table}, {})
    return captions


def test_off_by_default_passes_everything_unscored(tmp_path):
    root = StorageRoot(str(tmp_path / "root"))
    _curated(root, ["a.jpg", None])
    out = pair_filter_shard(root, "s1", PairFilterSettings(), None)
    assert out.kept == 2 and out.table.column("itm_probability").null_count == 2
    assert root.read_partition("pair_filtered_captions/s1", "kept").num_rows == 2
    assert pair_filter_checks(root, out)["rows_accounted_for"] == (True, {"curated": 2, "kept": 2, "rejected": 0})
    _curated(root, ["a.jpg", None, "b.jpg"])  # the curated shard changed under the published one
    assert not pair_filter_checks(root, out)["rows_accounted_for"][0]


def test_scores_thresholds_and_unreadable_images(tmp_path, scorer):
    images = tmp_path / "images"
    images.mkdir()
    names = _images(images, 8)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    root = StorageRoot(str(tmp_path / "root"))
    refs = [
        *names,
        "broken.jpg",
        "gone.jpg",
        None,
        str(images / names[0]),
    ]  # relative, corrupt, missing, none, absolute
    captions = _curated(root, refs)

    # The ITM probability is the softmax of BLIP's ITM head at index 1, computed here independently.
    import torch

    pil = [Image.open(images / n).convert("RGB") for n in names]
    itm, cos = scorer.score(pil, captions[:8])
    inputs = scorer.blip_processor(images=pil, text=captions[:8], return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = scorer.blip(**inputs, use_itm_head=True).itm_score
    assert itm == pytest.approx([float(torch.softmax(row, 0)[1]) for row in logits], abs=1e-6)
    assert all(0 <= p <= 1 for p in itm) and all(-1 <= c <= 1 for c in cos)

    # Thresholds at the medians: both filters keep some and reject some.
    settings = PairFilterSettings(
        **{
            **TINY.__dict__,
            "image_root": str(images),
            "itm_probability_min": statistics.median(itm),
            "clip_cosine_min": min(cos),
        }
    )
    out = pair_filter_shard(root, "s1", settings, scorer)
    rows = {r["caption_id"]: r for r in out.table.to_pylist()}
    assert [rows[f"f:{i}"]["reject_reason"] for i in (8, 9, 10)] == [
        "image_unreadable",
        "image_missing",
        "image_missing",
    ]
    assert "broken.jpg" in rows["f:8"]["reject_detail"] and "gone.jpg" in rows["f:9"]["reject_detail"]
    for i in range(8):
        r = rows[f"f:{i}"]
        expected = "itm_probability" if itm[i] < settings.itm_probability_min else None
        assert r["reject_reason"] == expected and r["itm_probability"] == pytest.approx(itm[i], abs=1e-6)
    assert rows["f:11"]["itm_probability"] == pytest.approx(
        itm[0], abs=1e-3
    )  # image 0 by absolute path (other batch padding)
    kept = root.read_partition("pair_filtered_captions/s1", "kept").column("caption_id").to_pylist()
    assert kept == [cid for cid, r in rows.items() if r["reject_reason"] is None] and 0 < len(kept) < 12


def test_images_on_s3(tmp_path, seaweedfs, scorer):
    import s3fs

    bucket = seaweedfs.make_bucket()
    fs = s3fs.S3FileSystem(**seaweedfs.storage_options(), skip_instance_cache=True)
    (name,) = _images(tmp_path, 1)
    fs.put_file(str(tmp_path / name), f"{bucket}/web/{name}")
    image, reason, _ = open_image(f"s3://{bucket}/web/{name}", None, seaweedfs.endpoint, [f"s3://{bucket}/web"])
    assert reason is None and image.size == (80, 48)
    image, reason, detail = open_image("missing.jpg", f"s3://{bucket}/web", seaweedfs.endpoint)
    assert image is None and reason == "image_missing" and f"s3://{bucket}/web/missing.jpg" in detail
    image, reason, _ = open_image(f"s3://{bucket}/web/../other/{name}", f"s3://{bucket}/web", seaweedfs.endpoint)
    assert image is None and reason == "image_outside_roots"


def test_references_outside_the_image_and_storage_roots_are_not_opened(tmp_path, scorer, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    (name,) = _images(images, 1)
    secret = tmp_path / "secret.jpg"  # a readable image outside every root: opening it would be the leak
    secret.write_bytes((images / name).read_bytes())
    (images / "link.jpg").symlink_to(secret)
    root = StorageRoot(str(tmp_path / "root"))
    (tmp_path / "root" / "own").mkdir(parents=True)
    (tmp_path / "root" / "own" / "in_root.jpg").write_bytes((images / name).read_bytes())
    refs = [
        name,  # relative, under the image root
        str(images / name),  # absolute, under the image root
        str(tmp_path / "root" / "own" / "in_root.jpg"),  # under the storage root
        str(secret),
        "../secret.jpg",
        f"{images}/../secret.jpg",
        f"file://{secret}",
        "link.jpg",  # a symbolic link out of the image root
        "http://169.254.169.254/latest/meta-data/iam",
        "s3://somebody-elses-bucket/x.jpg",
    ]
    _curated(root, refs)
    opened = []
    from synthvlm_assets.captions import pair_filters

    real = pair_filters.filesystem_for
    monkeypatch.setattr(pair_filters, "filesystem_for", lambda uri, *a, **k: opened.append(uri) or real(uri, *a, **k))
    settings = PairFilterSettings(
        **{**TINY.__dict__, "image_root": str(images), "itm_probability_min": 0.0, "clip_cosine_min": -1.0}
    )
    out = pair_filter_shard(root, "s1", settings, scorer)
    rows = out.table.to_pylist()
    assert [r["reject_reason"] for r in rows[:3]] == [None, None, None]
    for r in rows[3:]:
        assert r["reject_reason"] == "image_outside_roots" and r["itm_probability"] is None
        assert "not under the image root or the storage root" in r["reject_detail"]
    assert len(opened) == 3 and not any("secret" in u or "169.254" in u or "somebody" in u for u in opened)
    assert out.table.num_rows == len(refs)  # every caption accounted for: kept or rejected with a reason
    image, reason, detail = open_image("a.jpg", None)
    assert image is None and reason == "image_outside_roots" and "image_root is not set" in detail


def test_loading_through_the_real_path(tmp_path, scorer):
    blip, blip_processor = tiny_blip_itm()
    clip, clip_processor = tiny_hf_clip()
    for obj, folder in ((blip, "blip"), (blip_processor, "blip"), (clip, "clip"), (clip_processor, "clip")):
        obj.save_pretrained(tmp_path / folder)
    loaded = PairScorer.load(
        PairFilterSettings(enabled=True, blip_model=str(tmp_path / "blip"), clip_model=str(tmp_path / "clip"))
    )
    image = [Image.new("RGB", (70, 50), (200, 30, 30))]
    for a, b in zip(loaded.score(image, ["a red square"]), scorer.score(image, ["a red square"])):
        assert a == pytest.approx(b, abs=1e-5)
    with pytest.raises(ModelWeightsError, match="pair_filters.blip_model"):
        PairScorer.load(PairFilterSettings(enabled=True, blip_model=str(tmp_path / "nothing"), clip_model="tiny"))
