"""The shard registry: which caption files are registered, in which order, and their shards.

A shard is a fixed row range of one source file; its key names the file and the range
(`coco_captions_val2017-1a2b3c4d-00000000-00001000`). Registration order (files by sequence number,
shards by start row) is what "first occurrence wins" means for duplicate removal. Files are treated
as immutable once registered: a changed file is reported, never silently re-read.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import fsspec

from synthvlm_assets.captions.sources import SourceScan, scan_source
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

    @property
    def rows(self) -> int:
        return self.end - self.start


def file_tag(uri: str) -> str:
    stem = posixpath.splitext(posixpath.basename(split_protocol(uri)[1]))[0]
    stem = re.sub(r"[^A-Za-z0-9._]+", "_", stem).strip("._")[:48] or "captions"
    return f"{stem}-{hashlib.sha1(uri.encode('utf-8')).hexdigest()[:8]}"


def shard_key(tag: str, start: int, end: int, width: int) -> str:
    return f"{tag}-{start:0{width}d}-{end:0{width}d}"


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
            s["key"], entry["file_tag"], entry["uri"], entry["format"], s["start"], s["end"], s.get("offset"), entry["seq"], entry["shard_rows"]
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
            offset = scan.shard_offsets[i] if scan.shard_offsets is not None else None
            shards.append({"key": shard_key(tag, start, end, width), "start": start, "end": end, "offset": offset})
        seq = max((e["seq"] for e in self.entries()), default=0) + 1
        entry = {
            "seq": seq,
            "uri": uri,
            "file_tag": tag,
            "format": scan.format,
            "n_records": scan.n_records,
            "shard_rows": shard_rows,
            "fingerprint": fp,
            "columns": scan.columns,
            "registered_at": datetime.now(timezone.utc).isoformat(),
            "shards": shards,
        }
        self.storage.write_json(posixpath.join(REGISTRY_PREFIX, f"{seq:06d}--{tag}.json"), entry)
        self._cache.clear()
        return entry, [self._shard(entry, i) for i in range(len(shards))]
