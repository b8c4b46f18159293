"""Scheduled incremental regeneration, decided by Dagster's own automation evaluation: a growing pool,
a threshold change that admits new captions, a lambda change, with the work counted at each step."""

from __future__ import annotations

import json
from collections import Counter

from dagster import instance_for_test

from synthvlm_assets.cli import register
from synthvlm_assets.defs.automation import AutomationDriver
from synthvlm_assets.defs.build import Settings, build_definitions
from synthvlm_assets.query import STEPS


def captions_jsonl(coco_path, path, start: int, n: int, prefix: str = "") -> None:
    anns = json.loads(coco_path.read_text())["annotations"][start : start + n]
    path.write_text("".join(json.dumps({"id": a["id"], "caption": prefix + a["caption"]}) + "\n" for a in anns))


PER_SHARD = list(STEPS)  # the per-shard chain, in order


def test_growing_pool_threshold_and_lambda_changes(tmp_path, coco_path):
    base = dict(
        storage_root=str(tmp_path / "root"),
        shard_rows=20,
        judge={"model": "tiny"},
        synthesis={"model": "tiny", "steps": 2},
        scoring={"clip_model": "tiny", "batch_size": 16, "workers": 0},
        selection={"k": 10},
    )
    settings = Settings(**base)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    captions_jsonl(coco_path, a, 0, 40)
    with instance_for_test() as instance:
        auto = AutomationDriver(instance)

        def run(defs):
            done, images = auto.run_until_quiet(defs)
            return done, images["generated"]

        defs = build_definitions(settings)
        assert auto.run_until_quiet(defs)[0] == Counter()  # the sensor is on before files arrive
        register([str(a)], settings, instance)
        shards_a = instance.get_dynamic_partitions("caption_shards")
        done, generated = run(defs)
        assert done == Counter({**dict.fromkeys(PER_SHARD, len(shards_a)), "synthvlm_100k": 1})
        root = settings.resources()["storage"].root()

        def kept_ids() -> set[str]:
            return {
                cid
                for k in instance.get_dynamic_partitions("caption_shards")
                if root.manifest(f"judged_captions/{k}")
                for cid in root.read_partition(f"judged_captions/{k}", "kept").column("caption_id").to_pylist()
            }

        kept = lambda: len(kept_ids())  # noqa: E731
        assert generated == kept() > 0

        # A second file: only its shard and the selection run.
        captions_jsonl(coco_path, b, 40, 20)
        register([str(b)], settings, instance)
        assert len(instance.get_dynamic_partitions("caption_shards")) == len(shards_a) + 1
        before = kept()
        done, generated = run(defs)
        assert done == Counter({**dict.fromkeys(PER_SHARD, 1), "synthvlm_100k": 1})
        assert generated == kept() - before

        # A looser rule threshold admits captions: curation reruns everywhere (new code version); images
        # are generated for exactly the newly admitted captions that the judge keeps.
        before_ids = kept_ids()
        looser = build_definitions(Settings(**{**base, "curation": {"special_character_ratio_min": 0.10}}))
        done, generated = run(looser)
        new = kept_ids() - before_ids
        assert new and before_ids <= kept_ids() and generated == len(new)
        assert done["curated_captions"] == len(shards_a) + 1 and done["synthvlm_100k"] == 1
        assert done["raw_caption_pool"] == 0  # its settings did not change

        # lambda: only the selection reruns.
        lam = build_definitions(
            Settings(**{**base, "curation": {"special_character_ratio_min": 0.10}, "selection": {"k": 10, "lam": 0.9}})
        )
        done, generated = run(lam)
        assert done == Counter({"synthvlm_100k": 1}) and generated == 0

        # Nothing changed: nothing runs.
        assert run(lam) == (Counter(), 0)
