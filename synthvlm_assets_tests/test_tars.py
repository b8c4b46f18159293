"""The tar module: deterministic bytes, members in order, streamed reads, and webdataset's own reader."""

from __future__ import annotations

import io
import tarfile

import webdataset as wds

from synthvlm_assets import tars

SAMPLES = [
    ("a0", {"json": b'{"caption": "a cat"}', "jpg": b"\xff\xd8" + b"x" * 700}),
    ("b1", {"json": b'{"flag": "black"}'}),  # a sample may have a single member
    ("c2", {"jpg": b"\xff\xd8" + b"y" * 1300, "txt": "un chat é".encode()}),
]


def _tar(samples) -> bytes:
    buf = io.BytesIO()
    tars.write_samples(buf, samples)
    return buf.getvalue()


def test_same_samples_give_the_same_bytes_whenever_written(monkeypatch):
    first = _tar(SAMPLES)
    monkeypatch.setattr("webdataset.writer.time.time", lambda: 2_000_000_000.0)  # a different "now"
    assert _tar(SAMPLES) == first
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["a0.json", "a0.jpg", "b1.json", "c2.jpg", "c2.txt"]  # the order given
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def test_samples_read_back_and_webdataset_reads_them(tmp_path):
    data = _tar(SAMPLES)
    assert list(tars.read_samples(io.BytesIO(data))) == SAMPLES
    path = tmp_path / "shard-00000.tar"
    path.write_bytes(data)
    dataset = wds.WebDataset(str(path), shardshuffle=False)
    assert [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in dataset] == SAMPLES


class CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        out = super().read(size)
        self.bytes_read += len(out)
        return out


def test_reads_stream_one_sample_at_a_time():
    big = [(f"k{i:04d}", {"jpg": bytes([i % 256]) * 65_536}) for i in range(200)]  # 13 MB
    f = CountingReader(_tar(big))
    samples = tars.read_samples(f)
    assert next(samples) == big[0]
    assert f.bytes_read < 200_000, f.bytes_read  # the first sample, not the tar
    samples.close()
