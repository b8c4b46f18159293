"""Cross-shard duplicate removal: consolidated indexes, any materialization order, NUL-ended keys."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from synthvlm_assets.captions import dedup
from synthvlm_assets.captions.dedup import DedupIndex, DedupStore, _Segment, first_occurrences
from synthvlm_assets.captions.filters import RuleFilterSettings
from synthvlm_assets.captions.sources import CaptionFields
from synthvlm_assets.captions.stages import curate_range, load_raw_shard
from synthvlm_assets.shards import ShardRegistry
from synthvlm_assets.storage import StorageRoot

CAPTIONS = [
    f"A photo of a {c} {a} standing near the old stone wall."
    for c in ("red", "blue", "green", "small", "large")
    for a in ("dog", "cat", "horse", "bird")
]


def test_index_keeps_first_occurrence_and_handles_nul_ended_keys():
    keys = [b"\x01" * 15 + b"\x00", b"\x01" * 15 + b"\x02", b"\x00" * 16, b"\x01" * 15 + b"\x00"]
    t1 = first_occurrences(keys[:2], file_seq=1, rows=[5, 6])
    t2 = first_occurrences(keys[2:], file_seq=2, rows=[0, 1])
    index = DedupIndex.from_tables([t1, t2], {1: "a", 2: "b"})
    assert len(index) == 3
    assert index.get(keys[0]) == "a:5"  # the NUL-ended key, first in file a
    assert index.get(keys[1]) == "a:6"
    assert index.get(b"\x00" * 16) == "b:0"
    assert index.get(b"\x02" * 16) is None
    assert index.get(b"\x01" * 15 + b"\x01") is None
    (segment,) = index.segments
    again = DedupIndex(_Segment.from_sorted_table(segment.table()), index.tags)  # round trip through Arrow
    assert np.array_equal(again.segments[0].keys, segment.keys) and again.get(keys[0]) == "a:5"
    # a consolidated (earlier) segment answers first; the later one only has keys the earlier lacks
    later = _Segment.from_tables([first_occurrences([keys[1], b"\x07" * 16], file_seq=3, rows=[0, 1])])
    later = later.select(~segment.contains(later.keys))
    both = DedupIndex(later, {1: "a", 2: "b", 3: "c"}, earlier=segment)
    assert both.get(keys[1]) == "a:6" and both.get(b"\x07" * 16) == "c:1" and len(both) == 4
    merged = segment.union(_Segment.from_tables([first_occurrences([keys[1], b"\x07" * 16], file_seq=3, rows=[0, 1])]))
    assert len(merged.keys) == 4 and list(merged.keys) == sorted(merged.keys)


def test_range_index_answers_like_a_dict_of_first_occurrences_in_few_segments():
    """A run's index of the keys its shards added: the first occurrence wins, as in a dict kept by
    registration order, in O(log n) sorted segments (compact: a 1,000,000-caption range held 180 MB as a dict)."""
    rng = random.Random(1)
    pool = [rng.randbytes(15) + bytes([b]) for b in (0, 1, 2) for _ in range(200)]  # NUL-ended keys too
    before = DedupIndex.from_tables([first_occurrences(pool[:50], file_seq=0, rows=range(50))], {0: "f0"})
    index, expected = dedup.RangeIndex(before), {k: f"f0:{r}" for r, k in enumerate(pool[:50])}
    for seq in range(1, 120):
        keys = rng.sample(pool, rng.randint(0, 20))
        probe = keys + [rng.randbytes(16)]
        assert index.earlier_ids(probe) == [expected.get(k) for k in probe]
        index.before.tags[seq] = f"f{seq}"  # the registry's file tags, as stages.py passes them
        table = first_occurrences(keys, file_seq=seq, rows=range(100, 100 + len(keys)))
        for k, r in zip(table.column("dedup_key").to_pylist(), table.column("source_row").to_pylist()):
            expected.setdefault(k, f"f{seq}:{r}")
        index.add(table)
    assert len(index.added.segments) <= 2 * np.log2(len(pool)) + 1
    assert index.earlier_ids(pool) == [expected.get(k) for k in pool]


@pytest.fixture()
def many_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(dedup, "CONSOLIDATE_EVERY", 4)
    rng = random.Random(0)
    rows = [{"id": i, "caption": rng.choice(CAPTIONS)} for i in range(300)]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled"])
def test_curation_is_order_independent_with_consolidated_indexes(tmp_path, many_shards, order):
    path, rows = many_shards
    registry = ShardRegistry(StorageRoot(str(tmp_path / order)))
    _, shards = registry.register_file(str(path), 13)  # 24 shards: indexes at 4, 8, ... 20
    fields, settings = CaptionFields(), RuleFilterSettings()
    sequence = {"forward": shards, "reverse": shards[::-1], "shuffled": random.Random(2).sample(shards, len(shards))}[
        order
    ]
    for shard in sequence:  # loaded in any order, then curated in any order, shard by shard
        load_raw_shard(registry, shard, fields)
    for shard in sequence:
        [outcome] = curate_range(registry, [shard.key], fields, settings, load_raw=False, workers=1)
        assert outcome.error is None and outcome.curated is not None
    kept = [
        r for s in shards for r in registry.storage.read_partition(f"curated_captions/{s.key}", "kept").to_pylist()
    ]
    first_rows = {}
    for r in rows:
        first_rows.setdefault(r["caption"], r["id"])
    assert sorted(r["source_row"] for r in kept) == sorted(first_rows.values())
    index_files = registry.storage.list(f"{DedupStore(registry.storage, fields).prefix}/index")
    assert index_files, "consolidated indexes were written"
    rejected = [
        r for s in shards for r in registry.storage.read_partition(f"curated_captions/{s.key}", "rejected").to_pylist()
    ]
    tag = shards[0].file_tag
    assert all(r["duplicate_of"] == f"{tag}:{first_rows[r['caption']]}" for r in rejected)


def _published(root: StorageRoot, shards) -> list[bytes]:
    return [
        root.manifest(f"curated_captions/{s.key}")["files"][t]["sha256"] for s in shards for t in ("kept", "rejected")
    ]


def test_a_run_over_many_shards_publishes_what_one_run_per_shard_does(tmp_path, many_shards):
    """curate_range over all shards with a pool of processes, over two ranges, and shard by shard: the same
    bytes (dedup across the range boundary included), every shard materialized once, in registration order."""
    path, _ = many_shards
    fields, settings = CaptionFields(), RuleFilterSettings()
    published = {}
    for name, groups, workers in [("one_run", None, 2), ("two_runs", 7, 2), ("per_shard", 1, 1)]:
        registry = ShardRegistry(StorageRoot(str(tmp_path / name)))
        _, shards = registry.register_file(str(path), 20)
        keys = [s.key for s in shards]
        ranges = [keys] if groups is None else [keys[i : i + groups] for i in range(0, len(keys), groups)]
        seen = []
        for part in ranges:
            for outcome in curate_range(registry, part, fields, settings, workers=workers):
                assert outcome.error is None and outcome.raw is not None and outcome.curated is not None
                assert (
                    outcome.raw.captions
                    == outcome.curated.captions_in
                    == outcome.curated.kept + outcome.curated.rejected
                )
                seen.append(outcome.shard.key)
        assert seen == keys
        published[name] = _published(registry.storage, shards)
    assert published["one_run"] == published["two_runs"] == published["per_shard"]


def test_a_shard_whose_file_vanished_fails_alone(tmp_path, many_shards):
    """A bad shard in a range fails with a one-line error naming it and its file; the other shards of the
    range (before and after it) are materialized; it is not worth a retry."""
    path, _ = many_shards
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in enumerate(CAPTIONS)))
    registry = ShardRegistry(StorageRoot(str(tmp_path / "root")))
    _, first = registry.register_file(str(path), 100)
    _, middle = registry.register_file(str(other), 100)
    later = tmp_path / "later.jsonl"
    later.write_text(path.read_text())  # all duplicates of the first file
    _, last = registry.register_file(str(later), 100)
    assert first and middle and last
    other.unlink()
    outcomes = list(
        curate_range(
            registry, [s.key for s in first + middle + last], CaptionFields(), RuleFilterSettings(), workers=2
        )
    )
    failed = [o for o in outcomes if o.error]
    assert [o.shard.key for o in failed] == [s.key for s in middle]
    assert "other.jsonl" in failed[0].error and "\n" not in failed[0].error and not failed[0].retryable
    assert all(o.curated is not None for o in outcomes if o.shard in first + last)
    assert sum(o.curated.rejected_by.get("duplicate", 0) for o in outcomes if o.shard in last) == 300


def test_dedup_of_earlier_shards_survives_bad_and_changed_files(tmp_path):
    """An earlier shard whose file vanished or changed since registration can never publish: it neither blocks
    later shards nor feeds them its new text. One not loaded yet counts with its registered (verified) text."""
    fields, settings = CaptionFields(), RuleFilterSettings()
    files = [tmp_path / f"{n}.jsonl" for n in ("first", "second", "third", "fourth")]
    texts = [CAPTIONS[:10], CAPTIONS[10:15], CAPTIONS[15:], CAPTIONS]
    for f, captions in zip(files, texts):
        f.write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in enumerate(captions)))
    registry = ShardRegistry(StorageRoot(str(tmp_path / "root")))
    keys = [registry.register_file(str(f), 100)[1][0].key for f in files]
    files[1].unlink()  # deleted before it was loaded
    files[2].write_text(json.dumps({"id": 0, "caption": "A brand new caption written after registration."}) + "\n")
    # the first file is not loaded yet: its captions still win (from its verified, unchanged source)
    [fourth] = curate_range(registry, [keys[3]], fields, settings, workers=1)
    assert fourth.error is None
    assert fourth.curated.rejected_by == {"duplicate": 10} and fourth.curated.kept == len(CAPTIONS) - 10
    outcomes = list(curate_range(registry, keys[:3], fields, settings, workers=1))
    assert [o.error is None for o in outcomes] == [True, False, False]
    assert "no longer exists" in outcomes[1].error and "changed since it was registered" in outcomes[2].error
