"""Atomic, idempotent partition publishing; the `synthvlm` command a new user runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from synthvlm_assets.storage import StorageError, StorageRoot


def test_publish_is_atomic_and_idempotent(tmp_path, monkeypatch):
    root = StorageRoot(str(tmp_path / "root"))
    t = pa.table({"a": [1, 2, 3]})
    first = root.publish_partition("asset/p1", {"kept": t}, {"shard": "p1"})
    again = root.publish_partition("asset/p1", {"kept": t}, {"shard": "p1"})
    assert first["files"] == again["files"]  # same table, same bytes
    assert root.read_partition("asset/p1", "kept").equals(t)

    def crash(key, doc):
        raise OSError("disk full")

    monkeypatch.setattr(root, "write_json", crash)
    with pytest.raises(OSError):
        root.publish_partition("asset/p1", {"kept": pa.table({"a": [9]})}, {})
    monkeypatch.undo()
    # the crashed rewrite left no manifest: readers see an unfinished partition, never a mix
    assert root.manifest("asset/p1") is None
    with pytest.raises(StorageError, match="is not materialized"):
        root.read_partition("asset/p1", "kept")
    assert not [p for p in (tmp_path / "root" / "asset" / "p1").iterdir() if p.name.startswith(".tmp-")]


def test_missing_objects_are_named(tmp_path):
    root = StorageRoot(str(tmp_path / "root"))
    with pytest.raises(StorageError, match=f"not found: {tmp_path}/root/nope.parquet"):
        root.read_parquet("nope.parquet")


def test_cli_demo_register_and_sql(tmp_path, coco_path):
    pool = tmp_path / "pool.jsonl"
    anns = json.loads(coco_path.read_text())["annotations"][:1500]
    pool.write_text("".join(json.dumps({"id": a["id"], "caption": a["caption"]}) + "\n" for a in anns))
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "SYNTHVLM_STORAGE_ROOT": str(tmp_path / "data"),
        "SYNTHVLM_SHARD_ROWS": "1000",
    }
    cli = [sys.executable, "-m", "synthvlm_assets.cli"]
    run = subprocess.run(
        [*cli, "demo", "--input", str(pool), "--image-shards", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "curated 2/2 shards in 1 run(s)" in run.stdout
    assert "raw captions 1500 (+0 malformed rows)" in run.stdout
    again = subprocess.run([*cli, "register", str(pool)], env=env, capture_output=True, text=True, timeout=120)
    assert "already registered" in again.stdout
    sql = subprocess.run(
        [*cli, "sql", "SELECT count(*) AS n FROM curated_captions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sql.returncode == 0, sql.stderr
    kept = int(sql.stdout.split("│")[-2].strip()) if "│" in sql.stdout else None
    assert kept is not None and 1300 < kept < 1500
    missing = subprocess.run(
        [*cli, "demo", "--input", str(tmp_path / "nope.json")], env=env, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode != 0 and "caption file not found" in missing.stderr
    # `curate`: a new file registered and curated, nothing else run; nothing published yet for `latest`.
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps({"id": a["id"], "caption": a["caption"]}) + "\n" for a in anns[:300]))
    curate = subprocess.run([*cli, "curate", str(more)], env=env, capture_output=True, text=True, timeout=300)
    assert curate.returncode == 0, curate.stderr[-3000:]
    assert "curated 1/1 shards" in curate.stdout and "raw captions 1800" in curate.stdout, curate.stdout
    latest = subprocess.run([*cli, "latest"], env=env, capture_output=True, text=True, timeout=120)
    assert latest.returncode != 0 and "synthvlm_100k: nothing published yet" in latest.stderr
