"""Scoring images that are not the pipeline's shards: a folder of NAME.jpg + NAME.txt pairs, or a LLaVA
pretraining JSON (SynthVLM-100K's format), local or s3://. One row per image or caption found: scored
(CLIPScore, SSIM, score = clip_score + lambda * ssim), or left unscored with the reason."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from synthvlm_assets.scoring.clip_score import ClipScorer
from synthvlm_assets.scoring.ssim import SSIMSettings
from synthvlm_assets.storage import ObjectNotFound, StorageRoot

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FOLDER_SCHEMA = pa.schema(
    [
        ("image", pa.string()),  # relative to the folder (or to the JSON's folder)
        ("caption", pa.string()),
        ("clip_score", pa.float64()),
        ("ssim", pa.float64()),
        ("score", pa.float64()),
        ("error", pa.string()),  # why the row is unscored; null when scored
    ]
)


@dataclass(frozen=True)
class Item:
    image: str
    caption: str | None
    error: str | None = None


def folder_items(root: StorageRoot) -> list[Item]:
    """NAME.<image suffix> with NAME.txt beside it (UTF-8, stripped); an image or a caption alone is a row
    with its reason."""
    keys = root.list("")
    by_stem: dict[str, dict[str, str]] = {}
    for key in keys:
        stem, suffix = posixpath.splitext(key)
        kind = "txt" if suffix.lower() == ".txt" else "image" if suffix.lower() in IMAGE_SUFFIXES else None
        if kind:
            by_stem.setdefault(stem, {})[kind] = key
    items = []
    for stem, found in sorted(by_stem.items()):
        if "image" not in found:
            items.append(Item(found["txt"], None, "a caption without an image"))
        elif "txt" not in found:
            items.append(Item(found["image"], None, f"no caption ({stem}.txt)"))
        else:
            try:
                items.append(Item(found["image"], root.read_bytes(found["txt"]).decode("utf-8").strip()))
            except UnicodeDecodeError as exc:
                items.append(
                    Item(found["image"], None, f"{found['txt']}: not UTF-8 ({exc.reason} at byte {exc.start})")
                )
    return items


def llava_items(root: StorageRoot, name: str) -> list[Item]:
    """The records of a LLaVA pretraining JSON: the image (relative to the JSON's folder) and the gpt turn."""
    items = []
    for i, record in enumerate(json.loads(root.read_bytes(name))):
        image = record.get("image") if isinstance(record, dict) else None
        turns = [t.get("value") for t in record.get("conversations", []) if t.get("from") == "gpt"] if image else []
        if not image:
            items.append(Item(f"{name}[{i}]", None, "a record without an image"))
        elif not turns or not isinstance(turns[0], str):
            items.append(Item(image, None, f"{name}[{i}]: no gpt turn to score as the caption"))
        else:
            items.append(Item(image, turns[0]))
    return items


def score_folder(
    root: StorageRoot, scorer: ClipScorer, ssim_settings: SSIMSettings, lam: float, llava_json: str | None = None
) -> pa.Table:
    """Every item of the folder (or of its LLaVA JSON) scored, in batches on the scorer's device; an image
    that cannot be read or decoded is an unscored row naming the error, and the others still score."""
    from synthvlm_assets.scoring.stage import score_images

    items = llava_items(root, llava_json) if llava_json else folder_items(root)
    results: dict[str, tuple[float, float] | str] = {}  # by the item's index: a JSON may name an image twice

    def samples(batch: list[int]) -> Iterator[tuple[str, bytes, str]]:
        for i in batch:
            try:
                yield str(i), root.read_bytes(items[i].image), items[i].caption
            except ObjectNotFound:
                results[str(i)] = "image not found"

    def score(batch: list[int]) -> None:
        results.update((k, (c, s)) for k, c, s in score_images(samples(batch), scorer, ssim_settings))

    todo = [i for i, item in enumerate(items) if item.error is None]
    size = scorer.settings.batch_size
    for start in range(0, len(todo), size):
        batch = todo[start : start + size]
        try:
            score(batch)
        except Exception:  # noqa: BLE001 - one bad image fails its batch: score the batch one by one to name it
            for i in batch:
                try:
                    score([i])
                except Exception as exc:  # noqa: BLE001
                    results[str(i)] = f"{type(exc).__name__}: {exc}"
    rows = []
    for i, item in enumerate(items):
        got = results.get(str(i), item.error or "not scored")
        clip, ssim = got if isinstance(got, tuple) else (None, None)
        rows.append({
            "image": item.image, "caption": item.caption, "clip_score": clip, "ssim": ssim,
            "score": None if clip is None else clip + lam * ssim, "error": None if clip is not None else got,
        })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=FOLDER_SCHEMA)
