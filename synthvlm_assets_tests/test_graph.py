"""The asset graph through Dagster's own APIs, on a temporary storage root."""

from __future__ import annotations

import json
import random

from dagster import (
    AssetKey,
    serialize_value,
    DagsterInstance,
    SensorResult,
    SkipReason,
    build_sensor_context,
    instance_for_test,
    materialize,
)

from synthvlm_assets.captions.filters import RuleFilterSettings, caption_stats, failed_filters
from synthvlm_assets.captions.normalize import normalize_caption
from synthvlm_assets.defs.build import Settings, build_definitions
from synthvlm_assets.defs.captions import CHECK_SPECS, caption_curation
from synthvlm_assets.defs.partitions import caption_shards
from synthvlm_assets.defs.sensors import caption_file_sensor
from synthvlm_assets.query import connect


def coco_subset_jsonl(coco_path, path, n=3000, seed=0):
    """COCO captions with duplicates spread across shards and a few malformed rows."""
    anns = json.loads(coco_path.read_text())["annotations"][:n]
    rng = random.Random(seed)
    rows = [{"id": a["id"], "caption": a["caption"]} for a in anns]
    for _ in range(200):  # exact copies and copies that only normalisation makes equal
        src = rng.choice(rows)["caption"]
        rows.insert(rng.randrange(len(rows)), {"id": "dup", "caption": rng.choice([src, src.replace("'", "’")])})
    rows.insert(10, {"id": "bad", "caption": 12})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def reference(captions: list[str]) -> tuple[list[str], int]:
    """Brute force: normalise, filter, keep first occurrences, in file order; and the duplicates."""
    s = RuleFilterSettings()
    seen, out, duplicates = set(), [], 0
    for c in captions:
        t = normalize_caption(c)
        if failed_filters(caption_stats(t, s), s.bounds()):
            continue
        if t in seen:
            duplicates += 1
        else:
            seen.add(t)
            out.append(t)
    return out, duplicates


def run_shards(settings: Settings, instance: DagsterInstance, uri: str, order=None) -> list[str]:
    defs = build_definitions(settings)
    registry = settings.resources()["storage"].registry()
    _, shards = registry.register_file(uri, settings.shard_rows)
    keys = [s.key for s in shards]
    instance.add_dynamic_partitions(caption_shards.name, keys)
    for key in order(keys) if order else keys:
        result = materialize([caption_curation], partition_key=key, instance=instance, resources=defs.resources)
        assert result.success
        checks = result.get_asset_check_evaluations()
        assert len(checks) == len(CHECK_SPECS) == 2 and all(c.passed for c in checks)
    return keys


def curated_rows(settings: Settings) -> list[dict]:
    con = connect(settings.resources()["storage"].root())
    return (
        con.sql("SELECT caption_id, caption FROM curated_captions ORDER BY shard, source_row")
        .to_arrow_table()
        .to_pylist()
    )


def test_graph_matches_brute_force_in_any_order(tmp_path, coco_path):
    src = tmp_path / "pool.jsonl"
    rows = coco_subset_jsonl(coco_path, src)
    expected, n_duplicates = reference([r["caption"] for r in rows if isinstance(r["caption"], str)])
    results = []
    for name, order in [
        ("forward", None),
        ("reverse", lambda k: k[::-1]),
        ("shuffled", lambda k: random.Random(1).sample(k, len(k))),
    ]:
        settings = Settings(storage_root=str(tmp_path / name), shard_rows=400)
        with instance_for_test() as instance:
            keys = run_shards(settings, instance, str(src), order)
            assert instance.get_materialized_partitions(AssetKey("curated_captions")) == set(keys)
        got = curated_rows(settings)
        assert [r["caption"] for r in got] == expected
        results.append(got)
    assert results[0] == results[1] == results[2]

    con = connect(Settings(storage_root=str(tmp_path / "reverse")).resources()["storage"].root())
    n_raw, n_malformed, n_kept, n_rejected, n_dup = con.execute(
        "SELECT (SELECT count(*) FROM raw_captions), (SELECT count(*) FROM malformed_captions),"
        " (SELECT count(*) FROM curated_captions), (SELECT count(*) FROM rejected_captions),"
        " (SELECT count(*) FROM rejected_captions WHERE reject_reason = 'duplicate')"
    ).fetchone()
    assert n_raw + n_malformed == len(rows) and n_malformed == 1
    assert n_kept + n_rejected == n_raw and n_dup == n_duplicates > 150
    # every duplicate points at a kept caption with the same normalised text
    bad = con.execute(
        "SELECT count(*) FROM rejected_captions r LEFT JOIN curated_captions k ON r.duplicate_of = k.caption_id"
        " WHERE r.reject_reason = 'duplicate' AND (k.caption IS NULL OR k.caption <> r.caption)"
    ).fetchone()[0]
    assert bad == 0


def test_full_coco_is_reproducible_and_exact(tmp_path, coco_path):
    outputs = []
    for name in ("a", "b"):
        settings = Settings(storage_root=str(tmp_path / name), shard_rows=5000)
        with instance_for_test() as instance:
            keys = run_shards(settings, instance, str(coco_path))
        root = settings.resources()["storage"].root()
        outputs.append([root.manifest(f"curated_captions/{k}")["files"]["kept"]["sha256"] for k in keys])
        rows = curated_rows(settings)
    assert outputs[0] == outputs[1]  # same bytes run to run
    captions = [a["caption"] for a in json.loads(coco_path.read_text())["annotations"]]
    assert [r["caption"] for r in rows] == reference(captions)[0]
    assert len(rows) == 22_860


def test_materialization_metadata(tmp_path, coco_path):
    src = tmp_path / "pool.jsonl"
    coco_subset_jsonl(coco_path, src, n=500)
    settings = Settings(storage_root=str(tmp_path / "root"), shard_rows=1000)
    with instance_for_test() as instance:
        (key,) = run_shards(settings, instance, str(src))
        mat = instance.get_latest_materialization_event(AssetKey("curated_captions")).asset_materialization
    md = mat.metadata
    assert md["kept"].value + md["rejected"].value == md["captions_in"].value
    filters = {r.data["filter"]: r.data for r in md["filters"].value.records}
    assert filters["perplexity"]["fails alone"] == "skipped"
    p5, p50, p95 = map(float, filters["special_character_ratio"]["p5 / p50 / p95"].split(" / "))
    assert 0 < p5 <= p50 <= p95
    assert sum(filters[f]["rejected"] for f in filters) == md["rejected"].value
    verdicts = [r.data["verdict"] for r in md["samples"].value.records]
    assert "kept" in verdicts and any(v != "kept" for v in verdicts)
    # per shard: figures and small tables, no rendered plot (milliseconds per shard, a small event log)
    assert not any("base64" in str(v.value) for v in md.values()) and len(serialize_value(mat)) < 8_000
    assert md["parquet"].value.endswith(f"curated_captions/{key}")


def test_sensor_registers_new_files_once(tmp_path, coco_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    settings = Settings(storage_root=str(tmp_path / "root"), input_uri=str(inbox), shard_rows=200)
    resources = settings.resources()
    with instance_for_test() as instance:

        def tick(cursor=None):
            ctx = build_sensor_context(instance=instance, resources=resources, cursor=cursor)
            result = caption_file_sensor(ctx)
            if isinstance(result, SensorResult) and result.dynamic_partitions_requests:
                instance.add_dynamic_partitions(
                    caption_shards.name, list(result.dynamic_partitions_requests[0].partition_keys)
                )
            return result

        assert isinstance(tick(), SkipReason)
        coco_subset_jsonl(coco_path, inbox / "a.jsonl", n=500)
        (inbox / "broken.json").write_text("[{")
        (inbox / ".partial.jsonl").write_text("{}")  # hidden: an upload in progress
        result = tick()
        keys = list(result.dynamic_partitions_requests[0].partition_keys)
        assert not result.run_requests and len(keys) == 4 and all(k.startswith("a-") for k in keys)
        assert set(instance.get_dynamic_partitions(caption_shards.name)) == set(keys)
        assert "broken.json" in result.cursor
        again = tick(result.cursor)
        assert isinstance(again, SkipReason)  # nothing new; the broken file is not rescanned
        coco_subset_jsonl(coco_path, inbox / "b.jsonl", n=100)
        third = tick(result.cursor)
        assert (
            list(third.dynamic_partitions_requests[0].partition_keys)
            == [s.key for s in resources["storage"].registry().shards()][4:]
        )


def test_definitions_load():
    defs = build_definitions(Settings())
    assert {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()} >= {
        "raw_caption_pool",
        "curated_captions",
        "sdxl_images",
    }
    assert defs.resolve_job_def("synthvlm_job") is not None


def test_sdxl_images_through_dagster(tmp_path, coco_path):
    from synthvlm_assets.defs.judge import judged_captions, pair_filtered_captions
    from synthvlm_assets.defs.synthesis import sdxl_images

    src = tmp_path / "pool.jsonl"
    coco_subset_jsonl(coco_path, src, n=40)
    settings = Settings(
        storage_root=str(tmp_path / "root"),
        shard_rows=30,
        judge={"model": "tiny"},
        synthesis={"model": "tiny", "steps": 2},
    )
    defs = build_definitions(settings)
    registry = settings.resources()["storage"].registry()
    _, shards = registry.register_file(str(src), settings.shard_rows)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(caption_shards.name, [s.key for s in shards])
        result = materialize(
            [caption_curation, pair_filtered_captions, judged_captions, sdxl_images],
            partition_key=shards[0].key,
            instance=instance,
            resources=defs.resources,
        )
        assert result.success
        checks = {
            c.check_name: c.passed
            for c in result.get_asset_check_evaluations()
            if c.asset_key == AssetKey("sdxl_images")
        }
        assert checks == {"every_caption_has_its_images": True, "image_size": True, "no_unusable_images": True}
        md = instance.get_latest_materialization_event(AssetKey("sdxl_images")).asset_materialization.metadata
        judged_md = instance.get_latest_materialization_event(
            AssetKey("judged_captions")
        ).asset_materialization.metadata
        judge_checks = {
            c.check_name: c.passed
            for c in result.get_asset_check_evaluations()
            if c.asset_key == AssetKey("judged_captions")
        }
    assert judge_checks == {"every_caption_judged": True, "only_yes_kept": True}
    assert (
        judged_md["model"].value.startswith("tiny")
        and judged_md["judged_now"].value > 0
        and judged_md["cache_hits"].value == 0
    )
    assert judged_md["verdict_yes"].value > 0
    (p_yes,) = judged_md["p_yes"].value.records  # a table the UI shows inline, rounded
    assert p_yes.data["n"] > 0 and 0 <= p_yes.data["p50"] <= 1
    assert not any("base64" in str(v.value) for v in judged_md.values())  # no plot per shard
    assert "gpu_s" not in judged_md and "gpu_s" not in md  # on CPU
    kept = settings.resources()["storage"].root().read_partition(f"judged_captions/{shards[0].key}", "kept").num_rows
    assert kept == judged_md["verdict_yes"].value
    assert md["images"].value == md["generated"].value == kept > 0
    assert md["model"].value.startswith("tiny")
    assert md["contact_sheet"].value.startswith("![plot](data:image/png;base64,")
    assert md["tar"].value.endswith(f"sdxl_images/{shards[0].key}/images.tar")
