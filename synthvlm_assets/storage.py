"""One storage root for every artifact (a local folder or `s3://bucket/prefix`), through fsspec.

Writes are atomic: a single object becomes visible whole (local files go to a temporary name and are
renamed; an S3 PUT is atomic by itself). A partition of several files is published with a manifest
written last, and removed first on rewrite, so a crashed run never leaves something a reader could
take for a finished partition.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"


class StorageError(RuntimeError):
    """A storage operation failed; the message names the object."""


def split_protocol(uri: str) -> tuple[str, str]:
    if "://" in uri:
        protocol, path = uri.split("://", 1)
        return protocol, path
    return "file", uri


def filesystem_for(uri: str, s3_endpoint_url: str | None = None, **storage_options: Any) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for a URI; S3 gets the endpoint of S3-compatible servers when given."""
    protocol, _ = split_protocol(uri)
    if protocol in ("s3", "s3a"):
        options = dict(storage_options)
        if s3_endpoint_url:
            options.setdefault("endpoint_url", s3_endpoint_url)
        # Several processes write the same root: never answer from a stale listing cache.
        options.setdefault("use_listings_cache", False)
        # Fail in seconds, not minutes, when the store is unreachable.
        options.setdefault("config_kwargs", {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}})
        return fsspec.filesystem("s3", **options)
    return fsspec.filesystem(protocol, **storage_options)


def local_or_absolute(uri: str) -> str:
    protocol, path = split_protocol(uri)
    if protocol == "file":
        import os

        return os.path.abspath(os.path.expanduser(path))
    return uri


@dataclass
class StorageRoot:
    """The storage root. Relative keys use `/`; `uri()` gives what a person or DuckDB can open."""

    root_uri: str
    s3_endpoint_url: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root_uri = local_or_absolute(self.root_uri).rstrip("/")
        self.protocol, self._root_path = split_protocol(self.root_uri)
        self.fs = filesystem_for(self.root_uri, self.s3_endpoint_url, **self.storage_options)
        self.is_local = self.protocol == "file"

    # -- addressing -------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """Filesystem path of a key (what fsspec calls take)."""
        return posixpath.join(self._root_path, key) if key else self._root_path

    def uri(self, key: str = "") -> str:
        path = self.path(key)
        return path if self.is_local else f"{self.protocol}://{path}"

    def _fail(self, action: str, key: str, exc: BaseException) -> StorageError:
        return StorageError(f"cannot {action} {self.uri(key)}: {type(exc).__name__}: {exc}")

    # -- single objects ---------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        try:
            return bool(self.fs.exists(self.path(key)))
        except Exception as exc:  # noqa: BLE001 - any backend error becomes one clear error
            raise self._fail("check", key, exc) from exc

    def _publish_local(self, path: str, write) -> None:
        """Local files: write beside the target under a temporary name, then rename (atomic)."""
        parent = posixpath.dirname(path)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
        write(tmp)
        self.fs.mv(tmp, path)  # os.replace: atomic on one filesystem

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically create or replace one object."""
        path = self.path(key)
        try:
            if self.is_local:
                self._publish_local(path, lambda tmp: self.fs.pipe_file(tmp, data))
            else:
                self.fs.pipe_file(path, data)  # a PUT is atomic: readers see all or nothing
        except Exception as exc:  # noqa: BLE001
            raise self._fail("write", key, exc) from exc

    def put_file(self, local_path: str, key: str) -> None:
        """Atomically create or replace one object from a local file (large outputs: not in memory)."""
        path = self.path(key)
        try:
            if self.is_local:
                self._publish_local(path, lambda tmp: self.fs.put_file(local_path, tmp))
            else:
                self.fs.put_file(local_path, path)  # multipart upload: visible only once complete
        except Exception as exc:  # noqa: BLE001
            raise self._fail("write", key, exc) from exc

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(key))
        except FileNotFoundError as exc:
            raise StorageError(f"not found: {self.uri(key)}") from exc
        except Exception as exc:  # noqa: BLE001
            raise self._fail("read", key, exc) from exc

    def delete(self, key: str) -> None:
        try:
            if self.fs.exists(self.path(key)):
                self.fs.rm(self.path(key), recursive=True)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("delete", key, exc) from exc

    def list(self, prefix: str) -> list[str]:
        """Keys directly under a prefix (files and folders), sorted; [] when the prefix is absent."""
        try:
            entries = self.fs.ls(self.path(prefix), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise self._fail("list", prefix, exc) from exc
        base = self.path(prefix).rstrip("/") + "/"
        return sorted(posixpath.join(prefix, e[len(base) :] if e.startswith(base) else posixpath.basename(e)) for e in entries)

    def write_json(self, key: str, doc: Any) -> None:
        self.write_bytes(key, json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8"))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_parquet(self, key: str, table: pa.Table) -> bytes:
        buf = io.BytesIO()
        # Fixed writer settings: the same table always gives the same bytes (reproducible outputs).
        pq.write_table(table, buf, compression="zstd", write_statistics=True, store_schema=True)
        data = buf.getvalue()
        self.write_bytes(key, data)
        return data

    def read_parquet(self, key: str, columns: list[str] | None = None) -> pa.Table:
        try:
            with self.fs.open(self.path(key), "rb") as f:
                return pq.read_table(f, columns=columns)
        except FileNotFoundError as exc:
            raise StorageError(f"not found: {self.uri(key)}") from exc
        except Exception as exc:  # noqa: BLE001
            raise self._fail("read", key, exc) from exc

    # -- partitions -------------------------------------------------------------------------
    def publish_partition(self, prefix: str, tables: dict[str, pa.Table], info: dict[str, Any]) -> dict[str, Any]:
        """Write `name.parquet` for each table under `prefix`, then the manifest that marks it complete."""
        self.delete(posixpath.join(prefix, MANIFEST))  # incomplete from here until the new manifest lands
        files = {}
        for name, table in tables.items():
            key = posixpath.join(prefix, f"{name}.parquet")
            data = self.write_parquet(key, table)
            files[name] = {"key": key, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {"files": files, "published_at": datetime.now(timezone.utc).isoformat(), **info}
        self.write_json(posixpath.join(prefix, MANIFEST), manifest)
        return manifest

    def manifest(self, prefix: str) -> dict[str, Any] | None:
        """The partition's manifest, or None when it was never published completely."""
        key = posixpath.join(prefix, MANIFEST)
        try:
            return self.read_json(key)
        except StorageError as exc:
            if str(exc).startswith("not found"):
                return None
            raise

    def read_partition(self, prefix: str, name: str, columns: list[str] | None = None) -> pa.Table:
        manifest = self.manifest(prefix)
        if manifest is None:
            raise StorageError(f"partition {self.uri(prefix)} is not materialized (no {MANIFEST})")
        if name not in manifest["files"]:
            raise StorageError(f"partition {self.uri(prefix)} has no table {name!r}")
        return self.read_parquet(manifest["files"][name]["key"], columns=columns)
