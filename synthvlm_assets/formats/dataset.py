"""Publish SynthVLM-100K under the storage root, as one version switched in atomically.

synthvlm_100k/<version>/synthvlm_100k.json      LLaVA pretraining JSON (SPEC §5)
synthvlm_100k/<version>/images/00000/*.jpg      the images, at most 10,000 per folder
synthvlm_100k/<version>/wds/shard-00000.tar     WebDataset shards (jpg + txt + json)
synthvlm_100k/<version>/hf/train-00000.parquet  Parquet that `datasets` loads as an image dataset
synthvlm_100k/<version>/selection.parquet       the selected rows with rank and scores
synthvlm_100k/<version>/README.md               the dataset card
synthvlm_100k/_manifest.json                    written last: names the current version
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from synthvlm_assets.formats.llava import hf_parquet, image_path, llava_record, webdataset_shard
from synthvlm_assets.query import lineage_table
from synthvlm_assets.scoring.stage import ASSET as SCORES
from synthvlm_assets.selection import SelectionSettings, select
from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.synthesis.stage import ASSET as IMAGES
from synthvlm_assets.synthesis.stage import read_tar

ASSET = "synthvlm_100k"
SAMPLES_PER_SHARD = 1000  # per WebDataset tar and Parquet file: bounded memory while writing
PAPER_TABLE_4 = {
    "SynthVLM-100K (paper)": (0.36, 0.86, 0.79),
    "ShareGPT4V (paper)": (0.32, 0.79, 0.71),
    "COCO-Caption (paper)": (0.31, 0.73, None),
}


@dataclass
class PublishedDataset:
    """One synthvlm_100k: what competed, what was selected and written, and its checks."""

    manifest: dict
    rows: list[dict]  # the selected rows, best first, with their captions
    selected: pa.Table
    scores: pa.Table  # every candidate of the scored shards that passed their checks
    captions_scored: int
    excluded_shards: list[str]  # scored shards left out: their checks failed or they have no manifest
    tiny: bool  # scored with the tiny preset: meaningless
    checks: dict[str, tuple[bool, dict]]  # check name -> (passed, what it saw)


def synthvlm_100k(storage: StorageRoot, settings: SelectionSettings, run_id: str) -> PublishedDataset:
    """SPEC §4-§5: the global top K over every scored shard that passed its checks, published."""
    shards = [k.rsplit("/", 1)[-1] for k in storage.list(SCORES) if not k.rsplit("/", 1)[-1].startswith("_")]
    manifests = {s: storage.manifest(f"{SCORES}/{s}") for s in shards}
    passed = [s for s, m in manifests.items() if m is not None and m.get("checks_passed")]
    excluded = sorted(set(shards) - set(passed))
    scores = pa.concat_tables([storage.read_partition(f"{SCORES}/{s}", "scores") for s in passed]) if passed else None
    if scores is None or scores.num_rows == 0:
        raise RuntimeError(
            f"no scored shard passed its checks under {storage.uri(SCORES)} (excluded: {excluded[:10]})"
        )
    selected, n_captions = select(scores, settings)
    tiny = any("tiny" in str(v) for v in set(scores.column("clip_model").to_pylist()))
    info = {
        "settings": {"lam": settings.lam, "k": settings.k, "fraction": settings.fraction},
        "captions_scored": n_captions,
        "shards": len(passed),
        "excluded_shards": excluded,
        "tiny": tiny,
        "run_id": run_id,
    }
    lineage = lineage_table(storage, selected, run_id)
    manifest, rows, unreadable = publish_dataset(
        storage, selected, lambda sel: dataset_card(sel, scores, info), info, lineage
    )
    expected = min(settings.k, n_captions) if settings.k is not None else int(settings.fraction * n_captions)
    checks = {
        "selected_count": (len(rows) == expected, {"records": len(rows), "expected": expected}),
        "selected_images_readable": (not unreadable, {"unreadable": len(unreadable), "first": str(unreadable[:10])}),
    }
    return PublishedDataset(manifest, rows, selected, scores, n_captions, excluded, tiny, checks)


def publish_dataset(
    storage: StorageRoot,
    selected: pa.Table,
    card: Callable[[pa.Table], str],
    info: dict,
    lineage: pa.Table | None = None,
) -> tuple[dict, list[dict], list[str]]:
    """Write every format of the selection and switch the current version to it; returns the manifest, the
    selected rows with their captions, and the caption ids of images that do not decode (each image is checked
    in memory before it is written, and read back once to write the WebDataset and Parquet shards)."""
    from PIL import Image

    rows = selected.to_pylist()
    version = hashlib.sha256(
        json.dumps(
            [[r["caption_id"], r["key"], r["rank"]] for r in rows] + [info.get("settings")], default=str
        ).encode()
    ).hexdigest()[:16]
    base = f"{ASSET}/{version}"

    # Images: one streaming pass over each shard's tar, taking the selected keys.
    by_shard: dict[str, dict[str, dict]] = defaultdict(dict)
    unreadable: list[str] = []
    for r in rows:
        by_shard[r["shard"]][r["key"]] = r
    for shard, wanted in sorted(by_shard.items()):
        tar_key = storage.manifest(f"{IMAGES}/{shard}")["tar"]["key"]
        with storage.fs.open(storage.path(tar_key), "rb") as f:
            for key, sample in read_tar(f):
                if key in wanted:
                    r = wanted[key]
                    r["caption"] = sample.meta["caption"]
                    try:
                        Image.open(io.BytesIO(sample.jpeg)).verify()
                    except Exception:  # noqa: BLE001 - whatever PIL raises, the image is unusable
                        unreadable.append(r["caption_id"])
                    storage.write_bytes(f"{base}/{image_path(r['rank'], r['caption_id'])}", sample.jpeg)
    missing = [r["caption_id"] for r in rows if "caption" not in r]
    if missing:
        raise RuntimeError(f"{len(missing)} selected images are missing from their shard tars, e.g. {missing[:5]}")

    storage.write_json(f"{base}/{ASSET}.json", [llava_record(r["caption_id"], r["caption"], r["rank"]) for r in rows])
    for i in range(0, len(rows), SAMPLES_PER_SHARD):
        chunk = rows[i : i + SAMPLES_PER_SHARD]
        samples = [(r, storage.read_bytes(f"{base}/{image_path(r['rank'], r['caption_id'])}")) for r in chunk]
        storage.write_bytes(f"{base}/wds/shard-{i // SAMPLES_PER_SHARD:05d}.tar", webdataset_shard(samples))
        storage.write_bytes(f"{base}/hf/train-{i // SAMPLES_PER_SHARD:05d}.parquet", hf_parquet(samples))
    storage.write_parquet(f"{base}/selection.parquet", pa.Table.from_pylist(rows))
    if lineage is not None:
        storage.write_parquet(f"{base}/lineage.parquet", lineage)
    storage.write_bytes(f"{base}/README.md", card(pa.Table.from_pylist(rows)).encode())

    previous = storage.manifest(ASSET)
    manifest = {"version": version, "prefix": base, "records": len(rows), **info}
    storage.write_json(f"{ASSET}/_manifest.json", manifest)  # the switch: readers follow this
    if previous and previous.get("prefix") not in (None, base):
        storage.delete(previous["prefix"])
    return manifest, rows, unreadable


def dataset_card(selected: pa.Table, all_scores: pa.Table, info: dict) -> str:
    """Counts, settings, score statistics and the paper's Table 4 beside ours."""
    import pyarrow.compute as pc

    def mean(t: pa.Table, c: str) -> float:
        return pc.mean(t.column(c)).as_py() if t.num_rows else float("nan")

    lines = [
        "---",
        "license: cc-by-nc-4.0",
        "task_categories: [image-to-text]",
        "---",
        "# SynthVLM-100K (synthvlm-assets)",
        "",
        f"{selected.num_rows} image-caption pairs selected from {info['captions_scored']} scored captions "
        f"({all_scores.num_rows} candidate images) by score = clip_score + {info['settings']['lam']} * ssim, "
        "best candidate per caption, global top K, ties broken by caption id.",
        "",
    ]
    if info.get("tiny"):
        lines += ["**Made with the tiny preset (random weights): the images and scores are meaningless.**", ""]
    lines += [
        "| set | CLIPScore | SSIM | score |",
        "|---|---|---|---|",
        f"| selected (this run) | {mean(selected, 'clip_score'):.3f} | {mean(selected, 'ssim'):.3f} | "
        f"{mean(selected, 'score'):.3f} |",
        f"| all candidates (this run) | {mean(all_scores, 'clip_score'):.3f} | {mean(all_scores, 'ssim'):.3f} | "
        f"{mean(all_scores, 'score'):.3f} |",
    ]
    for name, (c, s, w) in PAPER_TABLE_4.items():
        lines.append(f"| {name} | {c:.2f} | {s:.2f} | {'-' if w is None else f'{w:.2f}'} |")
    lines += [
        "",
        "## Files",
        "- `synthvlm_100k.json`: LLaVA pretraining format; `images/` (at most 10,000 per folder)",
        "- `wds/shard-*.tar`: WebDataset (`.jpg`, `.txt`, `.json`); `hf/train-*.parquet`: "
        "`datasets.load_dataset('parquet', ...)`",
        "- `selection.parquet`: the selected rows with rank, scores, shard and image key",
        "- [`lineage.parquet`](lineage.parquet): per-image provenance of every candidate (source file and row, raw and"
        " normalised caption, rule-filter values, judge verdict and p_yes with the prompt version, seed, generator "
        "model,"
        " revision and settings hash, clip_score, ssim, score, rank, and the Dagster run id of every step);"
        " `duckdb -c \"SELECT * FROM 'lineage.parquet' WHERE rank = 1\"`",
        "",
        "## Settings",
        "```json",
        json.dumps(info["settings"], indent=1, sort_keys=True, default=str),
        "```",
        "",
        "Licence: CC BY-NC 4.0 (as SynthVLM's data). Method: Liu et al., SynthVLM (arXiv 2407.20756).",
    ]
    return "\n".join(lines) + "\n"
