"""Runs that cover many caption shards (caption_curation's backfill policy): one run, a materialization,
data version and check results per shard, and a bad shard that costs no other shard its result."""

from __future__ import annotations

import json
from collections import Counter

from dagster import AssetKey, BackfillPolicy, DagsterEventType, instance_for_test
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from synthvlm_assets.cli import materialize, register
from synthvlm_assets.defs.automation import automation_sensor
from synthvlm_assets.defs.build import CURATION_JOB, Settings, build_definitions
from synthvlm_assets.defs.captions import CHECK_SPECS

CAPTIONS = [
    f"A {c} {a} sits on a wooden bench in the park."
    for c in ("red", "blue", "old", "small")
    for a in ("dog", "cat", "bird")
]


def _files(tmp_path, n_files: int, rows: int) -> list[str]:
    uris = []
    for f in range(n_files):
        path = tmp_path / f"part-{f}.jsonl"
        path.write_text(
            "".join(json.dumps({"id": i, "caption": CAPTIONS[(i + f) % len(CAPTIONS)]}) + "\n" for i in range(rows))
        )
        uris.append(str(path))
    return uris


def _versions(instance, key: str) -> dict[str, str]:
    records = instance.fetch_materializations(AssetKey(key), limit=1000).records
    return {r.partition_key: r.asset_materialization.tags["dagster/data_version"] for r in records}


def test_one_run_covers_many_shards_each_materialized_and_checked_on_its_own(tmp_path):
    uris = _files(tmp_path, 2, 50)
    ranged = Settings(storage_root=str(tmp_path / "ranged"), shard_rows=20, curation={"workers": 2})
    single = Settings(storage_root=str(tmp_path / "single"), shard_rows=20, curation={"workers": 1})
    with instance_for_test() as instance:
        keys = register(uris, ranged, instance)
        assert len(keys) == 6
        job = build_definitions(ranged).resolve_job_def(CURATION_JOB)
        tags = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
        result = job.execute_in_process(instance=instance, tags=tags)
        assert result.success
        assert len(instance.get_run_records()) == 1
        mats = [e.materialization for e in result.get_asset_materialization_events()]
        assert Counter((m.asset_key.to_user_string(), m.partition) for m in mats) == Counter(
            {(a, k): 1 for a in ("raw_caption_pool", "curated_captions") for k in keys}
        )
        checks = result.get_asset_check_evaluations()
        assert len(checks) == len(CHECK_SPECS) * len(keys) and all(c.passed for c in checks)
        assert {c.partition for c in checks} == set(keys)
        # each check names its shard's materialization, as for a single-shard run (the UI's "Missing" otherwise)
        storage_ids = {
            (r.asset_key, r.partition_key): r.storage_id
            for a in ("raw_caption_pool", "curated_captions")
            for r in instance.fetch_materializations(AssetKey(a), limit=100).records
        }
        assert {(c.asset_key, c.partition): c.target_materialization_data.storage_id for c in checks} == storage_ids
        # each shard's own figures, not the range's
        kept = {m.partition: m.metadata["kept"].value for m in mats if m.asset_key == AssetKey("curated_captions")}
        assert kept[keys[0]] == len(CAPTIONS) and kept[keys[-1]] == 0  # the second file repeats the first's captions
        ranged_versions = _versions(instance, "curated_captions")
    with instance_for_test() as instance:
        register(uris, single, instance)
        defs = build_definitions(single)
        for key in keys:
            assert defs.resolve_job_def(CURATION_JOB).execute_in_process(instance=instance, partition_key=key).success
        # a shard's data version is a hash of what it published: the same whether its run covered one shard or six
        assert _versions(instance, "curated_captions") == ranged_versions


def test_a_bad_shard_costs_no_other_shard_its_result_and_a_rerun_redoes_only_it(tmp_path, capsys):
    uris = _files(tmp_path, 3, 40)
    settings = Settings(storage_root=str(tmp_path / "root"), shard_rows=20, curation={"workers": 2})
    with instance_for_test() as instance:
        keys = register(uris, settings, instance)
        (tmp_path / "part-1.jsonl").write_text("")  # changed after registration: its two shards must fail
        assert materialize(settings, instance, image_shards=0) == 1
        bad = [k for k in keys if k.startswith("part_1-")]
        good = [k for k in keys if k not in bad]
        assert instance.get_materialized_partitions(AssetKey("curated_captions")) == set(good)
        (run,) = instance.get_run_records()
        failure = [
            e for e in instance.all_logs(run.dagster_run.run_id) if e.dagster_event and e.dagster_event.is_step_failure
        ]
        text = failure[0].dagster_event.step_failure_data.error.message
        assert "2 of 6 shards failed" in text and "part-1.jsonl" in text and "changed since it was registered" in text
        # bad input: no retry requested
        assert not list(instance.all_logs(run.dagster_run.run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY))
        capsys.readouterr()
        # a rerun of what is missing covers only the failed shards (they fail again, alone: registered files are
        # immutable; a transient failure would heal here)
        assert materialize(settings, instance, missing_only=True, image_shards=0) == 1
        out = capsys.readouterr().out
        assert f"{bad[0]} .. {bad[-1]}" in out and "curated 0/2 shards in 1 run(s)" in out


def test_curation_backfills_run_many_shards_a_run_and_automation_emits_backfills():
    defs = build_definitions(Settings(shards_per_run=250))
    curation = defs.resolve_assets_def("curated_captions")
    assert curation.backfill_policy == BackfillPolicy.multi_run(250)
    # GPU stages keep one shard a run: a failure there is isolated to one shard's images
    assert defs.resolve_assets_def("sdxl_images").backfill_policy is None
    # the automation sensor submits what it requests as backfills, which follow the backfill policies
    assert automation_sensor.emit_backfills


def test_bad_input_fails_a_gpu_step_at_once_without_retries(tmp_path):
    """judged_captions of a shard whose curated partition was never published: not worth a retry."""
    from dagster import materialize

    from synthvlm_assets.defs.judge import judged_captions

    uris = _files(tmp_path, 1, 10)
    settings = Settings(storage_root=str(tmp_path / "root"), shard_rows=20, judge={"model": "tiny"})
    with instance_for_test() as instance:
        (key,) = register(uris, settings, instance)
        result = materialize(
            [judged_captions],
            partition_key=key,
            instance=instance,
            resources=settings.resources(),
            raise_on_error=False,
        )
        assert not result.success
        events = instance.all_logs(result.run_id)
        assert not [
            e for e in events if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_UP_FOR_RETRY
        ]
        failure = next(e for e in events if e.dagster_event and e.dagster_event.is_step_failure)
        assert "is not materialized" in failure.dagster_event.step_failure_data.error.message


def test_a_caption_run_imports_no_heavy_library(tmp_path):
    """Start-up is paid once and is small: curating shards through Dagster imports no torch, diffusers,
    transformers or matplotlib (the GPU stages import them inside their own steps)."""
    import subprocess
    import sys

    uris = _files(tmp_path, 1, 40)
    script = f"""
import sys
from dagster import instance_for_test
from synthvlm_assets.cli import materialize, register
from synthvlm_assets.defs.build import Settings

if __name__ == "__main__":
    settings = Settings(storage_root={str(tmp_path / "root")!r}, shard_rows=20)
    with instance_for_test() as instance:
        register({uris!r}, settings, instance)
        assert materialize(settings, instance, image_shards=0) == 0
    print(sorted(m for m in ("torch", "diffusers", "transformers", "matplotlib", "open_clip") if m in sys.modules))
"""
    path = tmp_path / "run.py"
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_embedded_instance_event_log(tmp_path):
    """The repo's dagster.yaml (the embedded default): its event log is one database with Dagster's schema (the
    instance reads back every materialization, each stored once) in WAL mode with auto_vacuum (freed pages do
    not pile up), and no per-run databases."""
    import os
    import shutil
    import sqlite3
    import subprocess
    import sys
    from pathlib import Path

    from dagster import DagsterInstance

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(Path(__file__).parents[1] / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "SYNTHVLM_STORAGE_ROOT": str(tmp_path / "data")}
    env["SYNTHVLM_SHARD_ROWS"] = "20"
    cli = [sys.executable, "-m", "synthvlm_assets.cli"]
    for args in (["register", *_files(tmp_path, 1, 60)], ["materialize", "--image-shards", "0"]):
        out = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    assert "curated 3/3 shards in 1 run(s)" in out.stdout
    assert not list((home / "history").glob("runs/*.db"))
    db = sqlite3.connect(home / "history" / "event_log.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 1
    per_type = dict(db.execute("SELECT dagster_event_type, count(*) FROM event_logs GROUP BY 1").fetchall())
    assert per_type["ASSET_MATERIALIZATION"] == 2 * 3  # raw + curated per shard, once
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with DagsterInstance.get() as instance:
            assert type(instance.event_log_storage).__name__ == "LocalEventLogStorage"
            assert len(instance.get_materialized_partitions(AssetKey("curated_captions"))) == 3
    finally:
        del os.environ["DAGSTER_HOME"]
