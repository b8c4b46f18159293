"""sdxl_images for one shard: every (caption, candidate) gets a JPEG in a WebDataset-style tar with a
Parquet manifest, published atomically.

Images are addressed by `image_key` (caption text, seed, model, settings). Work already done is
reused: images of the shard's previous output whose keys are still wanted, and chunks that an
interrupted run staged durably (one small tar per generated batch). Only what is missing is
generated, so a finished shard reruns without loading the model and a crashed one resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Container, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow as pa
from PIL import Image

from synthvlm_assets import tars
from synthvlm_assets.progress import Progress, no_progress
from synthvlm_assets.storage import StorageError, StorageRoot
from synthvlm_assets.synthesis.sdxl import Generated, SDXLGenerator
from synthvlm_assets.synthesis.settings import SynthesisSettings, image_key, seed_for

ASSET = "sdxl_images"
MANIFEST_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("candidate", pa.int32()),
        ("caption", pa.string()),
        ("seed", pa.int64()),
        ("key", pa.string()),  # the tar member's key (`<key>.jpg`, `<key>.json`): the image key
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("flag", pa.string()),  # why an image is not in the tar (nan, black, constant), else null
        ("model", pa.string()),
        ("model_revision", pa.string()),
        ("refiner_model", pa.string()),
        ("settings", pa.string()),  # JSON of every setting that determines the image
    ]
)


@dataclass(frozen=True)
class Wanted:
    caption_id: str
    candidate: int
    caption: str
    seed: int
    key: str


@dataclass
class Sample:
    jpeg: bytes | None
    meta: dict  # what goes into <key>.json (and the manifest)


def wanted_images(captions: pa.Table, settings: SynthesisSettings) -> list[Wanted]:
    out = []
    for cid, text in zip(captions.column("caption_id").to_pylist(), captions.column("caption").to_pylist()):
        for c in range(settings.images_per_caption):
            seed = seed_for(cid, c)
            out.append(Wanted(cid, c, text, seed, image_key(text, seed, settings)))
    return out


def encode_jpeg(pixels, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# -- tars -------------------------------------------------------------------------------------
def write_tar(fileobj: BinaryIO, samples: Iterable[tuple[str, Sample]]) -> None:
    """A shard's tar: `<key>.json` (the meta) and, unless the image is flagged, `<key>.jpg`."""

    def members(sample: Sample) -> dict[str, bytes]:
        out = {"json": json.dumps(sample.meta, sort_keys=True).encode()}
        if sample.jpeg is not None:
            out["jpg"] = sample.jpeg
        return out

    tars.write_samples(fileobj, ((key, members(sample)) for key, sample in samples))


def read_tar(fileobj: BinaryIO) -> Iterator[tuple[str, Sample]]:
    """Samples of a tar written by `write_tar`, streamed; a flagged sample comes without its JPEG."""
    for key, members in tars.read_samples(fileobj):
        if "json" not in members:
            continue  # a JPEG without its meta is no sample
        meta = json.loads(members["json"])
        if meta.get("flag"):
            yield key, Sample(None, meta)
        elif "jpg" in members:
            yield key, Sample(members["jpg"], meta)


def image_sizes(fileobj: BinaryIO, keep: Container[str]) -> tuple[dict[str, tuple[int, int]], dict[str, bytes]]:
    """(width, height) of every JPEG of a shard's tar, from its header, and the bytes of those in `keep`."""
    sizes, kept = {}, {}
    for key, sample in read_tar(fileobj):
        if sample.jpeg is not None:
            sizes[key] = Image.open(io.BytesIO(sample.jpeg)).size
            if key in keep:
                kept[key] = sample.jpeg
    return sizes, kept


# -- the stage --------------------------------------------------------------------------------
def image_checks(
    manifest: list[dict], sizes: dict[str, tuple[int, int]], wanted: list[Wanted], settings: SynthesisSettings
) -> dict[str, tuple[bool, dict]]:
    """sdxl_images' checks of one shard, from its manifest rows and the sizes of the JPEGs in its tar:
    check name -> (passed, what it saw)."""
    flags = [r for r in manifest if r["flag"]]
    ok_keys = {r["key"] for r in manifest if not r["flag"]}
    covered = {(r["caption_id"], r["candidate"]) for r in manifest if r["key"] in sizes or r["flag"]}
    missing = [(w.caption_id, w.candidate) for w in wanted if (w.caption_id, w.candidate) not in covered]
    wrong_size = [k for k, wh in sizes.items() if wh != (settings.width, settings.height)]
    return {
        "every_caption_has_its_images": (
            not missing and ok_keys <= set(sizes),
            {"missing": len(missing), "first_missing": str(missing[:10])},
        ),
        "image_size": (not wrong_size, {"expected": f"{settings.width}x{settings.height}", "wrong": len(wrong_size)}),
        "no_unusable_images": (
            not flags,
            {"flagged": len(flags), "caption_ids": str([r["caption_id"] for r in flags][:50])},
        ),
    }


@dataclass
class SynthesisResult:
    manifest: pa.Table
    generated: int
    reused: int
    skipped: bool  # the shard was already complete: nothing was done
    seconds: float
    prefix: str
    generator: SDXLGenerator | None = None  # loaded only when something was generated


class _Staging:
    """Durable progress of an unfinished shard: one small tar per generated batch."""

    def __init__(self, storage: StorageRoot, shard: str, settings: SynthesisSettings) -> None:
        self.storage, self.prefix = storage, f"{ASSET}/_staging/{shard}/{settings.image_settings_hash()}"

    def load(self) -> dict[str, Sample]:
        out = {}
        for key in self.storage.list(self.prefix):
            if key.endswith(".tar"):
                with self.storage.fs.open(self.storage.path(key), "rb") as f:
                    out.update(read_tar(f))
        return out

    def save(self, samples: list[tuple[str, Sample]]) -> None:
        buf = io.BytesIO()
        write_tar(buf, samples)
        self.storage.write_bytes(f"{self.prefix}/chunk-{samples[0][0]}.tar", buf.getvalue())

    def clear(self) -> None:
        self.storage.delete(posixpath.dirname(self.prefix))  # this shard's staging, all settings


def _previous(storage: StorageRoot, prefix: str, keys: set[str]) -> dict[str, Sample]:
    """Samples of the shard's last published output that are still wanted."""
    manifest = storage.manifest(prefix)
    if manifest is None or "tar" not in manifest:
        return {}
    out = {}
    try:
        with storage.fs.open(storage.path(manifest["tar"]["key"]), "rb") as f:
            for key, sample in read_tar(f):
                if key in keys:
                    out[key] = sample
    except (FileNotFoundError, StorageError):
        return {}
    return out


def synthesize_shard(
    storage: StorageRoot,
    shard: str,
    captions: pa.Table,
    settings: SynthesisSettings,
    generator: Callable[[], SDXLGenerator],
    model_revision: str | None = None,
    run_id: str = "",
    progress: Progress = no_progress,
) -> SynthesisResult:
    """Make sure every caption of the shard has its images; generate only what is missing.

    `progress(done, total)` is called before generating and after each batch (images reused count as
    done). It is also where an interrupt lands between batches: every generated batch is staged by then
    (the encoder pool is drained on the way out), so the next run resumes from it."""
    t0 = time.perf_counter()
    prefix = f"{ASSET}/{shard}"
    wanted = wanted_images(captions, settings)
    keys = {w.key for w in wanted}
    manifest = storage.manifest(prefix)
    if manifest is not None and manifest.get("image_keys_sha256") == _keys_digest(wanted):
        table = storage.read_partition(prefix, "manifest")
        progress(len(wanted), len(wanted))
        return SynthesisResult(table, 0, len(wanted), True, time.perf_counter() - t0, prefix)

    have = _previous(storage, prefix, keys)
    staging = _Staging(storage, shard, settings)
    have.update({k: v for k, v in staging.load().items() if k in keys})
    reused = len(have)
    missing = [w for w in wanted if w.key not in have]
    settings_json = json.dumps(settings.image_settings(), sort_keys=True)

    def meta(w: Wanted, flag: str | None) -> dict:
        return {
            "caption_id": w.caption_id,
            "candidate": w.candidate,
            "caption": w.caption,
            "seed": w.seed,
            "flag": flag,
        }

    gen = None
    progress(reused, len(wanted))
    if missing:
        gen = generator()  # loaded only when something must be generated
        batches = [missing[i : i + settings.batch_size] for i in range(0, len(missing), settings.batch_size)]
        # JPEG encoding and staging writes of one batch overlap the denoising of the next.
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending, done = None, reused
            for batch in batches:
                images = gen.generate([w.caption for w in batch], [w.seed for w in batch])
                if pending is not None:
                    have.update(pending.result())
                pending = pool.submit(_encode_and_stage, staging, batch, images, settings.jpeg_quality, meta)
                done += len(batch)
                progress(done, len(wanted))
            if pending is not None:
                have.update(pending.result())

    if gen is not None and model_revision is None:
        model_revision = gen.model_revision
    rows, samples = [], []
    for w in wanted:
        sample = have[w.key]
        jpeg = sample.jpeg
        rows.append(
            {
                "caption_id": w.caption_id,
                "candidate": w.candidate,
                "caption": w.caption,
                "seed": w.seed,
                "key": w.key,
                "width": settings.width if jpeg else None,
                "height": settings.height if jpeg else None,
                "bytes": len(jpeg) if jpeg else None,
                "sha256": hashlib.sha256(jpeg).hexdigest() if jpeg else None,
                "flag": sample.meta.get("flag"),
                "model": settings.model,
                "model_revision": model_revision or settings.revision,
                "refiner_model": settings.refiner_model,
                "settings": settings_json,
            }
        )
        samples.append((w.key, sample))
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)

    # The tar goes to a local temporary file, then one atomic upload: never a partial tar in place.
    storage.delete(f"{prefix}/_manifest.json")
    tar_key = f"{prefix}/images.tar"
    with tempfile.NamedTemporaryFile(suffix=".tar", delete=False) as tmp:
        write_tar(tmp, samples)
        tmp_path = tmp.name
    try:
        tar_sha = _sha256_file(tmp_path)
        storage.put_file(tmp_path, tar_key)
    finally:
        os.unlink(tmp_path)
    storage.publish_partition(
        prefix,
        {"manifest": table},
        {
            "shard": shard, "run_id": run_id, "tar": {"key": tar_key, "sha256": tar_sha},
            "image_keys_sha256": _keys_digest(wanted), "settings": settings.image_settings(),
        },
    )  # fmt: skip
    staging.clear()
    return SynthesisResult(table, len(missing), reused, False, time.perf_counter() - t0, prefix, gen)


def _encode_and_stage(
    staging: _Staging, batch: list[Wanted], images: list[Generated], quality: int, meta
) -> dict[str, Sample]:
    samples = [
        (w.key, Sample(encode_jpeg(g.pixels, quality) if g.pixels is not None else None, meta(w, g.flag)))
        for w, g in zip(batch, images)
    ]
    staging.save(samples)  # durable before the next batch: a crash loses at most one batch
    return dict(samples)


def _keys_digest(wanted: list[Wanted]) -> str:
    return hashlib.sha256("\n".join(f"{w.caption_id}|{w.candidate}|{w.key}" for w in wanted).encode()).hexdigest()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
