"""Readers of raw caption pools (SPEC §1): JSON list, JSONL, Parquet, CSV, COCO `captions_*.json` and
LLaVA conversation JSON, local or `s3://`, streamed so memory never grows with the file.

A file is scanned once when it is registered (row count, and byte offsets of each shard's first row
for line-based formats so a shard read seeks straight to it); a shard read then yields only its rows.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import posixpath
import re
from collections import deque
from collections.abc import Iterator
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

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_CSV_FIELD_LIMIT = 64 * 1024 * 1024  # csv's default 128 KiB would make a long caption a file error
# A quoted CSV field may hold line breaks, but a quote opened and not closed within this many lines
# is a stray quote: its line becomes a malformed row and the lines after it are read as their own rows.
CSV_MAX_RECORD_LINES = 64
_LINE_CHUNK = 64 * 1024  # small: a shard read stops soon after its last line
_CHUNK = 1 << 20  # reads through a whole file: the registration scan, JSON lists


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
    shard_lines: list[int] | None = None  # 1-based line of each shard's first record (jsonl, csv)
    shard_sha256: list[str] | None = None  # sha256 of each shard's bytes (jsonl, csv: up to the next shard)
    sha256: str | None = None  # of the whole file, when the scan read it all (not Parquet)


@dataclass
class RawRecord:
    row: int  # 0-based record index in the file
    value: Any = None  # the parsed record (a dict for well-formed rows)
    error: str | None = None  # why the record itself could not be parsed: "reason: detail"
    line: int | None = None  # 1-based line where the record starts (line-based formats)


def where(path: str, row: int, line: int | None) -> str:
    """The position of a record in words, for one-line messages."""
    return f"{path} line {line} (row {row})" if line is not None else f"{path} row {row}"


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


# -- format detection ---------------------------------------------------------------------------
def _first_byte(f: Any) -> bytes:
    while True:
        chunk = f.read(4096)
        if not chunk:
            return b""
        stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
        if stripped:
            return stripped[:1]


_WIDE_BOMS = {  # UTF-32 first: its little-endian mark starts with UTF-16's
    b"\xff\xfe\x00\x00": "UTF-32-LE",
    b"\x00\x00\xfe\xff": "UTF-32-BE",
    b"\xff\xfe": "UTF-16-LE",
    b"\xfe\xff": "UTF-16-BE",
}


def check_utf8_start(head: bytes, path: str) -> None:
    """Text caption files are UTF-8 (a byte-order mark allowed): UTF-16 or UTF-32 text, known by its byte-order
    mark or by NUL bytes among the first characters, is refused in one line rather than read as garbage rows."""
    for bom, name in _WIDE_BOMS.items():
        if head.startswith(bom):
            raise SourceFormatError(
                f"{path}: {name} text (byte-order mark {bom.hex(' ')}); caption files must be UTF-8"
                f" (convert it, e.g. iconv -f {name} -t UTF-8)"
            )
    if b"\0" in head[:4]:
        raise SourceFormatError(
            f"{path}: NUL bytes among the first characters (UTF-16 or UTF-32 text?); caption files must be UTF-8"
        )


def detect_format(fs: fsspec.AbstractFileSystem, path: str) -> str:
    ext = posixpath.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise SourceFormatError(
            f"{path}: unknown caption file type {ext!r} (expected one of {', '.join(_EXTENSIONS)})"
        )
    fmt = _EXTENSIONS[ext]
    if fmt != "parquet":
        with fs.open(path, "rb") as f:
            check_utf8_start(f.read(4), path)
    if fmt == "json":
        with fs.open(path, "rb") as f:
            first = _first_byte(f)
        if first == b"{":
            return "coco"  # a JSON object: COCO's {"images": [...], "annotations": [...]}
        if first != b"[":
            raise SourceFormatError(
                f"{path}: a .json caption file must hold a list of records or a COCO object (starts with {first!r})"
            )
    return fmt


# -- scanning (at registration) -------------------------------------------------------------
class _HashingReader:
    """A binary file whose bytes, as read, also go into a sha256 (the scan's whole-file hash)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.hash.hexdigest()


class _ShardHasher:
    """sha256 of each shard's byte range (from its first record to the next shard's), fed in file order."""

    def __init__(self) -> None:
        self.digests: list[str] = []
        self._current: Any = None

    def start_shard(self) -> None:
        self.finish()
        self._current = hashlib.sha256()

    def update(self, data: bytes) -> None:
        if self._current is not None:
            self._current.update(data)

    def finish(self) -> list[str]:
        if self._current is not None:
            self.digests.append(self._current.hexdigest())
            self._current = None
        return self.digests


def _lines(f: Any, size: int | None = None) -> Iterator[bytes]:
    """The lines of a binary file with their ends, split as Python's universal newlines split text (LF, CRLF or
    a lone CR), so the registration scan and the shard reader count the same lines whatever the line ends.
    Their lengths add up to the file's, so byte offsets stay exact."""
    parts: list[bytes] = []  # the start of a line not yet ended
    while chunk := f.read(size or _LINE_CHUNK):
        parts.append(chunk)
        if b"\n" not in chunk and b"\r" not in chunk:
            continue  # joined once a line end comes: a long line is not copied chunk by chunk
        lines = b"".join(parts).splitlines(keepends=True)
        last = lines.pop()
        if last.endswith(b"\n"):
            lines.append(last)
            parts = []
        else:  # no line end yet, or a CR whose LF may open the next chunk
            parts = [last]
        yield from lines
    if parts:
        yield b"".join(parts)


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, kept by the surrogateescape decoding


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


@dataclass
class _CsvRecord:
    offset: int  # byte offset where the record starts
    line: int  # 1-based line where it starts
    raw: bytes  # its bytes, line ends included
    values: list[str] | None  # None: the line is malformed (then `error` says why)
    error: str | None = None


class _Feed:
    """The lines one csv reader parses next: a chunk at a time, ending (StopIteration) after each."""

    def __init__(self) -> None:
        self.lines: list[str] = []  # in reverse order

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        if self.lines:
            return self.lines.pop()
        raise StopIteration


def _simple_csv_line(raw: bytes) -> list[str] | None:
    """The fields of a line without quotes, carriage returns or NULs (what csv gives for it), else None."""
    body = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith((b"\n", b"\r")) else raw
    if b'"' in body or b"\r" in body or b"\0" in body:
        return None
    return body.decode("utf-8", "surrogateescape").split(",") if body else []


def _csv_records(
    f: Any, path: str, offset: int, line: int | None = 1, n_fields: int | None = None
) -> Iterator[_CsvRecord]:
    """Every CSV record of the file from `offset` (the start of a record at `line`), each physical line
    accounted for: a record is one line, or several when a quoted field holds line breaks. A line whose
    quote does not close into a well-formed record (strict parsing, the header's field count, at most
    CSV_MAX_RECORD_LINES lines) is a malformed record of that one line, and the next line starts the next
    record: a stray quote never swallows the rows after it. The registration scan and the shard reader both
    read through here, so they agree on every record's row, line and offset. Without `n_fields`, the first
    record (the header) sets it."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    feed = _Feed()
    reader = csv.reader(feed, strict=True)
    pending: deque[tuple[int, int, bytes]] = deque()  # lines read ahead and given back
    source = _lines(f)
    pos, next_line = offset, line or 0  # line None: unknown (an old registry entry), bytes name the place

    def take() -> tuple[int, int, bytes] | None:
        nonlocal pos, next_line
        if pending:
            return pending.popleft()
        raw = next(source, None)
        if raw is None:
            return None
        item = (pos, next_line, raw)
        pos, next_line = pos + len(raw), next_line + 1
        return item

    while (first := take()) is not None:
        simple = _simple_csv_line(first[2])
        if simple is not None:  # the common case, parsed as csv would, without a reader per line
            if n_fields is None:
                n_fields = len(simple)
            yield _CsvRecord(first[0], first[1], first[2], simple)
            continue
        chunk = [first]
        while True:
            feed.lines = [b.decode("utf-8", "surrogateescape") for _, _, b in reversed(chunk)]
            try:
                rows = list(reader)  # every record of the chunk's lines (the reader resets per record)
                error = None
            except csv.Error as exc:
                rows, error = [], str(exc)
            open_quote = error is not None and error.startswith("unexpected end of data")
            if open_quote and len(chunk) < CSV_MAX_RECORD_LINES and (more := take()) is not None:
                chunk.append(more)
                continue
            break
        ok = error is None and len(rows) == 1
        if ok and len(chunk) > 1 and n_fields is not None and len(rows[0]) != n_fields:
            ok = False  # a quote that closes lines later into a wrong record: the first line was the stray
        if ok:
            if n_fields is None:
                n_fields = len(rows[0])
            yield _CsvRecord(first[0], first[1], b"".join(b for _, _, b in chunk), rows[0])
            continue
        pending.extendleft(reversed(chunk[1:]))
        at = f"{path} line {first[1]}" if line is not None else f"{path} byte {first[0]}"
        if open_quote or len(chunk) > 1:
            why = (
                f"unbalanced_quote: {at}: a quoted field opened on this line does not close into"
                f" a record (within {CSV_MAX_RECORD_LINES} lines); the next line is read as its own row"
            )
        else:
            why = f"invalid_csv: {at}: {error or f'{len(rows)} records on one line'}"
        yield _CsvRecord(first[0], first[1], first[2], None, why)


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
    lines: list[int] = []
    shard_hashes = _ShardHasher()
    n = 0
    with fs.open(path, "rb") as raw_file:
        f = _HashingReader(raw_file)
        if fmt == "jsonl":
            offset = 0
            for line_no, line in enumerate(_lines(f, _CHUNK), 1):
                if line.strip():
                    if n % shard_rows == 0:
                        offsets.append(offset)
                        lines.append(line_no)
                        shard_hashes.start_shard()
                    n += 1
                shard_hashes.update(line)
                offset += len(line)
            return SourceScan(fmt, n, offsets, [], lines, shard_hashes.finish(), f.drain())
        if fmt == "csv":
            records = _csv_records(f, path, 0)
            header = next(records, None)
            if header is None:
                raise SourceFormatError(f"{path}: empty CSV file (no header row)")
            columns = _csv_header(header, path)
            for record in records:
                if n % shard_rows == 0:
                    offsets.append(record.offset)
                    lines.append(record.line)
                    shard_hashes.start_shard()
                shard_hashes.update(record.raw)
                n += 1
            return SourceScan(fmt, n, offsets, columns, lines, shard_hashes.finish(), f.drain())
        prefix = "annotations.item" if fmt == "coco" else "item"
        for _ in _json_items(f, prefix, path):
            n += 1
        sha256 = f.drain()
    if fmt == "coco" and n == 0:
        with fs.open(path, "rb") as f:
            keys = {k for p, e, k in ijson.parse(f) if p == "" and e == "map_key"}
        if "annotations" not in keys:
            raise SourceFormatError(f"{path}: a JSON object without 'annotations' is not a COCO captions file")
    return SourceScan(fmt, n, None, sha256=sha256)


# -- reading one shard ----------------------------------------------------------------------
def iter_records(
    fs: fsspec.AbstractFileSystem,
    path: str,
    fmt: str,
    start: int,
    end: int,
    offset: int | None = None,
    line: int | None = None,
) -> Iterator[RawRecord]:
    """Records `start <= row < end` of the file, streamed; `offset` and `line` (from the registration
    scan) locate row `start` in a line-based file."""
    if fmt == "parquet":
        yield from _parquet_records(fs, path, start, end)
        return
    with fs.open(path, "rb") as f:
        if fmt == "jsonl":
            yield from _jsonl_records(f, path, start, end, offset, line)
        elif fmt == "csv":
            yield from _csv_dict_records(f, path, start, end, offset, line)
        elif fmt == "coco":
            yield from _coco_records(fs, f, path, start, end)
        elif fmt == "json":
            for row, item in enumerate(itertools.islice(_json_items(f, "item", path), start, end), start):
                yield RawRecord(row, item)
        else:
            raise SourceFormatError(f"{path}: unknown format {fmt!r}")


def _jsonl_records(
    f: Any, path: str, start: int, end: int, offset: int | None, line: int | None
) -> Iterator[RawRecord]:
    import json

    row, line_no = start, line
    if offset is not None:
        f.seek(offset)
    else:  # no index: skip from the top
        row, line_no = 0, 1
    for raw in _lines(f):
        if row >= end:
            break
        if raw.strip():  # as the registration scan counts: blank lines are no records
            if row >= start:
                yield _jsonl_record(json, raw, path, row, line_no)
            row += 1
        line_no = None if line_no is None else line_no + 1


def _jsonl_record(json: Any, raw: bytes, path: str, row: int, line: int | None) -> RawRecord:
    """One JSONL line: whatever decoding it raises (bad UTF-8, bad JSON, an integer past Python's digit
    limit, nesting past the recursion limit) makes it one malformed record naming the file and line."""
    at = where(path, row, line)
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        return RawRecord(
            row, error=f"undecodable_text: {at}: invalid UTF-8 at byte {exc.start} of the line", line=line
        )
    try:
        return RawRecord(row, json.loads(text), line=line)
    except json.JSONDecodeError as exc:
        return RawRecord(row, error=f"invalid_json: {at}: {exc}", line=line)
    except RecursionError:
        return RawRecord(row, error=f"invalid_json: {at}: nested too deeply to parse", line=line)
    except Exception as exc:  # noqa: BLE001 - e.g. ValueError: an integer with more digits than int() allows
        return RawRecord(row, error=f"invalid_json: {at}: {type(exc).__name__}: {one_line(exc)}", line=line)


def _csv_header(header: _CsvRecord, path: str) -> list[str]:
    """The header's column names; a header that is no CSV record, or not UTF-8 text, is a file error in one line
    (its names go into the registry, and caption files are UTF-8)."""
    if header.values is None:
        raise SourceFormatError(f"{path}: unreadable CSV header: {header.error}")
    names = [header.values[0].removeprefix("\ufeff"), *header.values[1:]] if header.values else []
    if (bad := _ESCAPED_BYTE.search("\0".join(names))) is not None:
        raise SourceFormatError(
            f"{path} line {header.line}: the CSV header is not UTF-8 text (byte 0x{ord(bad[0]) - 0xDC00:02x});"
            " caption files must be UTF-8 (convert it, e.g. iconv -f latin1 -t UTF-8)"
        )
    return names


def _csv_dict_records(
    f: Any, path: str, start: int, end: int, offset: int | None, line: int | None
) -> Iterator[RawRecord]:
    records = _csv_records(f, path, 0)
    header_record = next(records)
    header = _csv_header(header_record, path)
    if offset is not None:
        f.seek(offset)
        # Without the line of row `start` (a registry entry from before lines were recorded) the
        # numbering restarts; the row number stays exact.
        records = _csv_records(f, path, offset, line, len(header_record.values))
    else:
        records = itertools.islice(records, start, None)
    for row, record in zip(range(start, end), records):
        at_line = record.line if (offset is None or line) else None
        if record.values is None:
            yield RawRecord(row, error=record.error, line=at_line)
        elif not record.raw.isascii() and (bad := _ESCAPED_BYTE.search("".join(record.values))):
            # as in the JSON formats: bytes that are not UTF-8 anywhere in the record make it malformed
            at = where(path, row, at_line)
            yield RawRecord(
                row, error=f"undecodable_text: {at}: invalid UTF-8 (byte 0x{ord(bad[0]) - 0xDC00:02x})", line=at_line
            )
        elif len(record.values) != len(header):
            yield RawRecord(
                row,
                error=f"wrong_field_count: {where(path, row, at_line)}: {len(record.values)} fields,"
                f" header has {len(header)}",
                line=at_line,
            )
        else:
            yield RawRecord(row, dict(zip(header, record.values)), line=at_line)


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
        return MalformedRow(
            record.row,
            "missing_caption",
            f"no {'gpt turn' if is_llava else repr(fields.caption)} in {_excerpt(value)}",
        )
    if not isinstance(caption, str):
        return MalformedRow(record.row, "caption_not_string", f"{type(caption).__name__}: {_excerpt(caption)}")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from JSON escapes or undecodable CSV bytes
        return MalformedRow(record.row, "undecodable_text", f"invalid code point at {exc.start}: {_excerpt(caption)}")
    if len(caption) > fields.max_caption_chars:
        return MalformedRow(
            record.row, "caption_too_long", f"{len(caption)} chars > max_caption_chars={fields.max_caption_chars}"
        )
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
