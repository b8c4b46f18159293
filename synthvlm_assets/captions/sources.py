"""Readers of raw caption pools (SPEC §1): JSON list, JSONL, Parquet, CSV, COCO `captions_*.json` and
LLaVA conversation JSON, local or `s3://`, streamed so memory never grows with the file.

A file is scanned once when it is registered (row count, and byte offsets of each shard's first row
for line-based formats so a shard read seeks straight to it); a shard read then yields only its rows.
"""

from __future__ import annotations

import csv
import itertools
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import ijson
import pyarrow as pa
import pyarrow.parquet as pq

from synthvlm_assets.captions.normalize import dedup_key, normalize_caption
from synthvlm_assets.storage import split_protocol

if TYPE_CHECKING:
    from synthvlm_assets.shards import Shard

_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_CSV_FIELD_LIMIT = 64 * 1024 * 1024  # csv's default 128 KiB would make a long caption a file error


RAW_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("caption", pa.string()),  # as in the source file
        ("caption_normalized", pa.string()),  # Unicode-fixed and punctuation-normalised (SPEC §1)
        ("dedup_key", pa.binary(16)),  # hash of caption_normalized: exact-duplicate identity
        ("source", pa.string()),
        ("source_id", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("image_ref", pa.string()),
        ("shard", pa.string()),
    ]
)
MALFORMED_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("shard", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

class SourceFormatError(ValueError):
    """The file cannot be parsed at all; the message names the file and the position."""


@dataclass(frozen=True)
class CaptionFields:
    """Which fields of a record hold what (SPEC §1 names: id, caption, image_url/image_path, source)."""

    id: str = "id"
    caption: str = "caption"
    image: tuple[str, ...] = ("image_path", "image_url", "image", "url")
    source: str = "source"
    max_caption_chars: int = 20_000  # a guard against hostile input; SDXL reads 77 tokens anyway


@dataclass
class SourceScan:
    format: str
    n_records: int
    shard_offsets: list[int] | None  # byte offset of each shard's first record (jsonl, csv)
    columns: list[str] = field(default_factory=list)


@dataclass
class RawRecord:
    row: int  # 0-based record index in the file
    value: Any = None  # the parsed record (a dict for well-formed rows)
    error: str | None = None  # why the record itself could not be parsed


# -- format detection ---------------------------------------------------------------------------
def _first_byte(f: Any) -> bytes:
    while True:
        chunk = f.read(4096)
        if not chunk:
            return b""
        stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
        if stripped:
            return stripped[:1]


def detect_format(fs: fsspec.AbstractFileSystem, path: str) -> str:
    ext = posixpath.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise SourceFormatError(f"{path}: unknown caption file type {ext!r} (expected one of {', '.join(_EXTENSIONS)})")
    fmt = _EXTENSIONS[ext]
    if fmt == "json":
        with fs.open(path, "rb") as f:
            first = _first_byte(f)
        if first == b"{":
            return "coco"  # a JSON object: COCO's {"images": [...], "annotations": [...]}
        if first != b"[":
            raise SourceFormatError(f"{path}: a .json caption file must hold a list of records or a COCO object (starts with {first!r})")
    return fmt


# -- scanning (at registration) -------------------------------------------------------------
def _iter_lines_with_offsets(f: Any) -> Iterator[tuple[int, bytes]]:
    offset = 0
    for line in f:
        yield offset, line
        offset += len(line)


def _json_items(f: Any, prefix: str, path: str) -> Iterator[Any]:
    n = 0
    try:
        for item in ijson.items(f, prefix, use_float=True):
            yield item
            n += 1
    except ijson.JSONError as exc:
        raise SourceFormatError(f"{path}: invalid JSON after record {n} (0-based) of '{prefix}': {exc}") from exc
    except UnicodeDecodeError as exc:
        raise SourceFormatError(f"{path}: undecodable bytes after record {n} of '{prefix}': {exc}") from exc


def _csv_records(f: Any, path: str, offset: int) -> Iterator[tuple[int, list[str]]]:
    """CSV records with the byte offset where each starts (csv pulls exactly the lines it needs)."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    pos = [offset]

    def lines() -> Iterator[str]:
        for line in f:
            pos[0] += len(line)
            yield line.decode("utf-8", "surrogateescape")

    reader = csv.reader(lines())
    start = offset
    try:
        for record in reader:
            yield start, record
            start = pos[0]
    except csv.Error as exc:
        raise SourceFormatError(f"{path}: invalid CSV at line {reader.line_num}: {exc}") from exc


def scan_source(fs: fsspec.AbstractFileSystem, path: str, shard_rows: int) -> SourceScan:
    """Count the records of a caption file (one streaming pass) and locate each shard's first record."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    fmt = detect_format(fs, path)
    if fmt == "parquet":
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f)
                return SourceScan(fmt, meta.metadata.num_rows, None, meta.schema_arrow.names)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a broken file
            raise SourceFormatError(f"{path}: not a readable Parquet file: {exc}") from exc
    offsets: list[int] = []
    n = 0
    with fs.open(path, "rb") as f:
        if fmt == "jsonl":
            for offset, line in _iter_lines_with_offsets(f):
                if line.strip():
                    if n % shard_rows == 0:
                        offsets.append(offset)
                    n += 1
            return SourceScan(fmt, n, offsets)
        if fmt == "csv":
            records = _csv_records(f, path, 0)
            header = next(records, None)
            if header is None:
                raise SourceFormatError(f"{path}: empty CSV file (no header row)")
            for offset, _ in records:
                if n % shard_rows == 0:
                    offsets.append(offset)
                n += 1
            return SourceScan(fmt, n, offsets, header[1])
        prefix = "annotations.item" if fmt == "coco" else "item"
        for _ in _json_items(f, prefix, path):
            n += 1
    if fmt == "coco" and n == 0:
        with fs.open(path, "rb") as f:
            keys = {k for p, e, k in ijson.parse(f) if p == "" and e == "map_key"}
        if "annotations" not in keys:
            raise SourceFormatError(f"{path}: a JSON object without 'annotations' is not a COCO captions file")
    return SourceScan(fmt, n, None)


# -- reading one shard ----------------------------------------------------------------------
def iter_records(
    fs: fsspec.AbstractFileSystem, path: str, fmt: str, start: int, end: int, offset: int | None = None
) -> Iterator[RawRecord]:
    """Records `start <= row < end` of the file, streamed."""
    if fmt == "parquet":
        yield from _parquet_records(fs, path, start, end)
        return
    with fs.open(path, "rb") as f:
        if fmt == "jsonl":
            yield from _jsonl_records(f, path, start, end, offset)
        elif fmt == "csv":
            yield from _csv_dict_records(f, path, start, end, offset)
        elif fmt == "coco":
            yield from _coco_records(fs, f, path, start, end)
        elif fmt == "json":
            for row, item in enumerate(itertools.islice(_json_items(f, "item", path), start, end), start):
                yield RawRecord(row, item)
        else:
            raise SourceFormatError(f"{path}: unknown format {fmt!r}")


def _jsonl_records(f: Any, path: str, start: int, end: int, offset: int | None) -> Iterator[RawRecord]:
    import json

    row = start
    if offset is not None:
        f.seek(offset)
        lines: Iterable[bytes] = f
    else:  # no index: skip from the top
        lines = (line for line in f if line.strip())
        lines = itertools.islice(lines, start, None)
    for line in lines:
        if row >= end:
            break
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as exc:
            yield RawRecord(row, error=f"undecodable_text: invalid UTF-8 at byte {exc.start} of the line")
        else:
            try:
                yield RawRecord(row, json.loads(text))
            except json.JSONDecodeError as exc:
                yield RawRecord(row, error=f"invalid_json: {exc}")
        row += 1


def _csv_dict_records(f: Any, path: str, start: int, end: int, offset: int | None) -> Iterator[RawRecord]:
    records = _csv_records(f, path, 0)
    _, header = next(records)
    header = [header[0].lstrip("\ufeff"), *header[1:]] if header else header
    if offset is not None:
        f.seek(offset)
        records = _csv_records(f, path, offset)
    else:
        records = itertools.islice(records, start, None)
    for row, (_, values) in zip(range(start, end), records):
        if len(values) != len(header):
            yield RawRecord(row, error=f"wrong_field_count: {len(values)} fields, header has {len(header)}")
        else:
            yield RawRecord(row, dict(zip(header, values)))


def _coco_records(fs: fsspec.AbstractFileSystem, f: Any, path: str, start: int, end: int) -> Iterator[RawRecord]:
    images = {}
    for image in _json_items(f, "images.item", path):
        if isinstance(image, dict) and "id" in image:
            images[image["id"]] = image.get("coco_url") or image.get("file_name")
    f.seek(0)
    for row, ann in enumerate(itertools.islice(_json_items(f, "annotations.item", path), start, end), start):
        if isinstance(ann, dict):
            ann = {**ann, "image_url": images.get(ann.get("image_id")), "source": "coco"}
        yield RawRecord(row, ann)


def _parquet_records(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> Iterator[RawRecord]:
    """Only the row groups that overlap the shard are read."""
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            first = 0
            for rg in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                if first + n > start and first < end:
                    rows = pf.read_row_group(rg).to_pylist()
                    lo, hi = max(start, first) - first, min(end, first + n) - first
                    for i in range(lo, hi):
                        yield RawRecord(first + i, rows[i])
                first += n
                if first >= end:
                    break
    except SourceFormatError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SourceFormatError(f"{path}: cannot read Parquet rows {start}-{end}: {exc}") from exc


# -- one schema ---------------------------------------------------------------------------------
@dataclass
class CaptionRow:
    source_row: int
    caption: str
    source_id: str | None
    source: str
    image_ref: str | None


@dataclass
class MalformedRow:
    source_row: int
    reason: str
    detail: str


def _llava_caption(record: dict[str, Any]) -> Any:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return None
    for turn in turns:
        if isinstance(turn, dict) and turn.get("from") == "gpt":
            return turn.get("value")
    return None


def _excerpt(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def to_caption_row(record: RawRecord, fields: CaptionFields, default_source: str) -> CaptionRow | MalformedRow:
    """One raw record in the pool's schema, or the reason it is malformed."""
    if record.error is not None:
        reason, _, detail = record.error.partition(": ")
        return MalformedRow(record.row, reason, detail)
    value = record.value
    if not isinstance(value, dict):
        return MalformedRow(record.row, "record_not_object", _excerpt(value))
    is_llava = fields.caption not in value and "conversations" in value
    caption = _llava_caption(value) if is_llava else value.get(fields.caption)
    if caption is None:
        return MalformedRow(record.row, "missing_caption", f"no {'gpt turn' if is_llava else repr(fields.caption)} in {_excerpt(value)}")
    if not isinstance(caption, str):
        return MalformedRow(record.row, "caption_not_string", f"{type(caption).__name__}: {_excerpt(caption)}")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from JSON escapes or undecodable CSV bytes
        return MalformedRow(record.row, "undecodable_text", f"invalid code point at {exc.start}: {_excerpt(caption)}")
    if len(caption) > fields.max_caption_chars:
        return MalformedRow(record.row, "caption_too_long", f"{len(caption)} chars > max_caption_chars={fields.max_caption_chars}")
    source_id = value.get(fields.id)
    image = next((value[k] for k in fields.image if isinstance(value.get(k), str) and value[k]), None)
    source = value.get(fields.source)
    strings = [s for s in (source_id, image, source) if isinstance(s, str)]
    try:
        for s in strings:
            s.encode("utf-8")
    except UnicodeEncodeError as exc:
        return MalformedRow(record.row, "undecodable_text", f"invalid code point in a metadata field: {exc}")
    return CaptionRow(
        source_row=record.row,
        caption=caption,
        source_id=None if source_id is None else str(source_id),
        source=source if isinstance(source, str) and source else ("llava" if is_llava else default_source),
        image_ref=image,
    )


def list_caption_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Caption files under a folder (recursively) or the file itself, sorted; hidden and temporary
    files (a name starting with '.' or '_') are skipped so half-uploaded files are not picked up."""
    if fs.isfile(path):
        return [path]
    out = []
    for p in fs.find(path):
        name = posixpath.basename(p)
        if name.startswith((".", "_")):
            continue
        if posixpath.splitext(name)[1].lower() in _EXTENSIONS:
            out.append(p)
    return sorted(out)


def caption_id(tag: str, row: int) -> str:
    """Unique across the pool by construction: the file's tag and the record's row in it."""
    return f"{tag}:{row}"


def read_shard(shard: Shard, fields: CaptionFields, fs: fsspec.AbstractFileSystem) -> tuple[pa.Table, pa.Table]:
    """Load one shard's rows from its source file: (rows in the pool schema, malformed rows with reasons).

    The text is normalised here, once: curation filters the normalised text, and every later shard
    checks its duplicates against the stored dedup keys without normalising this shard again.
    """
    path = split_protocol(shard.uri)[1]
    default_source = path.rsplit("/", 1)[-1]
    rows: list[CaptionRow] = []
    bad: list[MalformedRow] = []
    for record in iter_records(fs, path, shard.format, shard.start, shard.end, shard.offset):
        row = to_caption_row(record, fields, default_source)
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
