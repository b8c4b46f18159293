"""Exact-duplicate removal across shards: the first occurrence in registration order wins.

Every curated shard stores the dedup keys (128-bit hashes of the normalised text) of its distinct
captions. Curating shard N needs the keys of shards 0..N-1: they come from a consolidated, sorted
index covering a prefix of the registered shards (rebuilt every `CONSOLIDATE_EVERY` shards, so a
1,000-shard pool reads one index plus a few small files, not 999 files), plus the per-shard files
after that prefix. A shard whose keys are not stored yet (it was not curated yet) gets them from
its published raw_caption_pool partition, or, not loaded yet, from its source file verified unchanged
since registration, so the answer never depends on the order in which shards are materialized; one
that can never load (its file changed or vanished) contributes no keys and blocks nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from synthvlm_assets.captions.normalize import NORMALIZATION_VERSION
from synthvlm_assets.captions.sources import CaptionFields
from synthvlm_assets.shards import Shard, ShardRegistry, ShardRegistryError, read_shard
from synthvlm_assets.storage import ObjectNotFound, StorageRoot

CONSOLIDATE_EVERY = 16
KEYS_SCHEMA = pa.schema([("dedup_key", pa.binary(16)), ("file_seq", pa.int32()), ("source_row", pa.int64())])
_INDEX_NAME = re.compile(r"upto-(\d+)\.parquet$")
_CONSOLIDATED: dict[str, _Segment] = {}


def first_occurrences(keys: Sequence[bytes], file_seq: int, rows: Sequence[int]) -> pa.Table:
    """Keys table of one shard: each distinct key once, at its first row."""
    first: dict[bytes, int] = {}
    for k, r in zip(keys, rows):
        first.setdefault(k, r)
    return pa.table(
        {"dedup_key": list(first), "file_seq": [file_seq] * len(first), "source_row": list(first.values())},
        schema=KEYS_SCHEMA,
    )


def keys_of_raw(raw: pa.Table, file_seq: int) -> pa.Table:
    return first_occurrences(raw.column("dedup_key").to_pylist(), file_seq, raw.column("source_row").to_pylist())


@dataclass
class _Segment:
    """Sorted, unique keys with where each first occurred."""

    keys: np.ndarray  # "S16", sorted
    file_seq: np.ndarray
    rows: np.ndarray

    @classmethod
    def empty(cls) -> _Segment:
        return cls(np.empty(0, "S16"), np.empty(0, np.int32), np.empty(0, np.int64))

    @classmethod
    def from_tables(cls, tables: Sequence[pa.Table]) -> _Segment:
        """Merge key tables given in registration order (np.unique keeps each key's first index)."""
        if not tables:
            return cls.empty()
        t = pa.concat_tables(tables)
        uniq, first = np.unique(_keys_array(t.column("dedup_key")), return_index=True)
        return cls(uniq, t.column("file_seq").to_numpy()[first], t.column("source_row").to_numpy()[first])

    @classmethod
    def from_sorted_table(cls, t: pa.Table) -> _Segment:
        """A consolidated index table, already sorted and unique."""
        return cls(
            _keys_array(t.column("dedup_key")), t.column("file_seq").to_numpy(), t.column("source_row").to_numpy()
        )

    def contains(self, keys: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        return (self.keys[pos] == keys) if len(self.keys) else np.zeros(len(keys), bool)

    def select(self, mask: np.ndarray) -> _Segment:
        return _Segment(self.keys[mask], self.file_seq[mask], self.rows[mask])

    def union(self, later: _Segment) -> _Segment:
        """This segment plus the keys of a later one that it lacks."""
        later = later.select(~self.contains(later.keys))
        keys = np.concatenate([self.keys, later.keys])
        order = np.argsort(keys, kind="stable")
        return _Segment(
            keys[order],
            np.concatenate([self.file_seq, later.file_seq])[order],
            np.concatenate([self.rows, later.rows])[order],
        )

    def table(self) -> pa.Table:
        keys = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(16), len(self.keys), [None, pa.py_buffer(self.keys.tobytes())]
        )
        return pa.table({"dedup_key": keys, "file_seq": self.file_seq, "source_row": self.rows}, schema=KEYS_SCHEMA)


class DedupIndex:
    """First occurrences of the keys of a sequence of shards; `get` answers who had a key first."""

    def __init__(self, segment: _Segment, tags: dict[int, str], earlier: _Segment | None = None) -> None:
        # `earlier` (a consolidated index) covers shards before `segment`'s and shares no key with it.
        self.segments = [s for s in (earlier, segment) if s is not None and len(s.keys)]
        self.tags = tags

    @classmethod
    def from_tables(cls, tables: Sequence[pa.Table], tags: dict[int, str]) -> DedupIndex:
        return cls(_Segment.from_tables(tables), tags)

    def __len__(self) -> int:
        return sum(len(s.keys) for s in self.segments)

    def get(self, key: bytes) -> str | None:
        """The caption_id that had this key first, or None."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[str | None]:
        """`get` for a batch of 16-byte keys, vectorised."""
        out: list[str | None] = [None] * len(keys)
        if not keys:
            return out
        probe = np.array(keys, dtype="S16")  # element-wise numpy comparisons keep trailing NUL bytes
        for seg in self.segments:
            pos = np.minimum(np.searchsorted(seg.keys, probe), len(seg.keys) - 1)
            for i in np.flatnonzero(seg.keys[pos] == probe):
                if out[i] is None:
                    j = pos[i]
                    out[i] = f"{self.tags[int(seg.file_seq[j])]}:{int(seg.rows[j])}"
        return out


class RangeIndex:
    """The index of the shards before a range of shards, plus the keys of the range's shards curated
    so far (in registration order), so a run over many shards reads the stored keys once."""

    def __init__(self, before: DedupIndex) -> None:
        self.before = before
        # The range's keys as disjoint sorted segments, merged as they grow (a binary counter: O(log n) of
        # them): ~28 bytes a key, where a dict of bytes took ~250 (180 MB over a 1,000,000-caption range).
        self.added = DedupIndex(_Segment.empty(), before.tags)

    def earlier_ids(self, keys: Sequence[bytes]) -> list[str | None]:
        ids = self.before.get_many(keys)
        missing = [i for i, found in enumerate(ids) if found is None]
        if missing and self.added.segments:
            for i, found in zip(missing, self.added.get_many([keys[i] for i in missing])):
                ids[i] = found
        return ids

    def add(self, keys: pa.Table) -> None:
        """A shard's keys table (its first occurrences), after every shard before it."""
        new = _Segment.from_tables([keys])
        for seg in self.added.segments:  # an earlier shard's row stays the first occurrence
            new = new.select(~seg.contains(new.keys))
        segments = [*self.added.segments, new] if len(new.keys) else self.added.segments
        while len(segments) > 1 and len(segments[-2].keys) <= 2 * len(segments[-1].keys):
            last = segments.pop()
            segments[-1] = segments[-1].union(last)
        self.added.segments = segments


def _keys_array(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    data = arr.buffers()[1]
    return np.frombuffer(data, dtype="S16", count=len(arr) + arr.offset)[arr.offset :].copy()


_EMPTY_KEYS = KEYS_SCHEMA.empty_table()


class DedupStore:
    """Per-shard key files and consolidated indexes under the storage root."""

    def __init__(self, storage: StorageRoot, fields: CaptionFields) -> None:
        self.storage = storage
        version = hashlib.sha1(f"{NORMALIZATION_VERSION}|{fields}".encode()).hexdigest()[:12]
        self.prefix = f"curated_captions/_dedup/{version}"
        self.fields = fields

    def shard_key(self, shard: Shard) -> str:
        return f"{self.prefix}/shards/{shard.key}.parquet"

    def store(self, shard: Shard, keys: pa.Table) -> None:
        self.storage.write_parquet(self.shard_key(shard), keys)

    def _read(self, key: str) -> pa.Table | None:
        try:
            return self.storage.read_parquet(key)
        except ObjectNotFound:
            return None

    def shard_keys(self, shard: Shard, registry: ShardRegistry) -> pa.Table | None:
        """An earlier shard's keys: what it published (its stored keys, or its raw_caption_pool partition's),
        or, not loaded yet, from its source file once that is verified unchanged since registration (so a
        rewritten file never feeds its new text into later shards). None when it can never publish (its
        file changed or vanished: its rows are in no table, so no later row can duplicate one)."""
        cached = self._read(self.shard_key(shard))
        if cached is not None:
            return cached
        raw_prefix = f"raw_caption_pool/{shard.key}"
        if self.storage.manifest(raw_prefix) is not None:
            raw = self.storage.read_partition(raw_prefix, "captions", columns=["dedup_key", "source_row"])
        else:
            try:
                registry.check_unchanged(shard)
            except ShardRegistryError:
                return None
            raw = read_shard(shard, self.fields, registry.source_fs(shard.uri))[0]
        keys = keys_of_raw(raw, shard.file_seq)
        self.store(shard, keys)
        return keys

    def _consolidated(self, key: str) -> _Segment | None:
        """A consolidated index; immutable once written, so a process keeps the last one it read."""
        uri = self.storage.uri(key)
        if uri not in _CONSOLIDATED:
            table = self._read(key)
            if table is None:
                return None
            _CONSOLIDATED.clear()
            _CONSOLIDATED[uri] = _Segment.from_sorted_table(table)
        return _CONSOLIDATED[uri]

    def earlier_index(self, earlier: Sequence[Shard], registry: ShardRegistry) -> DedupIndex:
        """The index of every key in `earlier` (the shards registered before the one being curated)."""
        n = len(earlier)
        covered, base = 0, None
        for key in reversed(self.storage.list(f"{self.prefix}/index")):
            m = _INDEX_NAME.search(key)
            if m and int(m.group(1)) <= n:
                base = self._consolidated(key)
                if base is not None:
                    covered = int(m.group(1))
                    break
        if self.storage.is_local:
            found = [self.shard_keys(s, registry) for s in earlier[covered:]]
        else:
            with ThreadPoolExecutor(max_workers=8) as pool:  # object stores answer small GETs in parallel
                found = list(pool.map(lambda s: self.shard_keys(s, registry), earlier[covered:]))
        rest = [t if t is not None else _EMPTY_KEYS for t in found]
        tail = _Segment.from_tables(rest)
        if base is not None:
            tail = tail.select(~base.contains(tail.keys))
        # Registration order is append-only, so the index of the first k shards never changes:
        # publish it at multiples of CONSOLIDATE_EVERY for every later shard to start from.
        upto = n // CONSOLIDATE_EVERY * CONSOLIDATE_EVERY
        if upto > covered:
            head = tail if upto == n else _Segment.from_tables(rest[: upto - covered])
            head = base.union(head) if base is not None else head
            self.storage.write_parquet(f"{self.prefix}/index/upto-{upto:08d}.parquet", head.table())
        return DedupIndex(tail, registry.file_tags(), earlier=base)
