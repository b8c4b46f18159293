"""`synthvlm score`: a user's folder of images and captions (or a LLaVA JSON), every file accounted for."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
from PIL import Image


def _jpeg(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def test_score_a_folder_and_a_llava_json(tmp_path):
    from synthvlm_assets.scoring.clip_score import ClipScorer, ClipSettings
    from synthvlm_assets.scoring.stage import score_images
    from synthvlm_assets.scoring.ssim import SSIMSettings

    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(5):
        (folder / f"img{i}.jpg").write_bytes(_jpeg(i))
        (folder / f"img{i}.txt").write_text(f"a photo number {i} of a red bus\n")
    (folder / "alone.jpg").write_bytes(_jpeg(9))  # no caption
    (folder / "orphan.txt").write_text("a caption without its image")
    (folder / "broken.jpg").write_bytes(_jpeg(7)[:40])  # truncated: does not decode
    (folder / "broken.txt").write_text("a broken image")
    (folder / "latin1.jpg").write_bytes(_jpeg(8))
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "notes.md").write_text("not an image, not a caption: not a row")
    records = [
        {"id": "a", "image": "img0.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                           {"from": "gpt", "value": "a red bus"}]},
        {"id": "b", "image": "img0.jpg", "conversations": [{"from": "gpt", "value": "the same image again"}]},
        {"id": "c", "image": "gone.jpg", "conversations": [{"from": "gpt", "value": "its image is missing"}]},
        {"id": "d", "conversations": []},
    ]  # fmt: skip
    (folder / "data.json").write_text(json.dumps(records))

    env = {**os.environ, "SYNTHVLM_PRESET": "tiny", "DAGSTER_HOME": str(tmp_path / "home")}
    cli = [sys.executable, "-m", "synthvlm_assets.cli", "score"]
    run = subprocess.run([*cli, str(folder), "--out", str(tmp_path / "s.parquet")], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]  # some rows are unscored
    rows = {r["image"]: r for r in pq.read_table(tmp_path / "s.parquet").to_pylist()}
    assert set(rows) == {*(f"img{i}.jpg" for i in range(5)), "alone.jpg", "orphan.txt", "broken.jpg", "latin1.jpg"}
    assert "5 of 9 scored" in run.stdout
    assert rows["alone.jpg"]["error"] == "no caption (alone.txt)" and rows["orphan.txt"]["error"]
    assert "not UTF-8" in rows["latin1.jpg"]["error"] and rows["broken.jpg"]["error"]
    # The scored rows are what the pipeline's scoring gives the same images and captions.
    scorer = ClipScorer.load(ClipSettings(model="tiny"))
    want = {
        k: (c, s)
        for k, c, s in score_images(
            ((f"img{i}.jpg", _jpeg(i), f"a photo number {i} of a red bus") for i in range(5)), scorer, SSIMSettings()
        )
    }
    for key, (clip, ssim) in want.items():
        assert rows[key]["error"] is None and rows[key]["caption"] == key.replace("img", "a photo number ").replace(
            ".jpg", " of a red bus")  # fmt: skip
        assert abs(rows[key]["clip_score"] - clip) < 1e-6 and abs(rows[key]["ssim"] - ssim) < 1e-9
        assert rows[key]["score"] == rows[key]["clip_score"] + 0.5 * rows[key]["ssim"]

    run = subprocess.run([*cli, str(folder / "data.json"), "--out", str(tmp_path / "j.parquet")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    table = pq.read_table(tmp_path / "j.parquet").to_pylist()
    assert run.returncode == 1 and "2 of 4 scored" in run.stdout, run.stdout + run.stderr[-2000:]
    assert [r["caption"] for r in table[:2]] == ["a red bus", "the same image again"]
    assert (
        table[2]["error"] == "image not found"
        and table[3]["image"] == "data.json[3]"
        and table[3]["error"] == "a record without an image"
    )
