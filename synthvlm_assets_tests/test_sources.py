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

from synthvlm_assets.captions.sources import CaptionFields, SourceFormatError, iter_records, scan_source
from synthvlm_assets.shards import ShardRegistry, ShardRegistryError, read_shard
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
        ("broken.json", b'[{"caption": "a"}, {"caption": "b"', r"line 1: invalid JSON: .* after record 0 \(0-based\)"),
        (
            "extra.json",
            b'[{"caption": "a"}]\n{"caption": "b"}',
            r"line 2: invalid JSON: extra data .* after record 0 ",
        ),
        (
            "comma.json",
            b'[{"caption": "a"},\r{"caption": "b"},]',
            r"line 2: .*expected a record, found '\]', after record 1 ",
        ),
        ("open.json", b"[", "line 1: invalid JSON: the file ends inside a list, before the first record"),
        (
            "coco.json",
            b'{"images": [], "annotations": [{"caption": "a"}] "x": 1}',
            "after record 0 .* of 'annotations'",
        ),
        ("utf16.jsonl", '{"caption": "a"}\n'.encode("utf-16"), r"UTF-16-LE text .*; caption files must be UTF-8"),
        ("utf16.json", '[{"caption": "a"}]'.encode("utf-16-be"), r"NUL bytes .*; caption files must be UTF-8"),
        ("utf16.csv", "id,caption\n1,a\n".encode("utf-16"), r"UTF-16-LE text .*; caption files must be UTF-8"),
        ("utf32.csv", "id,caption\n1,a\n".encode("utf-32"), r"UTF-32-LE text .*; caption files must be UTF-8"),
        ("latin1.csv", "id,l\u00e9gende\n1,a\n".encode("latin-1"), r"line 1: the CSV header is not UTF-8 .*0xe9"),
        ("object.json", b'{"images": []}', "not a COCO captions file"),
        ("listless.json", b'{"annotations": {"caption": "a"}}', "without an 'annotations' list"),
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
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)  # one line, naming the file


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
    from synthvlm_assets import shards

    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    real = shards.to_caption_row

    def flaky(record, fields, default_source):
        if record.row == 4:
            raise RecursionError("maximum recursion depth exceeded")
        return real(record, fields, default_source)

    monkeypatch.setattr(shards, "to_caption_row", flaky)
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


# -- hostile bytes: one verdict per record whatever the format (issue 17) ------------------------------------------
def _verdicts(shards, uri):
    """Per row: the kept caption, or the malformed reason; each shard's rows all accounted for, once."""
    out = {}
    for s in shards:
        kept, bad = read_shard(s, CaptionFields(), FS)
        assert kept.num_rows + bad.num_rows == s.rows, s.key
        out.update(zip(kept.column("source_row").to_pylist(), kept.column("caption").to_pylist()))
        for r in bad.to_pylist():
            assert r["reason"] and r["detail"] and "\n" not in r["detail"] and r["source_file"] == uri
            if r["reason"] in ("invalid_json", "invalid_csv", "unbalanced_quote", "wrong_field_count"):
                assert uri in r["detail"]  # a decoding error names the file and the record
            out[r["source_row"]] = r["reason"]
    assert sorted(out) == list(range(sum(s.rows for s in shards)))
    return [out[i] for i in sorted(out)]


def _json_family(records: list[bytes], rng, bom: bool) -> dict[str, bytes]:
    """The same record bytes as JSONL (mixed line ends, blank lines), a JSON list and COCO annotations."""
    head = b"\xef\xbb\xbf" if bom else b""
    jsonl = head + b"".join(r + rng.choice([b"\n", b"\r\n", b"\r", b"\n\n", b"\r\n \n"]) for r in records)
    sep = [b",", b", ", b",\n", b",\r\n  ", b",\r"]
    body = b"".join(r + (rng.choice(sep) if i < len(records) - 1 else b"") for i, r in enumerate(records))
    images = b'[{"id": 1, "file_name": "1.jpg"}, {"id": [2], "file_name": "unhashable.jpg"}]'
    return {
        "jsonl": jsonl,
        "json": head + b"[\n" + body + b"\n]\n",
        "coco": head + b'{"info": {"x": [1, {"y": "]"}]}, "images": ' + images + b', "annotations": [' + body + b"]}",
    }


# (record bytes, verdict: the caption kept or the reason it is malformed); the same in JSONL, JSON list and COCO
HOSTILE_JSON_RECORDS = [
    (b'{"id": "a", "caption": "A dog on a beach."}', "A dog on a beach."),
    (b'{"id": ' + b"9" * 20 + b', "caption": "a 20-digit id"}', "a 20-digit id"),  # past 64 bits: ijson refused it
    (b'{"id": ' + b"9" * 5000 + b', "caption": "x"}', "invalid_json"),  # past int()'s digit limit: ValueError
    (b'{"caption": ' + b"[" * 3000 + b"]" * 3000 + b"}", "invalid_json"),  # RecursionError in json
    (b'{"caption": "deep", "x": ' + b"[" * 300 + b"]" * 300 + b"}", "invalid_json"),  # past JSON_MAX_NESTING
    (b'{"caption": "deep enough", "x": ' + b"[" * 200 + b"]" * 200 + b"}", "deep enough"),
    (rb'{"caption": "lone \ud800 surrogate"}', "undecodable_text"),  # ijson made it "?" and kept it
    (rb'{"caption": "lone \udfff surrogate"}', "undecodable_text"),  # ijson refused the whole file
    (rb'{"caption": "a pair \ud83d\ude00 is one character"}', "a pair \U0001f600 is one character"),
    ('{"caption": "caf\u00e9 \U0001f600 na\u00efve"}'.encode(), "caf\u00e9 \U0001f600 na\u00efve"),
    (b'{"caption": "bad \xff byte"}', "undecodable_text"),
    (b'{"caption": "fine", "note": "bad \xc3 byte in another field"}', "undecodable_text"),
    (b'{"caption": "tab\\tand \\"quotes\\", [brackets] {braces} \\\\"}', 'tab\tand "quotes", [brackets] {braces} \\'),
    (b'{"caption": NaN}', "caption_not_string"),
    (b'{"caption": "x" "y"}', "invalid_json"),
    (b'{"caption": tru}', "invalid_json"),
    (b'{"caption": "raw\tcontrol"}', "invalid_json"),
    (b'{"id": 3}', "missing_caption"),
    (b"[1, 2]", "record_not_object"),
    (b'"just a string"', "record_not_object"),
    (b"12", "record_not_object"),
    (b'{"caption": "' + b"x" * 30_000 + b'"}', "caption_too_long"),
    (b'{"caption": ""}', ""),
]


@pytest.mark.parametrize("chunk", [7, 4096, None])
@pytest.mark.parametrize("seed", range(4))
def test_generated_hostile_json_records_same_verdict_in_every_json_format(tmp_path, monkeypatch, seed, chunk):
    import random

    from synthvlm_assets.captions import sources

    if chunk:  # records, escapes and UTF-8 characters cut across reads
        monkeypatch.setattr(sources, "_CHUNK", chunk)
        monkeypatch.setattr(sources, "_LINE_CHUNK", chunk)
    rng = random.Random(seed)
    cases = rng.sample(HOSTILE_JSON_RECORDS, len(HOSTILE_JSON_RECORDS)) + rng.choices(HOSTILE_JSON_RECORDS, k=8)
    files = _json_family([r for r, _ in cases], rng, bom=seed % 2 == 1)
    shard_rows = rng.randint(1, 9)
    for fmt, data in files.items():
        path = tmp_path / f"{fmt}-{seed}.{'jsonl' if fmt == 'jsonl' else 'json'}"
        path.write_bytes(data)
        _, shards = registry(tmp_path / fmt).register_file(str(path), shard_rows)
        assert shards[0].format == fmt and sum(s.rows for s in shards) == len(cases), fmt
        assert _verdicts(shards, str(path)) == [v for _, v in cases], fmt


# caption bytes, and whether Parquet can hold them (a string column is UTF-8)
HOSTILE_CAPTIONS = [
    (b"A dog on a beach.", True),
    (b"", True),
    ("caf\u00e9 \U0001f600 na\u00efve".encode(), True),
    (b"bad \xff byte", False),
    (b"x" * 30_000, True),
    (b'with "quotes", commas, [brackets] and {braces}', True),
    (b"multi\nline", True),
    (b"lone\rCR and\r\nCRLF inside", True),
    (b"tab\there", True),
    (b"  spaces around  ", True),
    (b"\xef\xbb\xbfa BOM inside a caption", True),
    (b"truncated \xe2\x82", False),
]


def _caption_verdict(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "undecodable_text"
    return "caption_too_long" if len(text) > CaptionFields().max_caption_chars else text


@pytest.mark.parametrize("seed", range(6))
def test_generated_hostile_captions_same_verdict_in_every_format(tmp_path, seed):
    import random

    rng = random.Random(seed)
    cases = rng.sample(HOSTILE_CAPTIONS, len(HOSTILE_CAPTIONS)) + rng.choices(HOSTILE_CAPTIONS, k=6)
    bom = seed % 2 == 1

    def json_string(raw: bytes) -> bytes:  # escaped as json writes it; bytes that are not UTF-8 go in raw
        try:
            return json.dumps(raw.decode("utf-8")).encode()
        except UnicodeDecodeError:
            return b'"' + raw + b'"'

    records = [b'{"id": "%d", "caption": %s}' % (i, json_string(raw)) for i, (raw, _) in enumerate(cases)]
    files = {f"pool.{'jsonl' if k == 'jsonl' else k + '.json'}": v for k, v in _json_family(records, rng, bom).items()}
    end = rng.choice([b"\n", b"\r\n", b"\r"])
    files["pool.csv"] = (b"\xef\xbb\xbf" if bom else b"") + end.join(
        [b"id,caption"] + [b'%d,"%s"' % (i, raw.replace(b'"', b'""')) for i, (raw, _) in enumerate(cases)] + [b""]
    )
    expected = [_caption_verdict(raw) for raw, _ in cases]
    shard_rows = rng.randint(1, 7)
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        _, shards = registry(tmp_path / f"registry-{name}").register_file(str(path), shard_rows)
        assert _verdicts(shards, str(path)) == expected, name
    # Parquet holds only UTF-8 strings: the rows it can hold get the same verdicts
    parquet = [(i, raw) for i, (raw, utf8) in enumerate(cases) if utf8]
    path = write_parquet(tmp_path / "pool.parquet", [{"id": str(i), "caption": raw.decode()} for i, raw in parquet])
    _, shards = registry(tmp_path / "parquet").register_file(str(path), shard_rows)
    assert _verdicts(shards, str(path)) == [expected[i] for i, _ in parquet]


@pytest.mark.parametrize("fmt", ["json", "coco"])
def test_json_record_that_breaks_the_decoder_is_one_malformed_record(tmp_path, fmt):
    good = [json.dumps({"id": i, "image_id": 1, "caption": f"caption {i}"}).encode() for i in range(4)]
    hostile = [b'{"id": ' + b"9" * 5000 + b', "caption": "x"}', b"[" * 100_000 + b"]" * 100_000]
    items = b",\n".join([good[0], hostile[0], good[1], hostile[1], good[2], good[3]])
    data = (
        b"[" + items + b"]"
        if fmt == "json"
        else b'{"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [%s]}' % items
    )
    path = tmp_path / "pool.json"
    path.write_bytes(data)
    for shard_rows in (1, 2, 4, 10):
        shards, captions, malformed = load_all(registry(tmp_path / str(shard_rows)), str(path), shard_rows)
        assert shards[0].format == fmt
        assert captions.column("source_id").to_pylist() == ["0", "1", "2", "3"]
        bad = {r["source_row"]: r["detail"] for r in malformed.to_pylist()}
        assert sorted(bad) == [1, 3] and set(malformed.column("reason").to_pylist()) == {"invalid_json"}
        assert f"{path} line 2 (row 1): ValueError: Exceeds the limit" in bad[1]
        assert f"{path} line 4 (row 3): nested too deeply (100000 levels" in bad[3]
        if fmt == "coco":
            assert set(captions.column("image_ref").to_pylist()) == {"1.jpg"}


def test_deeply_nested_json_is_read_in_bounded_memory(tmp_path):
    """ijson built a prefix string per level (quadratic): 20,000 levels, 40 KB, took 1.0 GB (tracemalloc peak)."""
    import tracemalloc

    path = tmp_path / "deep.json"
    path.write_text('[{"caption": "a"}, {"caption": ' + "[" * 20_000 + "]" * 20_000 + '}, {"caption": "b"}]')
    tracemalloc.start()
    try:
        _, captions, malformed = load_all(registry(tmp_path), str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert captions.column("caption").to_pylist() == ["a", "b"]
    assert (
        malformed.to_pylist()[0]["reason"] == "invalid_json"
        and "nested too deeply" in malformed.to_pylist()[0]["detail"]
    )
    assert peak < 32 * 1024 * 1024, peak


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


def test_pretty_printed_json_in_a_jsonl_file_is_one_malformed_row_per_line(tmp_path):
    path = tmp_path / "pretty.jsonl"
    records = [{"id": "a", "caption": "A dog."}, {"id": "b", "caption": "A cat."}]
    text = "\n".join(json.dumps(r, indent=2) for r in records) + "\n" + json.dumps({"id": "c", "caption": "A bird."})
    path.write_text(text + "\n")
    n_lines = len(text.splitlines())
    shards, captions, malformed = load_all(registry(tmp_path), str(path), 4)
    assert sum(s.rows for s in shards) == n_lines == captions.num_rows + malformed.num_rows
    assert captions.column("source_id").to_pylist() == ["c"]  # the one record on one line
    details = malformed.column("detail").to_pylist()
    assert set(malformed.column("reason").to_pylist()) == {"invalid_json"}
    assert "JSONL holds one whole record per line" in details[0] and f"{path} line 1 (row 0)" in details[0]


@pytest.mark.parametrize("seed", range(12))
def test_mutated_caption_files_are_refused_in_one_line_or_every_row_accounted_for(tmp_path, seed):
    """Random bytes deleted, inserted or replaced (brackets, quotes, escapes, line ends, bad UTF-8, long
    numbers) in each format: registration refuses the file in one line naming it, or every registered row is
    read back kept or malformed; nothing else escapes."""
    import random

    rng = random.Random(seed)
    records = [{"id": i, "image_id": 1, "caption": f'caption {i} caf\u00e9 "q" [b] {{c}}'} for i in range(10)]
    files = {
        "pool.jsonl": "".join(json.dumps(r) + "\n" for r in records),
        "list.json": json.dumps(records, indent=rng.choice([None, 1])),
        "coco.json": json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": records}),
        "pool.csv": "id,caption\n"
        + "".join(f'{r["id"]},"{r["caption"].replace(chr(34), 2 * chr(34))}"\n' for r in records),
    }
    pieces = [
        b"[",
        b"]",
        b"{",
        b"}",
        b",",
        b":",
        b'"',
        b"\\",
        b"\n",
        b"\r",
        b" ",
        b"\xff",
        b"\xc3",
        b"9" * 30,
        b"\\ud800",
    ]
    for name, text in files.items():
        data = bytearray(text.encode())
        for _ in range(rng.randint(1, 5)):
            i = rng.randrange(len(data) + 1)
            op = rng.random()
            if op < 0.4:
                data[i : i + rng.randint(1, 5)] = b""
            elif op < 0.8:
                data[i:i] = rng.choice(pieces)
            else:
                data[i : i + 1] = rng.choice(pieces)
        path = tmp_path / name
        path.write_bytes(bytes(data))
        try:
            _, shards = registry(tmp_path / f"registry-{name}").register_file(str(path), rng.randint(1, 4))
        except SourceFormatError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
            continue
        _verdicts(shards, str(path))
