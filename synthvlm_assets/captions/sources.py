"""Readers of raw caption pools (SPEC §1): JSON list, JSONL, Parquet, CSV, COCO `captions_*.json` and
LLaVA conversation JSON, local or `s3://`, streamed so memory never grows with the file.

A file is scanned once when it is registered (row count, and byte offsets of each shard's first row
for line-based formats so a shard read seeks straight to it); a shard read then yields only its rows.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import itertools
import json
import posixpath
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


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
# A JSON record nested deeper than this is malformed, in every JSON format alike: far below the recursion limit
# json.loads stops at, so the verdict does not depend on the caller's stack; a caption record needs 3 or 4 levels.
JSON_MAX_NESTING = 256
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


_JSON_WS = re.compile(r"[ \t\r\n]*")
_OUTSIDE_STRING = re.compile(r'[\[{]+|[\]}]+|[,:"]')
_INSIDE_STRING = re.compile(r'["\\]')
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, kept by the surrogateescape decoding
_DECODER = json.JSONDecoder()


def _bad_byte(found: re.Match[str]) -> str:
    """The byte that a surrogateescape decoding kept (a match of _ESCAPED_BYTE), as 0x.. for a message."""
    return f"0x{ord(found[0]) - 0xDC00:02x}"


def _nesting(text: str) -> int:
    """How deep the brackets of a JSON text nest (those inside strings not counted)."""
    steps = (1 if b in "[{" else -1 for b in _BRACKET.findall(_STRING.sub("", text)))
    return max(itertools.accumulate(steps), default=0)


def _text_problem(text: str) -> tuple[str, str] | None:
    """Why a record's JSON text is malformed whatever json would make of it: bytes that are not UTF-8, or
    nesting deeper than JSON_MAX_NESTING (counted only where there are that many brackets at all)."""
    if (bad := _ESCAPED_BYTE.search(text)) is not None:
        return "undecodable_text", f"invalid UTF-8 (byte {_bad_byte(bad)} at character {bad.start()})"
    if len(text) <= 2 * JSON_MAX_NESTING or text.count("[") + text.count("{") <= JSON_MAX_NESTING:
        return None  # too few brackets to nest that deep
    if (depth := _nesting(text)) > JSON_MAX_NESTING:
        return "invalid_json", f"nested too deeply ({depth} levels, at most {JSON_MAX_NESTING})"
    return None


def decode_json_record(text: str, path: str, row: int, line: int | None, jsonl: bool = False) -> RawRecord:
    """One record's JSON text (decoded with surrogateescape), the same in every JSON format: a JSONL line, an
    item of a JSON list or of COCO's annotations. Whatever makes it unreadable (bytes that are not UTF-8, bad
    JSON, deep nesting, an integer past int()'s digit limit) makes it one malformed record naming file and
    place, never a failed file or shard."""
    at = where(path, row, line)
    if (problem := _text_problem(text)) is not None:
        return RawRecord(row, error=f"{problem[0]}: {at}: {problem[1]}", line=line)
    try:
        return RawRecord(row, json.loads(text), line=line)
    except json.JSONDecodeError as exc:
        hint = ""
        if jsonl and exc.pos >= len(text.rstrip()):  # e.g. a lone "{": one line of a pretty-printed record
            hint = " (the line ends inside a JSON value: JSONL holds one whole record per line)"
        return RawRecord(row, error=f"invalid_json: {at}: {exc}{hint}", line=line)
    except RecursionError:  # only on an already deep stack: JSON_MAX_NESTING is far below the limit
        return RawRecord(row, error=f"invalid_json: {at}: nested too deeply to parse", line=line)
    except Exception as exc:  # noqa: BLE001 - e.g. ValueError: an integer with more digits than int() allows
        return RawRecord(row, error=f"invalid_json: {at}: {type(exc).__name__}: {one_line(exc)}", line=line)


class _JsonRecords:
    """The records of a JSON list, or of the list under one top-level key of a JSON object (COCO's "annotations"
    or "images"), streamed. json decodes each record where it stands (raw_decode, at C speed); where it cannot
    (a record across a chunk's end, bad JSON, deep nesting, an integer past int()'s digit limit) the record's end
    is found by following its strings and brackets, and its text is decoded alone (decode_json_record): one
    malformed record, and the records after it are read. Broken structure around the records (a missing comma,
    a truncated file) is a SourceFormatError naming the line and the last complete record. With `to_end` False
    (a shard read, after the registration scan checked the whole file) reading stops after the key's list."""

    def __init__(self, f: Any, path: str, key: str | None = None, to_end: bool = True) -> None:
        self.f, self.path, self.key, self.to_end = f, path, key, to_end
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")("surrogateescape")  # BOM dropped, bad bytes kept
        self.buf, self.pos, self.eof = "", 0, False
        self.escaped = False  # whether the buffer holds a byte that is not UTF-8
        self.mark: int | None = None  # where the record being read starts: kept in the buffer
        self.line, self.line_pos = 1, 0  # the line of buffer position line_pos
        self.rows = 0  # records of `key` so far
        self.found_key = key is None
        self.counting = False  # count the records only (the registration scan): no verdicts, nothing yielded

    def _fill(self) -> bool:
        """Read on; what lies before the current record (or position) is let go. False at the end."""
        if self.eof:
            return False
        keep = self.pos if self.mark is None else min(self.mark, self.pos)
        self._line_at(keep)
        keep = min(keep, self.line_pos)  # a CR whose line is not counted yet stays
        chunk = self.f.read(max(_CHUNK, len(self.buf) - keep))  # doubling: a long record costs linear time
        self.eof = not chunk
        text = self.decoder.decode(chunk, final=self.eof)
        self.buf = self.buf[keep:] + text
        self.escaped = _ESCAPED_BYTE.search(self.buf) is not None
        self.pos -= keep
        self.line_pos -= keep
        if self.mark is not None:
            self.mark -= keep
        return bool(text) or not self.eof

    def _line_at(self, pos: int) -> int:
        """The line of buffer position `pos`, lines ended as universal newlines end them."""
        if pos > self.line_pos:
            end = pos
            if self.buf[pos - 1] == "\r" and self.buf[pos : pos + 1] in ("\n", ""):
                end -= 1  # a CRLF cut here, or a CR whose LF may come with the next chunk: counted later
            b, start = self.buf, self.line_pos
            self.line += b.count("\n", start, end) + b.count("\r", start, end) - b.count("\r\n", start, end)
            self.line_pos = end
        return self.line

    def _fail(self, what: str) -> SourceFormatError:
        line = self._line_at(min(self.pos, len(self.buf)))
        done = f"after record {self.rows - 1} (0-based)" if self.rows else "before the first record"
        of = f" of '{self.key}'" if self.key else ""
        return SourceFormatError(f"{self.path} line {line}: invalid JSON: {what}, {done}{of}")

    def _peek(self) -> str:
        """The next character that is not JSON whitespace, not consumed ("" at the end of the file)."""
        while True:
            self.pos = _JSON_WS.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf) or not self._fill():
                return self.buf[self.pos : self.pos + 1]

    def _expect(self, char: str, what: str) -> None:
        if (found := self._peek()) != char:
            raise self._fail(f"expected {what}, found {found!r}" if found else f"the file ends before {what}")
        self.pos += 1

    def _skip_value(self) -> str:
        """Past one value, following only strings and brackets, to the `,` `]` `}` or `:` after it at its own
        level (not consumed); returns that character. A run of brackets is one step: deep nesting costs little."""
        depth, in_string = 0, False
        while True:
            found = (_INSIDE_STRING if in_string else _OUTSIDE_STRING).search(self.buf, self.pos)
            if found is None or (found[0] == "\\" and found.end() == len(self.buf)):  # an escape needs its next char
                self.pos = len(self.buf) if found is None else found.start()
                if not self._fill():
                    raise self._fail(f"the file ends inside {'a string' if in_string else 'a value'}")
                continue
            self.pos, token = found.start(), found[0]
            if in_string:  # a string longer than the buffer, or not closed: escape by escape
                self.pos += 2 if token == "\\" else 1
                in_string = token == "\\"
            elif token == '"':
                whole = _STRING.match(self.buf, self.pos)  # the common case: the whole string is in the buffer
                self.pos = self.pos + 1 if whole is None else whole.end()
                in_string = whole is None
            elif token[0] in "[{":
                depth += len(token)
                self.pos += len(token)
            elif token[0] in "]}":
                if depth < len(token):  # the closer at depth 0 ends the list or object the value is in
                    self.pos += depth
                    return self.buf[self.pos]
                depth -= len(token)
                self.pos += len(token)
            elif depth == 0:
                return token
            else:  # a `,` or `:` inside the value
                self.pos += 1

    def _slow_record(self, keep: bool) -> tuple[RawRecord | None, str]:
        """The record at the current position, its end found by its strings and brackets, decoded alone (None
        unless `keep`); and the `,` or `]` after it (not consumed)."""
        self.mark = self.pos
        after = self._skip_value()
        line = self._line_at(self.mark)
        text = self.buf[self.mark : self.pos].rstrip(" \t\r\n")
        self.mark = None
        if after not in ",]":
            raise self._fail(f"expected ',' or ']' after a record, found {after!r}")
        return (decode_json_record(text, self.path, self.rows, line) if keep else None), after

    def _items(self, keep: bool) -> Iterator[RawRecord]:
        """The items of the list whose `[` was just consumed, through its `]`; yielded if `keep`."""
        if self._peek() == "]":
            self.pos += 1
            return
        while True:
            if (first := self._peek()) in ("", ",", "]"):
                raise self._fail(f"expected a record, found {first!r}" if first else "the file ends inside a list")
            # The common case, in a tight loop: record after record that json decodes where it stands.
            buf, pos, size = self.buf, self.pos, len(self.buf)
            while pos < size:
                try:
                    value, end = _DECODER.raw_decode(buf, pos)
                    after = _JSON_WS.match(buf, end).end()  # type: ignore[union-attr]
                except (ValueError, RecursionError):  # bad or hostile JSON: the slow path says why
                    break
                if after == size or buf[after] not in ",]":  # cut by the chunk's end, or not one value
                    break
                self.pos = after + 1
                if keep and self.counting:
                    self.rows += 1
                elif keep:
                    row, self.rows = self.rows, self.rows + 1
                    # a record with bytes that are not UTF-8, or long enough to nest too deeply, is checked
                    problem = _text_problem(buf[pos:end]) if self.escaped or end - pos > 2 * JSON_MAX_NESTING else None
                    if problem is None:
                        yield RawRecord(row, value)
                    else:
                        at = where(self.path, row, line := self._line_at(pos))
                        yield RawRecord(row, error=f"{problem[0]}: {at}: {problem[1]}", line=line)
                if buf[after] == "]":
                    return
                pos = self.pos = _JSON_WS.match(buf, self.pos).end()  # type: ignore[union-attr]
            else:
                continue  # the chunk ends between records: _peek reads on
            if (first := buf[pos]) in ",]":  # an empty place in the list: no record, broken structure
                raise self._fail(f"expected a record, found {first!r}")
            record, after_char = self._slow_record(keep and not self.counting)
            self.pos += 1
            if keep:
                self.rows += 1
            if record is not None:
                yield record
            if after_char == "]":
                return

    def count(self) -> int:
        """How many records there are, the whole file checked as when reading it."""
        self.counting = True
        for _ in self:
            pass
        return self.rows

    def __iter__(self) -> Iterator[RawRecord]:
        if self.key is None:
            self._expect("[", "'[' (a list of records)")
            yield from self._items(True)
        else:
            self._expect("{", "'{'")
            while self._peek() != "}":
                if self._peek() != '"':
                    raise self._fail("expected a key in the top-level object")
                self.mark = self.pos
                if self._skip_value() != ":":
                    raise self._fail("expected ':' after a key")
                try:
                    name = json.loads(self.buf[self.mark : self.pos])
                except ValueError as exc:
                    raise self._fail(f"unreadable key ({exc})") from None
                self.mark = None
                self.pos += 1
                if (first := self._peek()) == "[":  # a list is read item by item: it may be big
                    self.pos += 1
                    self.found_key = self.found_key or name == self.key
                    yield from self._items(name == self.key)
                    if name == self.key and not self.to_end:
                        return
                elif first in ("", ",", "}", "]", ":"):
                    raise self._fail(f"expected a value after key {name!r}")
                else:
                    self._skip_value()
                if self._peek() != ",":
                    break
                self.pos += 1
                if self._peek() != '"':
                    raise self._fail("expected a key after ','")
            self._expect("}", "',' or '}' in the top-level object")
        if self._peek():
            raise self._fail("extra data after the end")


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
        records = _JsonRecords(f, path, "annotations" if fmt == "coco" else None)
        n = records.count()
        sha256 = f.drain()
    if not records.found_key:
        raise SourceFormatError(f"{path}: a JSON object without an 'annotations' list is not a COCO captions file")
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
            yield from _coco_records(f, path, start, end)
        elif fmt == "json":
            yield from itertools.islice(_JsonRecords(f, path), start, end)
        else:
            raise SourceFormatError(f"{path}: unknown format {fmt!r}")


def _jsonl_records(
    f: Any, path: str, start: int, end: int, offset: int | None, line: int | None
) -> Iterator[RawRecord]:
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
                text = raw.decode("utf-8", "surrogateescape").lstrip("\ufeff")
                yield decode_json_record(text, path, row, line_no, jsonl=True)
            row += 1
        line_no = None if line_no is None else line_no + 1


def _csv_header(header: _CsvRecord, path: str) -> list[str]:
    """The header's column names; a header that is no CSV record, or not UTF-8 text, is a file error in one line
    (its names go into the registry, and caption files are UTF-8)."""
    if header.values is None:
        raise SourceFormatError(f"{path}: unreadable CSV header: {header.error}")
    names = [header.values[0].removeprefix("\ufeff"), *header.values[1:]] if header.values else []
    if (bad := _ESCAPED_BYTE.search("\0".join(names))) is not None:
        raise SourceFormatError(
            f"{path} line {header.line}: the CSV header is not UTF-8 text (byte {_bad_byte(bad)});"
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
            yield RawRecord(row, error=f"undecodable_text: {at}: invalid UTF-8 (byte {_bad_byte(bad)})", line=at_line)
        elif len(record.values) != len(header):
            yield RawRecord(
                row,
                error=f"wrong_field_count: {where(path, row, at_line)}: {len(record.values)} fields,"
                f" header has {len(header)}",
                line=at_line,
            )
        else:
            yield RawRecord(row, dict(zip(header, record.values)), line=at_line)


def _coco_records(f: Any, path: str, start: int, end: int) -> Iterator[RawRecord]:
    images = {}
    # Image entries are no caption rows: a malformed one only links no image.
    for image in _JsonRecords(f, path, "images", to_end=False):
        if isinstance(image.value, dict) and "id" in image.value:
            try:
                images[image.value["id"]] = image.value.get("coco_url") or image.value.get("file_name")
            except TypeError:  # an unhashable id
                pass
    f.seek(0)
    for record in itertools.islice(_JsonRecords(f, path, "annotations", to_end=False), start, end):
        if isinstance(ann := record.value, dict):
            try:
                image = images.get(ann.get("image_id"))
            except TypeError:  # an unhashable image_id
                image = None
            record.value = {**ann, "image_url": image, "source": "coco"}
        yield record


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
