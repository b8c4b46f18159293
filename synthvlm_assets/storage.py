"""One storage root for every artifact (a local folder or `s3://bucket/prefix`), through fsspec.

Writes are atomic: a single object becomes visible whole (local files go to a temporary name and are
renamed; an S3 PUT is atomic by itself). A partition of several files is published with a manifest
written last, and removed first on rewrite, so a crashed run never leaves something a reader could
take for a finished partition.

Transient errors of an object store (throttling, timeouts, dropped or refused connections, 5xx) are
retried with exponential backoff, a bounded number of times; every operation is idempotent (a PUT of
the same bytes, a delete, a read), so a retry cannot duplicate anything. Other errors (not found,
access denied, any other 4xx) fail at once. Either way the error names the object.

One deadline bounds each operation, retries included (`StorageRetry.deadline`, 120 s by default): the
client's connect and read timeouts are set from it, so an attempt on a store that accepts connections
and never answers ends in seconds, and no attempt or wait starts that could outlast the deadline; the
error then says the operation ran out of time. Ours is the only retry layer: botocore's and s3fs's own
retries are off. (The read timeout bounds silence, not transfer time: a large upload that keeps moving
is never cut.)
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the object."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object is not there (a StorageError, and a FileNotFoundError for callers that ask for that)."""


# S3 error codes and HTTP statuses that say "try again" (AWS's throttling and server-side errors;
# SeaweedFS and MinIO answer with the same codes).
TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestLimitExceeded",
     "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException", "ServiceUnavailable", "InternalError",
     "500", "502", "503", "504"}
)  # fmt: skip
# What s3fs turns those codes into (it maps SlowDown/503 to EBUSY and InternalError/500 to EREMOTEIO),
# and what a dropped connection gives.
TRANSIENT_ERRNOS = frozenset(
    {errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
     errno.ECONNABORTED, errno.EPIPE, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH}
)  # fmt: skip
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _client_error_is_transient(exc: BaseException) -> bool | None:
    """botocore's ClientError: by S3 error code and HTTP status (429, 5xx); None for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    code = str(response["Error"].get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return code in TRANSIENT_S3_CODES or status == 429 or status >= 500


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: throttling, a timeout, a lost or refused connection,
    a 5xx. Not found, access denied and other 4xx are not. Looks through the chain of causes, since
    s3fs wraps botocore's errors in OSErrors."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, _PERMANENT):
            return False
        if isinstance(e, (TimeoutError, ConnectionError, asyncio.TimeoutError)):  # builtins; FSTimeoutError too
            return True
        verdict = _client_error_is_transient(e)
        if verdict is not None:
            return verdict
        module = type(e).__module__ or ""
        if module.startswith("botocore") and any(
            c.__name__ in ("ConnectionError", "HTTPClientError") for c in type(e).__mro__
        ):
            return True  # EndpointConnectionError, Connect/ReadTimeoutError, ConnectionClosedError, ...
        if module.startswith("aiohttp") and any(
            c.__name__ in ("ClientConnectionError", "ClientPayloadError", "ServerTimeoutError")
            for c in type(e).__mro__
        ):
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False


@dataclass(frozen=True)
class StorageRetry:
    """How often and how patiently transient storage errors are retried (per operation).

    The defaults wait 0.5, 1, 2, 4, 8, 8 s between 7 attempts (~24 s, plus jitter): enough for an
    object store to restart or a throttling burst to pass, short enough that a store that is really
    gone fails the step soon (Dagster's per-asset retry policy then retries the whole step later)."""

    attempts: int = 7
    initial_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.2  # +- this fraction of each delay, so that many workers do not retry in step
    deadline: float = 120.0  # seconds for a whole operation, every attempt and wait included

    def __post_init__(self) -> None:
        if (
            self.attempts < 1
            or self.initial_delay < 0
            or self.max_delay < self.initial_delay
            or not 0 <= self.jitter < 1
            or not self.deadline > 0
        ):
            raise ValueError(f"invalid storage retry settings: {self}")

    def delays(self) -> Iterator[float]:
        """The wait before each retry (attempts - 1 of them)."""
        for i in range(self.attempts - 1):
            base = min(self.max_delay, self.initial_delay * 2**i)
            yield base * (1 + random.uniform(-self.jitter, self.jitter))


def s3_client_config(deadline: float = 120.0) -> dict[str, Any]:
    """botocore settings under a storage deadline: one attempt per call (our retry loop is the only one)
    and timeouts that let several attempts fit in the deadline: the read timeout is the longest silence
    of the server within a request (a transfer that keeps moving is never cut)."""
    return {
        "connect_timeout": min(5.0, deadline / 8),
        "read_timeout": min(30.0, deadline / 4),
        "retries": {"total_max_attempts": 1, "mode": "standard"},
    }


# The deadline of the storage operation running in this thread (a StorageRoot itself stays picklable).
_RUNNING = threading.local()
# A transfer of a known size gets this much more time than the deadline: a second per MiB.
TRANSFER_ALLOWANCE_BYTES_PER_S = 1 << 20


def attempt_bound(config: dict[str, Any]) -> float:
    """The longest an attempt can wait on a server that accepts connections and never answers."""
    return float(config.get("connect_timeout", 60)) + float(config.get("read_timeout", 60))


def split_protocol(uri: str) -> tuple[str, str]:
    if "://" in uri:
        protocol, path = uri.split("://", 1)
        return protocol, path
    return "file", uri


def filesystem_options(
    uri: str, s3_endpoint_url: str | None = None, **storage_options: Any
) -> tuple[str, dict[str, Any]]:
    """(fsspec protocol, options) for a URI; S3 gets the endpoint of S3-compatible servers when given."""
    protocol, _ = split_protocol(uri)
    if protocol in ("s3", "s3a"):
        options = dict(storage_options)
        if s3_endpoint_url:
            options.setdefault("endpoint_url", s3_endpoint_url)
        # Several processes write the same root: never answer from a stale listing cache.
        options.setdefault("use_listings_cache", False)
        # Fail in seconds, not minutes, when the store is unreachable or silent; one retry layer (ours:
        # StorageRoot.retrying, bounded by its deadline), so botocore makes a single attempt per call.
        options.setdefault("config_kwargs", s3_client_config())
        return "s3", options
    return protocol, dict(storage_options)


def filesystem_for(uri: str, s3_endpoint_url: str | None = None, **storage_options: Any) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for a URI."""
    protocol, options = filesystem_options(uri, s3_endpoint_url, **storage_options)
    fs = fsspec.filesystem(protocol, **options)
    if protocol == "s3":
        fs.retries = 1  # s3fs's own retry loop (5 attempts by default; a class setting) off as well
    return fs


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
    retry: StorageRetry = field(default_factory=StorageRetry)

    def __post_init__(self) -> None:
        self.root_uri = local_or_absolute(self.root_uri).rstrip("/")
        self.protocol, self._root_path = split_protocol(self.root_uri)
        self.is_local = self.protocol == "file"
        # On an object store, every attempt is bounded by the client's timeouts, set from the deadline.
        self._attempt_bound = 0.0
        if not self.is_local:
            config = self.storage_options.get("config_kwargs") or s3_client_config(self.retry.deadline)
            self.storage_options = {**self.storage_options, "config_kwargs": config}
            self._attempt_bound = attempt_bound(config)
        self.fs = filesystem_for(self.root_uri, self.s3_endpoint_url, **self.storage_options)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A call of the filesystem, cut off (and cancelled) at the running operation's deadline on an
        object store: the client's timeouts do not cover every wait (aiohttp waits for an answer to
        `Expect: 100-continue` with no timeout at all)."""
        deadline = getattr(_RUNNING, "deadline", None)
        if not self.is_local and deadline is not None:
            kwargs["timeout"] = max(0.01, deadline - time.monotonic())
        return getattr(self.fs, method)(*args, **kwargs)

    # -- addressing -------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """Filesystem path of a key (what fsspec calls take)."""
        return posixpath.join(self._root_path, key) if key else self._root_path

    def uri(self, key: str = "") -> str:
        path = self.path(key)
        return path if self.is_local else f"{self.protocol}://{path}"

    def fsspec_options(self) -> dict[str, Any]:
        """The options this root opens its filesystem with (for libraries that open their own, e.g.
        torch.distributed.checkpoint's fsspec reader and writer)."""
        return filesystem_options(self.root_uri, self.s3_endpoint_url, **self.storage_options)[1]

    def _fail(self, action: str, key: str, exc: BaseException) -> StorageError:
        return StorageError(f"cannot {action} {self.uri(key)}: {type(exc).__name__}: {exc}")

    def retrying(self, action: str, key: str, operation: Callable[[], T], nbytes: int = 0) -> T:
        """Run an idempotent operation on one object, retrying transient errors with backoff.

        FileNotFoundError passes through unchanged (callers decide what absence means); any other
        error becomes a StorageError naming the object, after the retries when it was transient. The
        whole operation, retries included, ends within `retry.deadline` seconds when the store is silent:
        no attempt starts that could outlast it (an attempt on an object store waits at most the client's
        connect and read timeouts, which the deadline sets, and each call is cut off at the deadline) and no
        retry waits past it. A transfer of `nbytes` gets a second more per MiB."""
        started = time.monotonic()
        deadline = started + self.retry.deadline + nbytes / TRANSFER_ALLOWANCE_BYTES_PER_S
        delays = self.retry.delays()
        attempt = 0
        while True:
            attempt += 1
            outer, _RUNNING.deadline = getattr(_RUNNING, "deadline", None), deadline
            try:
                return operation()
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - any backend error becomes one clear error
                if not is_transient(exc):
                    raise self._fail(action, key, exc) from exc
                delay = next(delays, None)
                waited = time.monotonic() - started
                if delay is None:
                    raise StorageError(
                        f"cannot {action} {self.uri(key)}: still failing after {attempt} attempts over {waited:.1f} s"
                        f" (transient errors, retried with backoff): {type(exc).__name__}: {exc}"
                    ) from exc
                if time.monotonic() + delay + self._attempt_bound > deadline:
                    raise StorageError(
                        f"cannot {action} {self.uri(key)}: ran out of time: still failing after {attempt} attempts"
                        f" over {waited:.1f} s (the deadline of a storage operation is {self.retry.deadline:g} s):"
                        f" {type(exc).__name__}: {exc}"
                    ) from exc
                log.warning("%s %s: %s: %s; retry %d/%d in %.1f s", action, self.uri(key), type(exc).__name__, exc,
                            attempt, self.retry.attempts - 1, delay)  # fmt: skip
                time.sleep(delay)
            finally:
                _RUNNING.deadline = outer

    # -- single objects ---------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.retrying("check", key, lambda: bool(self._call("exists", self.path(key))))

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

        def write() -> None:
            if self.is_local:
                self._publish_local(path, lambda tmp: self.fs.pipe_file(tmp, data))
            else:
                self._call("pipe_file", path, data)  # a PUT is atomic: readers see all or nothing

        self._write("write", key, write, len(data))

    def _write(self, action: str, key: str, write: Callable[[], None], nbytes: int = 0) -> None:
        try:
            self.retrying(action, key, write, nbytes)
        except FileNotFoundError as exc:  # e.g. the bucket does not exist
            raise self._fail(action, key, exc) from exc

    def put_file(self, local_path: str, key: str) -> None:
        """Atomically create or replace one object from a local file (large outputs: not in memory)."""
        path = self.path(key)

        def write() -> None:
            if self.is_local:
                self._publish_local(path, lambda tmp: self.fs.put_file(local_path, tmp))
            else:
                self._call("put_file", local_path, path)  # multipart upload: visible only once complete

        self._write("write", key, write, os.path.getsize(local_path))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.retrying("read", key, lambda: self._call("cat_file", self.path(key)))
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"not found: {self.uri(key)}") from exc

    def delete(self, key: str) -> None:
        def delete() -> None:
            try:
                self._call("rm", self.path(key), recursive=True)
            except FileNotFoundError:
                pass  # already gone (also after a retried delete that had succeeded)

        if self.exists(key):
            self._write("delete", key, delete)

    def list(self, prefix: str) -> list[str]:
        """Keys directly under a prefix (files and folders), sorted; [] when the prefix is absent."""
        try:
            entries = self.retrying(
                "list", prefix, lambda: self._call("ls", self.path(prefix), detail=False, refresh=True)
            )
        except FileNotFoundError:
            return []
        base = self.path(prefix).rstrip("/") + "/"
        return sorted(
            posixpath.join(prefix, e[len(base) :] if e.startswith(base) else posixpath.basename(e)) for e in entries
        )

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
        def read() -> pa.Table:
            with self.fs.open(self.path(key), "rb") as f:
                return pq.read_table(f, columns=columns)

        try:
            return self.retrying("read", key, read)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"not found: {self.uri(key)}") from exc

    # -- partitions -------------------------------------------------------------------------
    def publish_partition(self, prefix: str, tables: dict[str, pa.Table], info: dict[str, Any]) -> dict[str, Any]:
        """Write `name.parquet` for each table under `prefix`, then the manifest that marks it complete."""
        self.delete(posixpath.join(prefix, MANIFEST))  # incomplete from here until the new manifest lands
        files = {}
        for name, table in tables.items():
            key = posixpath.join(prefix, f"{name}.parquet")
            data = self.write_parquet(key, table)
            files[name] = {
                "key": key,
                "rows": table.num_rows,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        manifest = {"files": files, "published_at": datetime.now(timezone.utc).isoformat(), **info}
        self.write_json(posixpath.join(prefix, MANIFEST), manifest)
        return manifest

    def manifest(self, prefix: str) -> dict[str, Any] | None:
        """The partition's manifest, or None when it was never published completely."""
        key = posixpath.join(prefix, MANIFEST)
        try:
            return self.read_json(key)
        except ObjectNotFound:
            return None

    def read_partition(self, prefix: str, name: str, columns: list[str] | None = None) -> pa.Table:
        manifest = self.manifest(prefix)
        if manifest is None:
            raise StorageError(f"partition {self.uri(prefix)} is not materialized (no {MANIFEST})")
        if name not in manifest["files"]:
            raise StorageError(f"partition {self.uri(prefix)} has no table {name!r}")
        return self.read_parquet(manifest["files"][name]["key"], columns=columns)
