"""Caption sources: every format, hostile inputs, streaming reads, and the shard registry."""

from __future__ import annotations

import csv
import io
import json
import os
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthvlm_assets.captions.sources import CaptionFields, SourceFormatError, iter_records, read_shard, scan_source
from synthvlm_assets.shards import ShardRegistry, ShardRegistryError
from synthvlm_assets.storage import StorageRoot

from .conftest import LLAVA_EXAMPLE

FS = fsspec.filesystem("file")
RECORDS = [
    {"id": f"r{i}", "caption": f"A photo of dog number {i} on a beach.", "image_url": f"http://x/{i}.jpg"}
    for i in range(7)
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path, records):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "caption", "image_url"])
        w.writeheader()
        w.writerows(records)
    return path


def write_parquet(path, records, row_group_size=2):
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def registry(tmp_path) -> ShardRegistry:
    return ShardRegistry(StorageRoot(str(tmp_path / "root")))


def load_all(reg: ShardRegistry, uri: str, shard_rows: int = 3, fields: CaptionFields = CaptionFields()):
    _, shards = reg.register_file(uri, shard_rows)
    tables = [read_shard(s, fields, FS) for s in shards]
    return shards, pa.concat_tables([t[0] for t in tables]), pa.concat_tables([t[1] for t in tables])


@pytest.mark.parametrize("writer", [write_jsonl, write_csv, write_parquet, write_json])
def test_each_record_format_loads_every_row_once(tmp_path, writer):
    ext = {"write_jsonl": "jsonl", "write_csv": "csv", "write_parquet": "parquet", "write_json": "json"}[
        writer.__name__
    ]
    path = writer(tmp_path / f"pool.{ext}", RECORDS)
    shards, captions, malformed = load_all(registry(tmp_path), str(path))
    assert [(s.start, s.end) for s in shards] == [(0, 3), (3, 6), (6, 7)]
    assert captions.column("caption").to_pylist() == [r["caption"] for r in RECORDS]
    assert captions.column("source_id").to_pylist() == [r["id"] for r in RECORDS]
    assert captions.column("image_ref").to_pylist() == [r["image_url"] for r in RECORDS]
    assert captions.column("source_row").to_pylist() == list(range(7))
    assert len(set(captions.column("caption_id").to_pylist())) == 7
    assert malformed.num_rows == 0


def test_coco_captions_file(tmp_path):
    coco = {
        "info": {},
        "images": [{"id": 1, "file_name": "1.jpg", "coco_url": "http://coco/1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A cat sleeping on a red sofa."},
            {"image_id": 2, "id": 11, "caption": "Two people riding horses on a beach."},
            {"image_id": 1, "id": 12, "caption": 5},
        ],
    }
    path = write_json(tmp_path / "captions_val.json", coco)
    shards, captions, malformed = load_all(registry(tmp_path), str(path), shard_rows=2)
    assert shards[0].format == "coco"
    assert captions.column("source_id").to_pylist() == ["10", "11"]
    assert captions.column("image_ref").to_pylist() == ["http://coco/1.jpg", "2.jpg"]
    assert set(captions.column("source").to_pylist()) == {"coco"}
    assert malformed.to_pylist()[0]["reason"] == "caption_not_string"


def test_llava_conversation_json(tmp_path):
    records = (
        json.loads(LLAVA_EXAMPLE.read_text())
        if LLAVA_EXAMPLE.exists()
        else [
            {
                "id": "0",
                "image": "a.jpg",
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red bus."}],
            }
        ]
    )
    path = write_json(tmp_path / "llava.json", records)
    _, captions, malformed = load_all(registry(tmp_path), str(path))
    gpt = [next(t["value"] for t in r["conversations"] if t["from"] == "gpt") for r in records]
    assert captions.column("caption").to_pylist() == gpt
    assert captions.column("image_ref").to_pylist() == [r["image"] for r in records]
    assert set(captions.column("source").to_pylist()) == {"llava"}
    assert malformed.num_rows == 0


def test_malformed_rows_are_kept_with_their_reason(tmp_path):
    lines = [
        json.dumps({"id": 1, "caption": "A good caption of a dog."}),
        "{not json",
        json.dumps({"id": 3}),
        json.dumps({"id": 4, "caption": None}),
        json.dumps({"id": 5, "caption": ["a", "list"]}),
        json.dumps([1, 2]),
        json.dumps({"id": 7, "caption": "x" * 30_000}),
        json.dumps({"id": 8, "caption": "lone surrogate \ud800 here"}),
        json.dumps({"id": 9, "caption": ""}),  # empty is a caption: the filters drop it, with a reason
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": 10, "caption": "bad \xff byte"}\n\n\n')
    _, captions, malformed = load_all(registry(tmp_path), str(path), shard_rows=4)
    assert captions.column("source_id").to_pylist() == ["1", "9"]
    reasons = {r["source_row"]: r["reason"] for r in malformed.to_pylist()}
    assert reasons == {
        1: "invalid_json",
        2: "missing_caption",
        3: "missing_caption",
        4: "caption_not_string",
        5: "record_not_object",
        6: "caption_too_long",
        7: "undecodable_text",
        9: "undecodable_text",
    }
    assert captions.num_rows + malformed.num_rows == 10  # blank lines are not records


def test_csv_hostile_rows(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_bytes(
        b'\xef\xbb\xbfid,caption\n1,"A caption, with a comma\nand a newline"\n2,too,many,fields\n3,"bad \xff '
        b'byte"\n4,Fine caption of a cat.\n'
    )
    _, captions, malformed = load_all(registry(tmp_path), str(path), shard_rows=2)
    assert captions.column("caption").to_pylist() == [
        "A caption, with a comma\nand a newline",
        "Fine caption of a cat.",
    ]
    assert captions.column("source_id").to_pylist() == ["1", "4"]  # BOM stripped from the header
    assert {r["source_row"]: r["reason"] for r in malformed.to_pylist()} == {
        1: "wrong_field_count",
        2: "undecodable_text",
    }


def test_configurable_field_names(tmp_path):
    path = write_jsonl(tmp_path / "pool.jsonl", [{"uid": "a", "text": "A cat on a mat."}])
    fields = CaptionFields(id="uid", caption="text")
    _, captions, _ = load_all(registry(tmp_path), str(path), fields=fields)
    assert captions.to_pylist()[0]["source_id"] == "a"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.json", b'[{"caption": "a"}, {"caption": "b"', "invalid JSON after record 1"),
        ("utf16.jsonl", '{"caption": "a"}\n'.encode("utf-16"), r"UTF-16-LE text .*; caption files must be UTF-8"),
        ("utf16.json", '[{"caption": "a"}]'.encode("utf-16-be"), r"NUL bytes .*; caption files must be UTF-8"),
        ("utf16.csv", "id,caption\n1,a\n".encode("utf-16"), r"UTF-16-LE text .*; caption files must be UTF-8"),
        ("utf32.csv", "id,caption\n1,a\n".encode("utf-32"), r"UTF-32-LE text .*; caption files must be UTF-8"),
        ("latin1.csv", "id,l\u00e9gende\n1,a\n".encode("latin-1"), r"line 1: the CSV header is not UTF-8 .*0xe9"),
        ("object.json", b'{"images": []}', "not a COCO captions file"),
        ("number.json", b"42", "must hold a list of records or a COCO object"),
        ("broken.parquet", b"PAR1 not really", "not a readable Parquet file"),
        ("notes.txt", b"hello", "unknown caption file type"),
        ("empty.csv", b"", "empty CSV file"),
    ],
)
def test_unparseable_files_fail_naming_file_and_position(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SourceFormatError, match=message) as info:
        scan_source(FS, str(path), 10)
    assert str(path) in str(info.value)


def test_registration_is_idempotent_and_ordered(tmp_path):
    reg = registry(tmp_path)
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    b = write_jsonl(tmp_path / "b.jsonl", RECORDS[:2])
    _, first = reg.register_file(str(a), 3)
    assert len(first) == 3 and reg.register_file(str(a), 3)[1] == []
    reg.register_file(str(b), 3)
    keys = [s.key for s in reg.shards()]
    assert keys == [s.key for s in first] + [reg.shards()[-1].key]
    assert keys[0].startswith("a-") and keys[0].endswith("-00000000-00000003")
    assert [s.key for s in reg.earlier_shards(keys[-1])] == keys[:-1]
    assert ShardRegistry(reg.storage).shard(keys[1]).start == 3  # a fresh reader sees the same
    with pytest.raises(ShardRegistryError, match="not registered"):
        reg.shard("nope-00000000-00000001")


def test_a_changed_file_is_reported_not_reread(tmp_path):
    reg = registry(tmp_path)
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    _, shards = reg.register_file(str(path), 3)
    reg.check_unchanged(shards[0])
    time.sleep(0.01)
    write_jsonl(path, RECORDS + RECORDS)
    os.utime(path, (time.time() + 5, time.time() + 5))
    with pytest.raises(ShardRegistryError, match="changed since it was registered"):
        reg.check_unchanged(shards[0])


class CountingFS(fsspec.implementations.local.LocalFileSystem):
    """Counts the bytes read from disk through it (to check that a shard read skips the rest)."""

    cachable = False

    def __init__(self):
        super().__init__()
        self.bytes_read = 0

    def _open(self, path, mode="rb", **kw):
        fs = self

        class CountingRaw(io.FileIO):
            def readinto(self, buffer):
                n = super().readinto(buffer)
                fs.bytes_read += n or 0
                return n

        return io.BufferedReader(CountingRaw(path, "rb"), buffer_size=64 * 1024)


def test_jsonl_shard_read_seeks_instead_of_reading_the_file(tmp_path):
    records = [{"id": i, "caption": f"caption number {i} " + "x" * 100} for i in range(20_000)]
    path = write_jsonl(tmp_path / "big.jsonl", records)
    scan = scan_source(FS, str(path), 1000)
    assert scan.n_records == 20_000 and len(scan.shard_offsets) == 20
    fs = CountingFS()
    rows = list(iter_records(fs, str(path), "jsonl", 15_000, 16_000, scan.shard_offsets[15]))
    assert [r.value["id"] for r in rows] == list(range(15_000, 16_000))
    assert 0 < fs.bytes_read < os.path.getsize(path) / 5


def test_parquet_shard_reads_only_overlapping_row_groups(tmp_path):
    records = [{"id": i, "caption": f"caption {i} " + os.urandom(100).hex()} for i in range(20_000)]  # incompressible
    path = write_parquet(tmp_path / "big.parquet", records, row_group_size=1000)
    fs = CountingFS()
    rows = list(iter_records(fs, str(path), "parquet", 12_500, 13_500))
    assert [r.value["id"] for r in rows] == list(range(12_500, 13_500))
    assert 0 < fs.bytes_read < os.path.getsize(path) / 4


def test_csv_shard_offsets_survive_multiline_fields(tmp_path):
    records = [{"id": i, "caption": f"line one {i}\nline two", "image_url": ""} for i in range(10)]
    path = write_csv(tmp_path / "multi.csv", records)
    reg = registry(tmp_path)
    _, shards = reg.register_file(str(path), 4)
    got = [r for s in shards for r in read_shard(s, CaptionFields(), FS)[0].column("source_id").to_pylist()]
    assert got == [str(i) for i in range(10)]


def test_a_deleted_file_is_reported(tmp_path):
    reg = registry(tmp_path)
    path = write_jsonl(tmp_path / "gone.jsonl", RECORDS)
    _, shards = reg.register_file(str(path), 3)
    path.unlink()
    with pytest.raises(ShardRegistryError, match="no longer exists"):
        reg.check_unchanged(shards[0])


def test_a_missing_file_cannot_be_registered(tmp_path):
    with pytest.raises(ShardRegistryError, match="caption file not found"):
        registry(tmp_path).register_file(str(tmp_path / "nope.jsonl"), 3)


# -- every physical record accounted for (issue 17) ------------------------------------------------
def test_csv_stray_quote_is_one_malformed_row_and_the_rows_after_it_are_kept(tmp_path):
    lines = [
        "id,caption,image_url",
        "1,A dog on a beach.,",
        '2,"A stray quote never closed,',  # the quote opens a field that never closes
        "3,A cat on a sofa.,",
        '4,"A caption, with a comma",',
        "5,A horse in a field.,",
        '6,"closed"then text,',  # a quote closed in the middle of a field
        "7,A bird on a wire.,",
    ]
    path = tmp_path / "stray.csv"
    path.write_text("\n".join(lines) + "\n")
    reg = registry(tmp_path)
    scan = scan_source(FS, str(path), 2)
    assert scan.n_records == 7  # one per physical line: nothing merged
    for shard_rows in (1, 2, 3, 100):  # the scan's offsets and the shard reader agree on every row
        shards, captions, malformed = load_all(registry(tmp_path / str(shard_rows)), str(path), shard_rows)
        assert captions.column("source_id").to_pylist() == ["1", "3", "4", "5", "7"]
        assert captions.column("caption").to_pylist()[2] == "A caption, with a comma"
        bad = {r["source_row"]: (r["reason"], r["detail"]) for r in malformed.to_pylist()}
        assert sorted(bad) == [1, 5]
        assert bad[1][0] == "unbalanced_quote" and f"{path} line 3" in bad[1][1]
        assert bad[5][0] == "invalid_csv" and f"{path} line 7" in bad[5][1]
        assert captions.num_rows + malformed.num_rows == 7
    _, shards = reg.register_file(str(path), 2)
    assert [(s.start, s.line) for s in shards] == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_csv_stray_quote_before_a_later_quoted_field_does_not_swallow_it(tmp_path):
    path = tmp_path / "stray2.csv"
    path.write_text('id,caption\n1,"never closed\n2,fine\n3,"quoted, ok"\n4,"multi\nline"\n5,last\n')
    _, captions, malformed = load_all(registry(tmp_path), str(path), shard_rows=2)
    assert captions.column("caption").to_pylist() == ["fine", "quoted, ok", "multi\nline", "last"]
    assert [(r["source_row"], r["reason"]) for r in malformed.to_pylist()] == [(0, "unbalanced_quote")]


@pytest.mark.parametrize(
    "line, detail",
    [
        ('{"id": ' + "9" * 5000 + ', "caption": "huge id"}', "ValueError"),  # int() digit limit
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # RecursionError
    ],
)
def test_jsonl_row_that_breaks_the_decoder_is_one_malformed_row(tmp_path, line, detail):
    path = tmp_path / "deep.jsonl"
    good = [json.dumps({"id": i, "caption": f"caption {i}"}) for i in range(4)]
    path.write_text("\n".join([good[0], good[1], line, good[2], "", good[3]]) + "\n")
    for shard_rows in (1, 2, 5):
        _, captions, malformed = load_all(registry(tmp_path / str(shard_rows)), str(path), shard_rows)
        assert captions.column("source_id").to_pylist() == ["0", "1", "2", "3"]
        [bad] = malformed.to_pylist()
        assert bad["source_row"] == 2 and bad["reason"] == "invalid_json"
        assert f"{path} line 3" in bad["detail"] and detail in bad["detail"] and "\n" not in bad["detail"]


def test_a_record_that_breaks_the_row_mapping_is_one_malformed_row(tmp_path, monkeypatch):
    from synthvlm_assets.captions import sources

    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    real = sources.to_caption_row

    def flaky(record, fields, default_source):
        if record.row == 4:
            raise RecursionError("maximum recursion depth exceeded")
        return real(record, fields, default_source)

    monkeypatch.setattr(sources, "to_caption_row", flaky)
    _, captions, malformed = load_all(registry(tmp_path), str(path))
    assert captions.num_rows == 6
    [bad] = malformed.to_pylist()
    assert (bad["source_row"], bad["reason"]) == (4, "invalid_record")
    assert f"{path} line 5" in bad["detail"] and "RecursionError" in bad["detail"]


def _rewrite_keeping_size_and_mtime(path, old: bytes, new: bytes):
    st = os.stat(path)
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) >= 1  # Parquet: the value and its statistics
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("writer", [write_jsonl, write_csv, write_json, write_parquet])
def test_a_same_size_rewrite_keeping_the_mtime_is_caught(tmp_path, writer):
    ext = {"write_jsonl": "jsonl", "write_csv": "csv", "write_parquet": "parquet", "write_json": "json"}[
        writer.__name__
    ]
    path = writer(tmp_path / f"pool.{ext}", RECORDS)
    reg = registry(tmp_path)
    _, shards = reg.register_file(str(path), 3)
    _rewrite_keeping_size_and_mtime(path, b"dog number 4", b"cat number 4")  # row 4: the second shard
    if ext in ("jsonl", "csv"):  # hashed per shard byte range: only the changed shard fails
        reg.check_unchanged(shards[0])
        reg.check_unchanged(shards[2])
    with pytest.raises(ShardRegistryError, match=f"caption file {path} changed since it was registered"):
        reg.check_unchanged(shards[1])


def test_registry_entries_without_hashes_still_work(tmp_path):
    root = StorageRoot(str(tmp_path / "root"))
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    _, shards = ShardRegistry(root).register_file(str(path), 3)
    [key] = root.list("registry/files")
    entry = root.read_json(key)
    entry.pop("sha256")
    for s in entry["shards"]:
        s.pop("sha256"), s.pop("line")
    root.write_json(key, entry)
    reg = ShardRegistry(root)
    for shard in reg.shards():
        reg.check_unchanged(shard)
    got = [r for s in reg.shards() for r in read_shard(s, CaptionFields(), FS)[0].column("source_id").to_pylist()]
    assert got == [r["id"] for r in RECORDS]


def test_whole_file_hash_verified_once_per_process(tmp_path, monkeypatch):
    from synthvlm_assets import shards as shards_module

    path = write_json(tmp_path / "pool.json", RECORDS)
    reg = registry(tmp_path)
    _, shards = reg.register_file(str(path), 1)
    calls = []
    real = shards_module.sha256_of
    monkeypatch.setattr(shards_module, "sha256_of", lambda *a, **k: calls.append(a) or real(*a, **k))
    for shard in shards:
        reg.check_unchanged(shard)
    assert len(calls) == 1


def _hostile_csv_lines(rng, n):
    """(line, kept caption or None) pairs: good rows, quoted commas, stray and half-closed quotes."""
    out = []
    for i in range(n):
        kind = rng.choice(["plain", "quoted", "stray", "closed_then_text", "escaped"])
        if kind == "plain":
            out.append((f"{i},plain caption {i},", f"plain caption {i}"))
        elif kind == "quoted":
            out.append((f'{i},"quoted, caption {i}",', f"quoted, caption {i}"))
        elif kind == "escaped":
            out.append((f'{i},"say ""hi"" {i}",', f'say "hi" {i}'))
        elif kind == "stray":
            out.append((f'{i},"stray quote {i},', None))
        else:
            out.append((f'{i},"half" closed {i},', None))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_generated_hostile_csv_every_line_accounted_for(tmp_path, seed):
    import random

    rng = random.Random(seed)
    lines = _hostile_csv_lines(rng, rng.randint(1, 40))
    path = tmp_path / "gen.csv"
    path.write_text("id,caption,image_url\n" + "".join(line + "\n" for line, _ in lines))
    shard_rows = rng.randint(1, 7)
    shards, captions, malformed = load_all(registry(tmp_path), str(path), shard_rows)
    assert sum(s.rows for s in shards) == len(lines)
    for s in shards:  # per shard: rows in = kept + malformed
        kept, bad = read_shard(s, CaptionFields(), FS)
        assert kept.num_rows + bad.num_rows == s.rows
    assert captions.column("caption").to_pylist() == [c for _, c in lines if c is not None]
    assert captions.column("source_row").to_pylist() == [i for i, (_, c) in enumerate(lines) if c is not None]
    assert malformed.column("source_row").to_pylist() == [i for i, (_, c) in enumerate(lines) if c is None]
    for r in malformed.to_pylist():
        assert f"{path} line {r['source_row'] + 2}" in r["detail"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("end", [b"\r", b"\r\n", b"\n"])
def test_line_ends_are_counted_as_universal_newlines(tmp_path, fmt, end):
    """CR-only, CRLF and LF files: the registration scan and the shard reader count the same lines."""
    if fmt == "jsonl":
        lines = [b'{"id": "0", "caption": "zero"}', b"", b"{broken", b'{"id": "3", "caption": "three"}']
    else:
        lines = [b"id,caption", b'0,"zero\rwith a CR"', b'1,"stray', b"3,three"]
    path = tmp_path / f"pool.{fmt}"
    path.write_bytes(end.join(lines) + end)
    assert scan_source(FS, str(path), 1).n_records == 3
    for shard_rows in (1, 2, 3):
        shards, captions, malformed = load_all(registry(tmp_path / str(shard_rows)), str(path), shard_rows)
        assert sum(s.rows for s in shards) == 3 and captions.column("source_id").to_pylist() == ["0", "3"]
        [bad] = malformed.to_pylist()
        # CSV: record 0's quoted CR is a line end too, as in any text reader
        assert bad["source_row"] == 1 and f"{path} line {3 if fmt == 'jsonl' else 4}" in bad["detail"]
