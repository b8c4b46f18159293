"""Scoring, selection and SynthVLM-100K: references, brute force, and consumers reading what we write."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from dagster import AssetKey, instance_for_test, materialize
from PIL import Image, ImageDraw

from synthvlm_assets.formats.llava import BRIEF_INSTRUCTIONS
from synthvlm_assets.scoring.clip_score import ClipScorer, ClipSettings
from synthvlm_assets.scoring.ssim import SSIMSettings, ssim_pair, ssim_reference, ssim_torch
from synthvlm_assets.selection import SelectionSettings, select


def varied_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    gradient = np.tile(np.linspace(0, 255, 1024, dtype=np.uint8)[None, :, None], (1024, 1, 3))
    checker = np.kron(rng.integers(0, 2, (64, 64, 1)) * 255, np.ones((16, 16, 3))).astype(np.uint8)
    details = Image.new("RGB", (1024, 1024), "white")
    draw = ImageDraw.Draw(details)
    for i in range(0, 1024, 3):
        draw.line([(i, 0), (1023 - i, 1023)], fill=(i % 256, 0, 255 - i % 256))
    noisy = Image.fromarray((rng.random((1024, 1024, 3)) * 255).astype(np.uint8))
    jpeg = io.BytesIO()
    details.save(jpeg, "JPEG", quality=60)
    return {
        "flat": Image.new("RGB", (1024, 1024), (90, 120, 200)),
        "noisy": noisy,
        "high_contrast": Image.fromarray(checker),
        "gradient": Image.fromarray(gradient),
        "tiny_details": details,
        "jpeg_artifacts": Image.open(io.BytesIO(jpeg.getvalue())),
        "small_non_square": noisy.resize((300, 200)),
    }


@pytest.mark.parametrize("name", list(varied_images()))
def test_torch_ssim_agrees_with_scikit_image(name):
    image = varied_images()[name]
    a, b = ssim_pair(image)
    fast = ssim_torch(torch.from_numpy(a.copy())[None], torch.from_numpy(b.copy())[None]).item()
    assert abs(fast - ssim_reference(image)) < 1e-4


def test_torch_ssim_batched_equals_one_by_one():
    images = list(varied_images().values())
    pairs = [ssim_pair(im) for im in images]
    batch = ssim_torch(
        torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs]))
    )
    assert np.allclose(batch.numpy(), [ssim_reference(im) for im in images], atol=1e-9)
    small = SSIMSettings(size=64, low=16)
    a, b = ssim_pair(images[1], small)
    assert (
        abs(
            ssim_torch(torch.from_numpy(a.copy())[None], torch.from_numpy(b.copy())[None], small).item()
            - ssim_reference(images[1], small)
        )
        < 1e-9
    )


def test_clip_score_matches_a_one_by_one_reference():
    import torch.nn.functional as F

    scorer = ClipScorer.load(ClipSettings(model="tiny"))
    images = list(varied_images().values())
    captions = ["a blue square", "noise", "a checkerboard", "a gradient", "lines", "a jpeg", "x " * 300]
    pixels = torch.stack([scorer.preprocess(im) for im in images])
    batched = scorer.clip_scores(pixels, captions)
    for image, caption, got in zip(images, captions, batched):
        with torch.no_grad():
            i = F.normalize(scorer.model.encode_image(scorer.preprocess(image)[None]).float(), dim=-1)
            t = F.normalize(scorer.model.encode_text(scorer.tokenizer(["A photo depicts " + caption])).float(), dim=-1)
        assert abs(got - max((i * t).sum().item(), 0.0)) < 1e-4
    assert (batched >= 0).all() and (batched <= 1).all()
    assert scorer.tokenizer(["x " * 300]).shape == (1, 77)  # truncated to 77 tokens


def brute_force(rows: list[dict], lam: float, k: int) -> list[tuple[str, int]]:
    best: dict[str, dict] = {}
    for r in rows:
        s = r["clip_score"] + lam * r["ssim"]
        cur = best.get(r["caption_id"])
        if cur is None or s > cur["s"] or (s == cur["s"] and r["candidate"] < cur["candidate"]):
            best[r["caption_id"]] = {**r, "s": s}
    ranked = sorted(best.values(), key=lambda r: (-r["s"], r["caption_id"]))
    return [(r["caption_id"], r["candidate"]) for r in ranked[:k]]


def test_scoring_sits_beside_synthesis():
    from synthvlm_assets.defs.build import Settings, build_definitions

    graph = build_definitions(Settings()).resolve_asset_graph()
    group = {k.to_user_string(): graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert group["image_scores"] == group["sdxl_images"] == "synthesis" and group["synthvlm_100k"] == "selection"


@pytest.mark.parametrize("lam", [0.5, 0.0, 2.0])
def test_selection_equals_brute_force(lam):
    rng = random.Random(1)
    rows = []
    for i in range(400):
        for c in range(rng.randint(1, 4)):
            # coarse values: many exact ties, broken by candidate then caption id
            rows.append(
                {
                    "caption_id": f"f:{i:03d}",
                    "candidate": c,
                    "clip_score": rng.choice([0.2, 0.3, 0.35]),
                    "ssim": rng.choice([0.5, 0.8, 0.9]),
                    "score": 0.0,
                }
            )
    table = pa.Table.from_pylist(rows)
    for settings, k in [
        (SelectionSettings(lam=lam, k=57), 57),
        (SelectionSettings(lam=lam, k=None, fraction=0.25), 100),
        (SelectionSettings(lam=lam, k=10_000), 400),
    ]:
        selected, n = select(table, settings)
        assert n == 400
        assert list(
            zip(selected.column("caption_id").to_pylist(), selected.column("candidate").to_pylist())
        ) == brute_force(rows, lam, k)
        assert selected.column("rank").to_pylist() == list(range(1, k + 1))


def test_dataset_end_to_end_and_consumers(tmp_path, coco_path):
    import datasets
    import webdataset as wds

    from synthvlm_assets.cli import latest
    from synthvlm_assets.defs.build import Settings, build_definitions
    from synthvlm_assets.defs.captions import caption_curation
    from synthvlm_assets.defs.judge import judged_captions, pair_filtered_captions
    from synthvlm_assets.defs.partitions import caption_shards
    from synthvlm_assets.defs.selection import image_scores, synthvlm_100k
    from synthvlm_assets.defs.synthesis import sdxl_images

    from .test_graph import coco_subset_jsonl

    src = tmp_path / "pool.jsonl"
    coco_subset_jsonl(coco_path, src, n=60)
    settings = Settings(
        storage_root=str(tmp_path / "root"),
        shard_rows=40,
        judge={"model": "tiny"},
        synthesis={"model": "tiny", "steps": 2},
        scoring={"clip_model": "tiny", "batch_size": 16},
        selection={"k": 20},
    )
    defs = build_definitions(settings)
    _, shards = settings.resources()["storage"].registry().register_file(str(src), settings.shard_rows)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(caption_shards.name, [s.key for s in shards])
        for shard in shards:
            r = materialize(
                [caption_curation, pair_filtered_captions, judged_captions, sdxl_images, image_scores],
                partition_key=shard.key,
                instance=instance,
                resources=defs.resources,
            )
            assert r.success and all(c.passed for c in r.get_asset_check_evaluations())
        r = materialize([synthvlm_100k], instance=instance, resources=defs.resources, selection=[synthvlm_100k])
        assert r.success and all(c.passed for c in r.get_asset_check_evaluations())
        md = instance.get_latest_materialization_event(AssetKey("synthvlm_100k")).asset_materialization.metadata
        scores_md = instance.get_latest_materialization_event(AssetKey("image_scores")).asset_materialization.metadata
        sdxl_md = [
            r.event_log_entry.asset_materialization.metadata
            for r in instance.fetch_materializations(AssetKey("sdxl_images"), limit=10).records
        ]
    assert md["records"].value == 20
    # The dataset: plots where a person looks, the paper's Table 4 as a table, numbers rounded.
    assert md["hist_all"].value.startswith("![plot](data:image/png;base64,") and "contact_sheet" in md
    table4 = {r.data["set"]: r.data for r in md["vs_table_4"].value.records}
    assert table4["SynthVLM-100K (paper)"]["CLIPScore"] == 0.36 and table4["COCO-Caption (paper)"]["score"] is None
    assert md["threshold"].value == round(md["threshold"].value, 4)
    # A shard's scores: a percentile table, no plot; the contact sheet only on the file's first shard.
    rows = {r.data["value"]: r.data for r in scores_md["scores"].value.records}
    assert set(rows) == {"clip_score", "ssim", "score"} and rows["ssim"]["min"] <= rows["ssim"]["p50"] <= 1
    assert not any("base64" in str(v.value) for v in scores_md.values())
    assert len(sdxl_md) > 1 and sum("contact_sheet" in m for m in sdxl_md) == 1
    root = settings.resources()["storage"].root()
    base = root.manifest("synthvlm_100k")["prefix"]
    folder = tmp_path / "root" / base
    assert latest(settings) == root.uri(base) == str(folder)  # `synthvlm latest`: the current version

    # LLaVA's loader: json.load a list; each record's image relative to the image folder; one <image>.
    records = json.loads((folder / "synthvlm_100k.json").read_text())
    assert len(records) == 20 and len({r["id"] for r in records}) == 20
    for r in records:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert human["value"][len("<image>\n") :] in BRIEF_INSTRUCTIONS and gpt["value"]
        assert Image.open(folder / r["image"]).size == (32, 32)
        assert r["image"].startswith("images/00000/")
    scores = root.read_parquet(f"{base}/selection.parquet").to_pylist()
    assert [s["caption_id"] for s in scores] == [r["id"] for r in records]
    assert all(a["score"] >= b["score"] for a, b in zip(scores, scores[1:]))

    # WebDataset, read by the webdataset package.
    urls = sorted(str(p) for p in (folder / "wds").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json"))
    assert [s[2]["caption_id"] for s in samples] == [r["id"] for r in records]
    assert all(s[0].size == (32, 32) and s[1] == r["conversations"][1]["value"] for s, r in zip(samples, records))

    # Hugging Face datasets: an image dataset.
    ds = datasets.load_dataset(
        "parquet", data_files=sorted(str(p) for p in (folder / "hf").glob("*.parquet")), split="train"
    )
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == 20
    assert ds[0]["image"].size == (32, 32) and ds[0]["caption_id"] == records[0]["id"]
    card = (folder / "README.md").read_text()
    assert "tiny preset" in card and "SynthVLM-100K (paper) | 0.36 | 0.86 | 0.79" in card

    # Lineage of the top image: source row to rank, with the runs that made each step.
    from synthvlm_assets.query import lineage
    from synthvlm_assets.synthesis.settings import seed_for

    chain = lineage(root, records[0]["id"])
    assert chain["synthvlm_100k"]["rank"] == 1 and chain["curation"]["kept"] and chain["judge"]["verdict"] == "yes"
    assert (
        chain["source"]["source_file"] == str(src)
        and chain["caption_normalized"] == records[0]["conversations"][1]["value"]
    )
    (image,) = chain["images"]
    assert image["seed"] == seed_for(records[0]["id"], 0) and image["score"] == pytest.approx(scores[0]["score"])
    assert all(chain["run_ids"].values())

    # The per-image provenance table the dataset card links, read with DuckDB in place.
    import duckdb

    prov = (
        duckdb.sql(f"SELECT * FROM '{folder / 'lineage.parquet'}' ORDER BY rank NULLS LAST")
        .to_arrow_table()
        .to_pylist()
    )
    assert "lineage.parquet" in card and len(prov) == root.read_parquet(f"{base}/selection.parquet").num_rows + sum(
        r["rank"] is None for r in prov
    )
    top = prov[0]
    assert (
        top["rank"] == 1
        and top["caption_id"] == records[0]["id"]
        and top["judge_verdict"] == "yes"
        and top["seed"] == image["seed"]
    )
    assert (
        top["source_file"] == str(src)
        and top["special_character_ratio"] is not None
        and top["generator_settings_hash"]
    )
    assert all(
        top[f"run_{step}"]
        for step in (
            "raw_caption_pool",
            "curated_captions",
            "judged_captions",
            "sdxl_images",
            "image_scores",
            "synthvlm_100k",
        )
    )
    with pytest.raises(KeyError, match="no materialized raw_caption_pool"):
        lineage(root, "nope:1")

    # An image that no longer decodes fails the readable check, which names it (each image is checked in memory
    # while the dataset is written, not downloaded again).
    from synthvlm_assets.formats.dataset import synthvlm_100k as publish
    from synthvlm_assets.selection import SelectionSettings
    from synthvlm_assets.synthesis.stage import Sample, read_tar, write_tar

    tar_key = root.manifest(f"sdxl_images/{scores[0]['shard']}")["tar"]["key"]
    with root.fs.open(root.path(tar_key), "rb") as f:
        samples = [(k, Sample(s.jpeg[:64], s.meta) if k == scores[0]["key"] else s) for k, s in read_tar(f)]
    with root.fs.open(root.path(tar_key), "wb") as f:
        write_tar(f, samples)
    out = publish(root, SelectionSettings(k=20), "a-run")
    readable, seen = out.checks["selected_images_readable"]
    assert not readable and seen["unreadable"] == 1 and scores[0]["caption_id"] in seen["first"]
    assert out.checks["selected_count"] == (True, {"records": 20, "expected": 20})


def test_worker_processes_give_the_same_scores():
    """Decode/resize in worker processes (the GPU-box default) equals in-process, and does not hang
    (a plain fork after torch started its thread pools deadlocked here once)."""
    from synthvlm_assets.scoring.stage import score_images

    scorer = ClipScorer.load(ClipSettings(model="tiny", batch_size=4))
    jpegs = []
    for image in list(varied_images().values())[:6]:
        buf = io.BytesIO()
        image.convert("RGB").save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    samples = [(str(i), j, f"caption {i}") for i, j in enumerate(jpegs)]
    inline = list(score_images(samples, scorer, SSIMSettings(), workers=0))
    pooled = list(score_images(samples, scorer, SSIMSettings(), workers=2))
    assert [k for k, _, _ in pooled] == [str(i) for i in range(6)]
    assert np.allclose([c for _, c, _ in pooled], [c for _, c, _ in inline], atol=1e-6)
    assert [s for _, _, s in pooled] == [s for _, _, s in inline]
