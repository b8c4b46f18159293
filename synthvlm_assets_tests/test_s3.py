"""The same code against a real S3-compatible server (SeaweedFS `weed mini` on 127.0.0.1)."""

from __future__ import annotations

import json

import pytest
import s3fs
from dagster import AssetKey, instance_for_test, materialize

from synthvlm_assets.defs.build import Settings, build_definitions
from synthvlm_assets.defs.captions import caption_curation
from synthvlm_assets.defs.partitions import caption_shards
from synthvlm_assets.query import connect
from synthvlm_assets.storage import StorageError, StorageRetry, StorageRoot

from .test_graph import coco_subset_jsonl, reference


def test_storage_root_on_s3_round_trip(seaweedfs):
    bucket = seaweedfs.make_bucket()
    root = StorageRoot(f"s3://{bucket}/prefix", s3_endpoint_url=seaweedfs.endpoint)
    root.write_json("a/b.json", {"x": 1})
    assert root.read_json("a/b.json") == {"x": 1}
    assert root.exists("a/b.json") and root.list("a") == ["a/b.json"]
    assert root.manifest("nothing/here") is None
    with pytest.raises(StorageError, match=f"not found: s3://{bucket}/prefix/missing.json"):
        root.read_json("missing.json")


def test_unreachable_store_fails_clearly_naming_the_object():
    # nothing listens on port 9; a short retry budget (the default retries for ~25 s)
    root = StorageRoot(
        "s3://nowhere/prefix", s3_endpoint_url="http://127.0.0.1:9", retry=StorageRetry(attempts=2, initial_delay=0.01)
    )
    with pytest.raises(StorageError, match=r"cannot write s3://nowhere/prefix/x\.json"):
        root.write_json("x.json", {})


def test_whole_graph_on_s3(tmp_path, seaweedfs, coco_path):
    bucket = seaweedfs.make_bucket()
    local = tmp_path / "pool.jsonl"
    rows = coco_subset_jsonl(coco_path, local, n=1200)
    fs = s3fs.S3FileSystem(**seaweedfs.storage_options(), skip_instance_cache=True)
    fs.put_file(str(local), f"{bucket}/inbox/pool.jsonl")

    settings = Settings(storage_root=f"s3://{bucket}/synthvlm", s3_endpoint_url=seaweedfs.endpoint, shard_rows=500)
    defs = build_definitions(settings)
    registry = settings.resources()["storage"].registry()
    _, shards = registry.register_file(f"s3://{bucket}/inbox/pool.jsonl", settings.shard_rows)
    assert [s.offset is not None for s in shards] == [True] * 3
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(caption_shards.name, [s.key for s in shards])
        for shard in reversed(shards):
            result = materialize(
                [caption_curation], partition_key=shard.key, instance=instance, resources=defs.resources
            )
            assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
        assert instance.get_materialized_partitions(AssetKey("curated_captions")) == {s.key for s in shards}

    assert fs.exists(f"{bucket}/synthvlm/curated_captions/{shards[0].key}/_manifest.json")
    con = connect(settings.resources()["storage"].root())
    got = [r[0] for r in con.sql("SELECT caption FROM curated_captions ORDER BY shard, source_row").fetchall()]
    assert got == reference([r["caption"] for r in rows if isinstance(r["caption"], str)])[0]
    assert not fs.glob(f"{bucket}/synthvlm/**/.tmp-*")  # nothing half-written left behind
    assert json.loads(fs.cat_file(f"{bucket}/synthvlm/registry/files/000001--{shards[0].file_tag}.json"))[
        "n_records"
    ] == len(rows)
