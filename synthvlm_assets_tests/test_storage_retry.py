"""Retries of transient storage errors: injected into real filesystems (a local folder and SeaweedFS)."""

from __future__ import annotations

import errno

import pyarrow as pa
import pytest
from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
from s3fs.errors import translate_boto_error

from synthvlm_assets import storage as storage_module
from synthvlm_assets.storage import StorageError, StorageRetry, StorageRoot, is_transient

FAST = StorageRetry(attempts=4, initial_delay=0.01, max_delay=0.02)


def client_error(code: str, status: int, operation: str = "PutObject") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": f"server says {code}"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


def as_s3fs_raises(code: str, status: int) -> BaseException:
    """What s3fs raises for an S3 error response (it translates botocore's ClientError)."""
    return translate_boto_error(client_error(code, status))


TRANSIENT = {
    "SlowDown 503": lambda: as_s3fs_raises("SlowDown", 503),
    "ServiceUnavailable 503": lambda: as_s3fs_raises("ServiceUnavailable", 503),
    "InternalError 500": lambda: as_s3fs_raises("InternalError", 500),
    "RequestTimeout 400": lambda: as_s3fs_raises("RequestTimeout", 400),
    "429 throttled": lambda: as_s3fs_raises("TooManyRequests", 429),
    "unknown code, 502": lambda: as_s3fs_raises("BadGateway", 502),
    "endpoint unreachable": lambda: EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
    "connect timeout": lambda: ConnectTimeoutError(endpoint_url="http://127.0.0.1:9"),
    "read timeout": lambda: ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
    "connection reset": lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "timeout": lambda: TimeoutError("timed out"),
}
PERMANENT = {
    "AccessDenied 403": lambda: as_s3fs_raises("AccessDenied", 403),
    "InvalidArgument 400": lambda: as_s3fs_raises("InvalidArgument", 400),
    "NoSuchBucket 404": lambda: as_s3fs_raises("NoSuchBucket", 404),
    "unknown code, 400": lambda: as_s3fs_raises("SomethingElse", 400),
    "disk full": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "a bug": lambda: ValueError("bad value"),
}


class FlakyFS:
    """A real fsspec filesystem whose chosen methods raise `error()` on their first `failures` calls."""

    def __init__(self, fs, methods: set[str], error, failures: int) -> None:
        self._fs, self._methods, self._error, self._left = fs, methods, error, failures
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        target = getattr(self._fs, name)
        if name not in self._methods:
            return target

        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            if self._left > 0:
                self._left -= 1
                raise self._error()
            return target(*args, **kwargs)

        return call


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> StorageRoot:
    if request.param == "local":
        return StorageRoot(str(tmp_path / "root"), retry=FAST)
    server = request.getfixturevalue("seaweedfs")
    return StorageRoot(f"s3://{server.make_bucket()}/prefix", s3_endpoint_url=server.endpoint, retry=FAST)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    waited: list[float] = []
    monkeypatch.setattr(storage_module.time, "sleep", waited.append)
    return waited


@pytest.mark.parametrize("error", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_classified_transient(error):
    assert is_transient(error())


@pytest.mark.parametrize("error", PERMANENT.values(), ids=PERMANENT.keys())
def test_classified_permanent(error):
    assert not is_transient(error())


def test_not_found_is_never_transient():
    assert not is_transient(as_s3fs_raises("NoSuchKey", 404)) and isinstance(
        as_s3fs_raises("NoSuchKey", 404), FileNotFoundError
    )


@pytest.mark.parametrize(
    "error",
    [TRANSIENT["SlowDown 503"], TRANSIENT["endpoint unreachable"], TRANSIENT["connection reset"]],
    ids=["SlowDown", "unreachable", "reset"],
)
def test_write_retried_then_succeeds(root, sleeps, error):
    flaky = root.fs = FlakyFS(root.fs, {"pipe_file"}, error, failures=2)
    root.write_json("a/b.json", {"x": 1})
    assert flaky.calls["pipe_file"] == 3 and len(sleeps) == 2
    assert sleeps[1] > sleeps[0]  # backoff
    assert root.read_json("a/b.json") == {"x": 1}


def test_reads_lists_and_partitions_retried(root, sleeps):
    t = pa.table({"caption_id": ["a", "b"], "caption": ["x", "y"]})
    root.publish_partition("asset/s1", {"kept": t}, {"shard": "s1"})
    flaky = root.fs = FlakyFS(root.fs, {"open", "cat_file", "ls", "exists"}, TRANSIENT["SlowDown 503"], failures=3)
    assert root.read_partition("asset/s1", "kept").equals(t)  # cat_file (manifest) and open (Parquet)
    assert root.list("asset") == ["asset/s1"] and root.exists("asset/s1/_manifest.json")
    assert sum(flaky.calls.values()) == 3 + 4 and len(sleeps) == 3


def test_gives_up_after_bounded_attempts_naming_the_object(root, sleeps):
    flaky = root.fs = FlakyFS(root.fs, {"pipe_file"}, TRANSIENT["SlowDown 503"], failures=10**6)
    with pytest.raises(StorageError) as info:
        root.write_json("a/b.json", {"x": 1})
    message = str(info.value)
    assert message.startswith(f"cannot write {root.uri('a/b.json')}: still failing after 4 attempts")
    assert "server says SlowDown" in message
    assert flaky.calls["pipe_file"] == 4 and len(sleeps) == 3
    assert not root.exists("a/b.json")


@pytest.mark.parametrize(
    "error",
    [PERMANENT["AccessDenied 403"], PERMANENT["InvalidArgument 400"], PERMANENT["disk full"]],
    ids=["AccessDenied", "InvalidArgument", "disk-full"],
)
def test_permanent_errors_fail_at_once(root, sleeps, error):
    flaky = root.fs = FlakyFS(root.fs, {"pipe_file"}, error, failures=1)
    with pytest.raises(StorageError, match=f"^cannot write {root.uri('k.json')}: "):
        root.write_json("k.json", {})
    assert flaky.calls["pipe_file"] == 1 and sleeps == []


def test_missing_object_not_retried(root, sleeps):
    flaky = root.fs = FlakyFS(root.fs, {"cat_file"}, lambda: None, failures=0)
    with pytest.raises(StorageError, match=f"^not found: {root.uri('nope.json')}$"):
        root.read_json("nope.json")
    assert flaky.calls["cat_file"] == 1 and sleeps == []
    assert root.manifest("never/published") is None


def test_backoff_doubles_up_to_the_cap_with_jitter():
    retry = StorageRetry(attempts=7, initial_delay=0.5, max_delay=8.0, jitter=0.2)
    for _ in range(20):
        delays = list(retry.delays())
        assert len(delays) == 6
        for d, base in zip(delays, [0.5, 1, 2, 4, 8, 8]):
            assert base * 0.8 <= d <= base * 1.2
    assert list(StorageRetry(attempts=1).delays()) == []
    with pytest.raises(ValueError, match="invalid storage retry settings"):
        StorageRetry(attempts=0)


def test_unreachable_store_gives_up_naming_the_object():
    root = StorageRoot(
        "s3://nowhere/prefix", s3_endpoint_url="http://127.0.0.1:9", retry=StorageRetry(attempts=2, initial_delay=0.01)
    )
    with pytest.raises(
        StorageError,
        match=r"cannot write s3://nowhere/prefix/x\.json: still failing after 2 attempts .*EndpointConnectionError",
    ):
        root.write_json("x.json", {})


def test_per_shard_assets_have_a_backoff_retry_policy():
    from dagster import Backoff

    from synthvlm_assets.defs.captions import caption_curation
    from synthvlm_assets.defs.judge import judged_captions, pair_filtered_captions
    from synthvlm_assets.defs.selection import image_scores
    from synthvlm_assets.defs.synthesis import sdxl_images

    for asset_def in (caption_curation, pair_filtered_captions, judged_captions, sdxl_images, image_scores):
        policy = asset_def.op.retry_policy
        assert policy is not None, asset_def.key
        assert policy.max_retries >= 1 and policy.backoff == Backoff.EXPONENTIAL and policy.delay > 0


# -- one deadline per operation (issue 17) ---------------------------------------------------------
@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers (reads and discards what it is sent)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    stop = threading.Event()
    conns = []

    def serve():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.settimeout(0.1)
            conns.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for c in conns:
        c.close()
    server.close()


@pytest.mark.parametrize("operation", ["write", "read", "list"])
def test_a_silent_store_fails_within_the_deadline_naming_the_object(silent_server, operation):
    import time

    retry = StorageRetry(attempts=50, initial_delay=0.01, max_delay=0.05, deadline=3.0)
    options = {"key": "k", "secret": "s"}
    root = StorageRoot("s3://bucket/prefix", s3_endpoint_url=silent_server, storage_options=options, retry=retry)
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        {"write": lambda: root.write_json("a/b.json", {}), "read": lambda: root.read_json("a/b.json"),
         "list": lambda: root.list("a")}[operation]()  # fmt: skip
    elapsed = time.monotonic() - started
    key = "a" if operation == "list" else "a/b.json"
    assert str(info.value).startswith(f"cannot {operation} s3://bucket/prefix/{key}: ran out of time")
    assert "deadline of a storage operation is 3 s" in str(info.value)
    assert elapsed < 20  # generous: the deadline is 3 s (before: 60 s read timeout x 3 x 5 x 7 attempts)


def test_retries_stop_at_the_deadline(tmp_path):
    import time

    root = StorageRoot(str(tmp_path / "root"), retry=StorageRetry(attempts=10**6, initial_delay=0.01, max_delay=0.01,
                                                                  deadline=1.0))  # fmt: skip

    def slow_failure():
        time.sleep(0.2)
        return TRANSIENT["SlowDown 503"]()

    flaky = root.fs = FlakyFS(root.fs, {"pipe_file"}, slow_failure, failures=10**6)
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"ran out of time: still failing after \d+ attempts .* is 1 s\)"):
        root.write_json("a.json", {})
    assert time.monotonic() - started < 10 and 2 <= flaky.calls["pipe_file"] <= 10


def test_one_retry_layer_and_short_client_timeouts():
    from synthvlm_assets.storage import filesystem_options

    _, options = filesystem_options("s3://b/p")
    assert options["config_kwargs"]["retries"] == {"total_max_attempts": 1, "mode": "standard"}  # so does botocore
    root = StorageRoot("s3://b/p", s3_endpoint_url="http://127.0.0.1:9", retry=StorageRetry(deadline=8))
    config = root.fsspec_options()["config_kwargs"]
    assert config["connect_timeout"] + config["read_timeout"] <= 8 / 2
    assert root.fs.retries == 1  # s3fs makes one attempt
