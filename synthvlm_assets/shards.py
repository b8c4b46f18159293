"""The shard registry: which caption files are registered, in which order, and their shards; and
`read_shard`, a shard's rows from its source file (captions/sources.py reads the formats).

A shard is a fixed row range of one source file; its key names the file and the range
(`coco_captions_val2017-1a2b3c4d-00000000-00001000`). Registration order (files by sequence number,
shards by start row) is what "first occurrence wins" means for duplicate removal. Files are treated
as immutable once registered: a changed file is reported, never silently re-read.

What "unchanged" means: the size and modification time (or ETag) are the same as at registration (the
fast check) and so is the content, by sha256 taken while the registration scan read the file: for JSONL
and CSV, of the shard's own byte range (checking a shard reads as much as reading it does); for JSON,
COCO and Parquet, of the whole file, verified once per process for an unchanged size and time. Entries
registered before hashes were recorded are checked by size and time alone.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa

from synthvlm_assets.captions.normalize import dedup_key, normalize_caption
from synthvlm_assets.captions.sources import (
    MALFORMED_SCHEMA,
    RAW_SCHEMA,
    CaptionFields,
    CaptionRow,
    MalformedRow,
    SourceScan,
    caption_id,
    iter_records,
    one_line,
    scan_source,
    to_caption_row,
    where,
)
from synthvlm_assets.storage import StorageRoot, filesystem_for, local_or_absolute, split_protocol

REGISTRY_PREFIX = "registry/files"


class ShardRegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class Shard:
    key: str
    file_tag: str
    uri: str
    format: str
    start: int
    end: int
    offset: int | None  # byte offset of row `start`, for line-based formats
    file_seq: int
    shard_rows: int  # the shard size the file was registered with
    line: int | None = None  # 1-based line of row `start`, for line-based formats
    sha256: str | None = None  # of the shard's byte range, for line-based formats

    @property
    def rows(self) -> int:
        return self.end - self.start


def file_tag(uri: str) -> str:
    stem = posixpath.splitext(posixpath.basename(split_protocol(uri)[1]))[0]
    stem = re.sub(r"[^A-Za-z0-9._]+", "_", stem).strip("._")[:48] or "captions"
    return f"{stem}-{hashlib.sha1(uri.encode('utf-8')).hexdigest()[:8]}"


def shard_key(tag: str, start: int, end: int, width: int) -> str:
    return f"{tag}-{start:0{width}d}-{end:0{width}d}"


_HASH_CHUNK = 1 << 20
# Whole files whose content hash was verified in this process: (uri, fast fingerprint, sha256).
_VERIFIED: set[tuple[str, str, str]] = set()
_VERIFIED_LOCK = threading.Lock()


def sha256_of(fs: fsspec.AbstractFileSystem, path: str, start: int = 0, end: int | None = None) -> str:
    """sha256 of the bytes `start <= i < end` of a file (the whole file by default), streamed."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        f.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            chunk = f.read(_HASH_CHUNK if left is None else min(_HASH_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest.hexdigest()


def fingerprint(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """What tells us a file changed: its size and its ETag (S3) or modification time (local)."""
    info = fs.info(path)
    out: dict[str, Any] = {"size": int(info.get("size") or 0)}
    for k in ("ETag", "etag", "mtime", "LastModified", "last_modified"):
        if k in info and info[k] is not None:
            out["version"] = str(info[k])
            break
    return out


class ShardRegistry:
    """Registered caption files live as one JSON document each under `registry/files/` of the root."""

    def __init__(self, storage: StorageRoot) -> None:
        self.storage = storage
        self._cache: dict[str, dict[str, Any]] = {}

    def source_fs(self, uri: str) -> fsspec.AbstractFileSystem:
        return filesystem_for(uri, self.storage.s3_endpoint_url, **self.storage.storage_options)

    # -- reading ----------------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every registered file, in registration order."""
        out = []
        for key in self.storage.list(REGISTRY_PREFIX):
            if not key.endswith(".json"):
                continue
            if key not in self._cache:
                self._cache[key] = self.storage.read_json(key)
            out.append(self._cache[key])
        return sorted(out, key=lambda e: e["seq"])

    def shards(self) -> list[Shard]:
        """Every registered shard, in registration order."""
        return [self._shard(e, i) for e in self.entries() for i in range(len(e["shards"]))]

    def file_tags(self) -> dict[int, str]:
        """File sequence number -> file tag (the prefix of its caption ids)."""
        return {e["seq"]: e["file_tag"] for e in self.entries()}

    def shard(self, key: str) -> Shard:
        for entry in self.entries():
            if key.startswith(entry["file_tag"] + "-"):
                for i, s in enumerate(entry["shards"]):
                    if s["key"] == key:
                        return self._shard(entry, i)
        raise ShardRegistryError(f"shard {key!r} is not registered in {self.storage.uri(REGISTRY_PREFIX)}")

    def earlier_shards(self, key: str) -> list[Shard]:
        """Shards registered before `key` (whose captions win duplicate ties against it)."""
        out = []
        for s in self.shards():
            if s.key == key:
                return out
            out.append(s)
        raise ShardRegistryError(f"shard {key!r} is not registered")

    @staticmethod
    def _shard(entry: dict[str, Any], i: int) -> Shard:
        s = entry["shards"][i]
        return Shard(
            s["key"],
            entry["file_tag"],
            entry["uri"],
            entry["format"],
            s["start"],
            s["end"],
            s.get("offset"),
            entry["seq"],
            entry["shard_rows"],
            line=s.get("line"),
            sha256=s.get("sha256"),
        )

    def check_unchanged(self, shard: Shard) -> None:
        """Fail clearly when a registered file changed: its shards would no longer be the rows we registered."""
        entry = next(e for e in self.entries() if e["file_tag"] == shard.file_tag)
        fs = self.source_fs(shard.uri)
        path = split_protocol(shard.uri)[1]
        try:
            now = fingerprint(fs, path)
        except FileNotFoundError as exc:
            raise ShardRegistryError(f"registered caption file {shard.uri} no longer exists") from exc
        if now != entry["fingerprint"]:
            raise ShardRegistryError(
                f"caption file {shard.uri} changed since it was registered ({entry['fingerprint']} -> {now}); "
                "registered files are immutable: put new captions in a new file"
            )
        try:
            self._check_content(fs, path, entry, shard)
        except FileNotFoundError as exc:
            raise ShardRegistryError(f"registered caption file {shard.uri} no longer exists") from exc

    @staticmethod
    def _check_content(fs: fsspec.AbstractFileSystem, path: str, entry: dict[str, Any], shard: Shard) -> None:
        """Same size and time, but the same bytes? A rewrite that kept both must not pass as unchanged."""
        changed = (
            f"caption file {shard.uri} changed since it was registered (same size and modification time,"
            " different content{}); registered files are immutable: put new captions in a new file"
        )
        if shard.sha256 is not None and shard.offset is not None:
            keys = [s["key"] for s in entry["shards"]]
            i = keys.index(shard.key)
            end = entry["shards"][i + 1]["offset"] if i + 1 < len(keys) else entry["fingerprint"]["size"]
            if sha256_of(fs, path, shard.offset, end) != shard.sha256:
                raise ShardRegistryError(changed.format(f" in rows {shard.start}-{shard.end - 1}"))
            return
        expected = entry.get("sha256")
        if expected is None:
            return  # registered before content hashes were recorded
        verified = (shard.uri, repr(sorted(entry["fingerprint"].items())), expected)
        with _VERIFIED_LOCK:
            if verified in _VERIFIED:
                return
        if sha256_of(fs, path) != expected:
            raise ShardRegistryError(changed.format(""))
        with _VERIFIED_LOCK:
            _VERIFIED.add(verified)

    # -- registering ------------------------------------------------------------------------
    def register_file(self, uri: str, shard_rows: int) -> tuple[dict[str, Any], list[Shard]]:
        """Register a caption file; returns its entry and the shards it added ([] if it was registered)."""
        uri = local_or_absolute(uri)
        tag = file_tag(uri)
        for entry in self.entries():
            if entry["uri"] == uri:
                return entry, []
        fs = self.source_fs(uri)
        path = split_protocol(uri)[1]
        try:
            fp = fingerprint(fs, path)
        except FileNotFoundError as exc:
            raise ShardRegistryError(f"caption file not found: {uri}") from exc
        scan: SourceScan = scan_source(fs, path, shard_rows)
        width = max(8, len(str(scan.n_records)))
        shards = []
        for i, start in enumerate(range(0, scan.n_records, shard_rows)):
            end = min(start + shard_rows, scan.n_records)
            shard: dict[str, Any] = {
                "key": shard_key(tag, start, end, width),
                "start": start,
                "end": end,
                "offset": None,
            }
            if scan.shard_offsets is not None:
                shard["offset"] = scan.shard_offsets[i]
                if scan.shard_lines is not None:
                    shard["line"] = scan.shard_lines[i]
                if scan.shard_sha256 is not None:
                    shard["sha256"] = scan.shard_sha256[i]
            shards.append(shard)
        sha256 = scan.sha256 if scan.sha256 is not None else sha256_of(fs, path)
        seq = max((e["seq"] for e in self.entries()), default=0) + 1
        entry = {
            "seq": seq,
            "uri": uri,
            "file_tag": tag,
            "format": scan.format,
            "n_records": scan.n_records,
            "shard_rows": shard_rows,
            "fingerprint": fp,
            "sha256": sha256,
            "columns": scan.columns,
            "registered_at": datetime.now(timezone.utc).isoformat(),
            "shards": shards,
        }
        self.storage.write_json(posixpath.join(REGISTRY_PREFIX, f"{seq:06d}--{tag}.json"), entry)
        self._cache.clear()
        return entry, [self._shard(entry, i) for i in range(len(shards))]


def read_shard(shard: Shard, fields: CaptionFields, fs: fsspec.AbstractFileSystem) -> tuple[pa.Table, pa.Table]:
    """Load one shard's rows from its source file: (rows in the pool schema, malformed rows with reasons).

    The text is normalised here, once: curation filters the normalised text, and every later shard
    checks its duplicates against the stored dedup keys without normalising this shard again.
    """
    path = split_protocol(shard.uri)[1]
    default_source = path.rsplit("/", 1)[-1]
    rows: list[CaptionRow] = []
    bad: list[MalformedRow] = []
    for record in iter_records(fs, path, shard.format, shard.start, shard.end, shard.offset, shard.line):
        try:
            row = to_caption_row(record, fields, default_source)
        except Exception as exc:  # noqa: BLE001 - one hostile record (e.g. too deep to repr) fails only itself
            at = where(shard.uri, record.row, record.line)
            row = MalformedRow(record.row, "invalid_record", f"{at}: {type(exc).__name__}: {one_line(exc)}")
        (rows if isinstance(row, CaptionRow) else bad).append(row)
    normalized = [normalize_caption(r.caption) for r in rows]
    raw = pa.table(
        {
            "caption_id": [caption_id(shard.file_tag, r.source_row) for r in rows],
            "caption": [r.caption for r in rows],
            "caption_normalized": normalized,
            "dedup_key": [dedup_key(t) for t in normalized],
            "source": [r.source for r in rows],
            "source_id": [r.source_id for r in rows],
            "source_file": [shard.uri] * len(rows),
            "source_row": [r.source_row for r in rows],
            "image_ref": [r.image_ref for r in rows],
            "shard": [shard.key] * len(rows),
        },
        schema=RAW_SCHEMA,
    )
    malformed = pa.table(
        {
            "source_file": [shard.uri] * len(bad),
            "source_row": [b.source_row for b in bad],
            "shard": [shard.key] * len(bad),
            "reason": [b.reason for b in bad],
            "detail": [b.detail for b in bad],
        },
        schema=MALFORMED_SCHEMA,
    )
    return raw, malformed
