"""image_scores for one shard: CLIPScore and SSIM of every usable image, in one pass over its tar.

Three paths (`ClipSettings.decode`): "device" decodes each batch of JPEGs on the GPU (nvjpeg) and does
the resizes that define both scores there too (scoring/device.py, pixel-identical to PIL's resizes);
"device-resize" decodes with PIL in CPU worker processes and resizes on the device (the reference's
pixels exactly: nvjpeg's decode is not bit-identical to libjpeg-turbo's); "workers" decodes and resizes
with PIL in the worker processes, which bounds its throughput. The CLIP towers and the SSIM arithmetic
run batched on the device either way.
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from synthvlm_assets.progress import Progress, no_progress
from synthvlm_assets.scoring.clip_score import ClipScorer
from synthvlm_assets.scoring.device import (
    ClipPreprocess,
    DecodeCounts,
    resolve_decode,
    score_decoded_on_device,
    score_jpegs_on_device,
)
from synthvlm_assets.scoring.ssim import SSIMSettings, ssim_pair, ssim_torch
from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.synthesis.stage import ASSET as IMAGES
from synthvlm_assets.synthesis.stage import read_tar

ASSET = "image_scores"
SCORES_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("candidate", pa.int32()),
        ("key", pa.string()),
        ("shard", pa.string()),
        ("clip_score", pa.float64()),
        ("ssim", pa.float64()),
        ("score", pa.float64()),  # clip_score + lambda * ssim
        ("clip_model", pa.string()),
        ("clip_pretrained", pa.string()),
        ("ssim_settings", pa.string()),
        ("lambda", pa.float64()),
    ]
)

SSIM_CHUNK = 32  # images per SSIM computation (bounds its float64 intermediates to ~1.5 GB)
_PREPROCESS = None
_SSIM: SSIMSettings | None = None


def _init(preprocess, ssim_settings: SSIMSettings, worker: bool = False) -> None:
    global _PREPROCESS, _SSIM
    _PREPROCESS, _SSIM = preprocess, ssim_settings
    if worker:
        import torch

        torch.set_num_threads(1)  # one process per core already


def prepare(jpeg: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode once; CLIP's preprocessing and SSIM's two grayscale images."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    a, b = ssim_pair(image, _SSIM)
    return _PREPROCESS(image).numpy(), a, b


def decode_rgb(jpeg: bytes) -> np.ndarray:
    """The "device-resize" path's worker task: PIL's decode only, (H, W, 3) uint8."""
    return np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))  # writable: torch.from_numpy warns otherwise


@dataclass
class ScoreResult:
    scores: pa.Table
    seconds: float
    images_per_second: float
    prefix: str
    checks: dict[str, bool]  # also in the partition manifest: the selection reads only shards that passed
    decode: dict | None = None  # DecodeCounts: the path, and images decoded on the device or by PIL


def score_checks(scores: pa.Table, usable_images: int) -> dict[str, bool]:
    """Scores in range, and exactly one row per usable image."""
    import pyarrow.compute as pc

    clip, ssim = scores.column("clip_score"), scores.column("ssim")
    ids = pc.binary_join_element_wise(
        scores.column("caption_id"), pc.cast(scores.column("candidate"), pa.string()), "|"
    )
    in_range = scores.num_rows == 0 or (
        pc.min(clip).as_py() >= 0
        and pc.max(clip).as_py() <= 1
        and pc.min(ssim).as_py() >= -1
        and pc.max(ssim).as_py() <= 1
    )
    return {
        "scores_in_range": in_range,
        "one_row_per_image": scores.num_rows == usable_images and pc.count_distinct(ids).as_py() == scores.num_rows,
    }


def _batches(samples: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in samples:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_prepared(
    prepared: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    captions: list[str],
    scorer: ClipScorer,
    ssim_settings: SSIMSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """The device side of one batch: CLIPScore and SSIM of `prepare`d images."""
    import torch

    clip = scorer.clip_scores(torch.from_numpy(np.stack([p[0] for p in prepared])), captions)
    ssim = np.concatenate(
        [
            # float64 maps of 768² are 4.7 MB each and SSIM keeps ~10 of them: chunk the batch.
            ssim_torch(
                torch.from_numpy(np.stack([p[1] for p in prepared[i : i + SSIM_CHUNK]])).to(scorer.device),
                torch.from_numpy(np.stack([p[2] for p in prepared[i : i + SSIM_CHUNK]])).to(scorer.device),
                ssim_settings,
            )
            .cpu()
            .numpy()
            for i in range(0, len(prepared), SSIM_CHUNK)
        ]
    )
    return clip, ssim


def decode_pool(scorer: ClipScorer, ssim_settings: SSIMSettings, workers: int) -> ProcessPoolExecutor | None:
    """Worker processes for `prepare` (None for workers=0). Starting them costs seconds (each imports
    torch): make one per shard or session and pass it to every score_images call."""
    if not workers:
        return None
    # forkserver, not fork: a child forked from a process whose torch thread pools are running can
    # deadlock on their locks the first time it runs a torch op (the transforms do).
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=_init,
        initargs=(scorer.preprocess, ssim_settings, True),
    )


def score_images(
    samples: Iterable[tuple[str, bytes, str]],
    scorer: ClipScorer,
    ssim_settings: SSIMSettings,
    workers: int = 0,
    pool: ProcessPoolExecutor | None = None,
    decode: str | None = None,
    counts: DecodeCounts | None = None,
) -> Iterator[tuple[str, float, float]]:
    """(key, clip_score, ssim) of (key, jpeg, caption) samples, in batches of `scorer.settings.batch_size`,
    by the path `decode` names (default `scorer.settings.decode`). The "workers" and "device-resize"
    paths decode in worker processes (`pool`, or `workers` new ones; in this process for none) while the
    device scores the previous batch. `counts`, if given, records where the images were decoded."""
    counts = counts if counts is not None else DecodeCounts()
    counts.path = resolve_decode(decode or scorer.settings.decode, scorer.device)
    if counts.path == "device":
        yield from _score_on_device(samples, scorer, ssim_settings, counts)
        return
    _init(scorer.preprocess, ssim_settings)
    own_pool = pool is None and workers > 0
    if own_pool:
        pool = decode_pool(scorer, ssim_settings, workers)

    work = prepare if counts.path == "workers" else decode_rgb
    clip_preprocess = ClipPreprocess(scorer.preprocess) if counts.path == "device-resize" else None

    def submit(batch: list) -> tuple[list, Iterator]:
        jpegs = [jpeg for _, jpeg, _ in batch]
        # Executor.map submits every task at once: the workers decode this batch while the device
        # scores the previous one.
        return batch, (pool.map(work, jpegs, chunksize=8) if pool else map(work, jpegs))

    try:
        batches = _batches(iter(samples), scorer.settings.batch_size)
        ahead = [submit(b) for b in itertools.islice(batches, 1)]
        while ahead:
            batch, results = ahead.pop()
            prepared = list(results)
            ahead.extend(submit(b) for b in itertools.islice(batches, 1))
            captions = [c for _, _, c in batch]
            if clip_preprocess is None:
                clip, ssim = score_prepared(prepared, captions, scorer, ssim_settings)
            else:
                clip, ssim = score_decoded_on_device(prepared, captions, scorer, ssim_settings, clip_preprocess)
            counts.pil += len(batch)
            for (key, _, _), c, s_ in zip(batch, clip, ssim):
                yield key, float(c), float(s_)
    finally:
        if own_pool:
            pool.shutdown()


def _score_on_device(
    samples: Iterable[tuple[str, bytes, str]], scorer: ClipScorer, ssim_settings: SSIMSettings, counts: DecodeCounts
) -> Iterator[tuple[str, float, float]]:
    clip_preprocess = ClipPreprocess(scorer.preprocess)
    for batch in _batches(iter(samples), scorer.settings.batch_size):
        clip, ssim = score_jpegs_on_device(
            [j for _, j, _ in batch], [c for _, _, c in batch], scorer, ssim_settings, clip_preprocess, counts
        )
        for (key, _, _), c, s_ in zip(batch, clip, ssim):
            yield key, float(c), float(s_)


def score_shard(
    storage: StorageRoot,
    shard: str,
    scorer: ClipScorer,
    ssim_settings: SSIMSettings,
    lam: float,
    workers: int = 0,
    run_id: str = "",
    progress: Progress = no_progress,
) -> ScoreResult:
    """Score the shard's usable images and publish `image_scores/<shard>/scores.parquet`;
    `progress(done, total)` is called per scored image (cheap: the sink throttles)."""
    t0 = time.perf_counter()
    images_prefix = f"{IMAGES}/{shard}"
    manifest = storage.manifest(images_prefix)
    if manifest is None:
        raise FileNotFoundError(f"sdxl_images of shard {shard} is not materialized ({storage.uri(images_prefix)})")
    usable = {r["key"]: r for r in storage.read_partition(images_prefix, "manifest").to_pylist() if not r["flag"]}
    rows = []
    counts = DecodeCounts()
    progress(0, len(usable))
    with storage.fs.open(storage.path(manifest["tar"]["key"]), "rb") as f:
        samples = ((k, s.jpeg, usable[k]["caption"]) for k, s in read_tar(f) if k in usable and s.jpeg is not None)
        for key, clip, ssim in score_images(samples, scorer, ssim_settings, workers, counts=counts):
            r = usable[key]
            rows.append(
                {
                    "caption_id": r["caption_id"],
                    "candidate": r["candidate"],
                    "key": key,
                    "clip_score": clip,
                    "ssim": ssim,
                }
            )
            progress(len(rows), len(usable))
    settings_json = json.dumps(asdict(ssim_settings), sort_keys=True)
    table = pa.Table.from_pylist(
        [
            {**r, "shard": shard, "score": r["clip_score"] + lam * r["ssim"], "clip_model": scorer.settings.model,
             "clip_pretrained": scorer.settings.pretrained, "ssim_settings": settings_json, "lambda": lam}
            for r in rows
        ],
        schema=SCORES_SCHEMA,
    )  # fmt: skip
    prefix = f"{ASSET}/{shard}"
    checks = score_checks(table, len(usable))
    storage.publish_partition(
        prefix,
        {"scores": table},
        {
            "shard": shard,
            "run_id": run_id,
            "images_tar_sha256": manifest["tar"]["sha256"],
            "checks": checks,
            "checks_passed": all(checks.values()),
            "decode": asdict(counts),
        },
    )
    seconds = time.perf_counter() - t0
    return ScoreResult(table, seconds, len(rows) / seconds if seconds else 0.0, prefix, checks, asdict(counts))
