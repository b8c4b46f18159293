"""Long GPU steps through Dagster: progress lines in the step's log, and a terminated step that fails without a
retry and leaves its staged work to the next run."""

from __future__ import annotations

import pytest
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterExecutionInterruptedError,
    Failure,
    RetryRequested,
    materialize,
)
from dagster._core.test_utils import instance_for_test

from synthvlm_assets import progress
from synthvlm_assets.defs.build import Settings, build_definitions
from synthvlm_assets.defs.captions import caption_curation
from synthvlm_assets.defs.judge import judged_captions, pair_filtered_captions
from synthvlm_assets.defs.partitions import caption_shards
from synthvlm_assets.defs.resources import SynthesisResource
from synthvlm_assets.defs.retries import INTERRUPTED, SHARD_RETRY_POLICY, retry_only_transient
from synthvlm_assets.defs.selection import image_scores
from synthvlm_assets.defs.synthesis import sdxl_images
from synthvlm_assets_tests.test_graph import coco_subset_jsonl


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, DagsterExecutionInterruptedError])
def test_an_interrupt_is_a_failure_without_retry(interrupt):
    """Dagster turns an interrupt inside a step with a retry policy into RetryRequested; ours must not."""

    @retry_only_transient
    def step():
        raise interrupt()

    with pytest.raises(Failure) as info:
        step()
    assert not info.value.allow_retries and info.value.description == INTERRUPTED
    assert isinstance(info.value.__cause__, interrupt) and not isinstance(info.value, RetryRequested)


class Interrupting:
    """The tiny generator, interrupted (as a terminated run is) on its second batch."""

    def __init__(self, real) -> None:
        self.real, self.batches = real, 0
        self.model_revision, self.device, self.stats = real.model_revision, real.device, real.stats

    def generate(self, prompts, seeds):
        self.batches += 1
        if self.batches == 2:
            raise DagsterExecutionInterruptedError()
        return self.real.generate(prompts, seeds)


def test_terminated_synthesis_is_not_retried_and_the_next_run_reuses_its_batches(tmp_path, coco_path, monkeypatch):
    monkeypatch.setattr(progress, "EVERY_S", 0)  # a line per batch: the cadence is tested on its own
    src = tmp_path / "pool.jsonl"
    coco_subset_jsonl(coco_path, src, n=40)
    settings = Settings(
        storage_root=str(tmp_path / "root"),
        shard_rows=40,
        judge={"model": "tiny", "batch_size": 8},
        synthesis={"model": "tiny", "steps": 2, "batch_size": 2},
        scoring={"clip_model": "tiny", "workers": 0},
    )
    defs = build_definitions(settings)
    root = settings.resources()["storage"].root()
    shard = settings.resources()["storage"].registry().register_file(str(src), settings.shard_rows)[1][0]
    assert SHARD_RETRY_POLICY.max_retries > 0  # the policy that would have retried the interrupt
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(caption_shards.name, [shard.key])

        def run(assets, **kw):
            result = materialize(assets, partition_key=shard.key, instance=instance, resources=defs.resources, **kw)
            logs = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
            return result, logs

        judged, logs = run([caption_curation, pair_filtered_captions, judged_captions])
        assert judged.success
        judge_lines = [m for m in logs if m.startswith(f"judged_captions {shard.key}: ")]
        assert len(judge_lines) >= 2 and "captions (100%)" in judge_lines[-1]

        real_factory = SynthesisResource.generator_factory
        stub: list[Interrupting] = []

        def interrupting_factory(self, s3_endpoint_url=None):
            load = real_factory(self, s3_endpoint_url)
            return lambda: stub.append(Interrupting(load())) or stub[-1]

        monkeypatch.setattr(SynthesisResource, "generator_factory", interrupting_factory)
        failed, logs = run([sdxl_images], raise_on_error=False)
        assert not failed.success and stub and stub[0].batches == 2
        types = [e.event_type for e in failed.all_events]
        assert DagsterEventType.STEP_UP_FOR_RETRY not in types and DagsterEventType.STEP_FAILURE in types
        (failure,) = [e for e in failed.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
        assert failure.step_failure_data.user_failure_data.description == INTERRUPTED
        assert [m for m in logs if m.startswith(f"sdxl_images {shard.key}: ")][-1].startswith(
            f"sdxl_images {shard.key}: 2/"
        )
        (staged,) = root.list(f"sdxl_images/_staging/{shard.key}")
        assert len(root.list(staged)) == 1  # the first batch, durable

        monkeypatch.setattr(SynthesisResource, "generator_factory", real_factory)
        done, logs = run([sdxl_images, image_scores])
        assert done.success
        md = instance.get_latest_materialization_event(AssetKey("sdxl_images")).asset_materialization.metadata
        assert md["reused"].value == 2 and md["generated"].value == md["images"].value - 2
        image_lines = [m for m in logs if m.startswith(f"sdxl_images {shard.key}: ")]
        assert image_lines[0].endswith("2 reused from earlier work") and "(100%)" in image_lines[-1]
        assert any(m.startswith(f"image_scores {shard.key}: ") and "(100%)" in m for m in logs)
        assert not root.list(f"sdxl_images/_staging/{shard.key}")


def test_an_interrupted_cli_stops_after_the_run_it_was_in(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a curation run: the step fails without a retry and `synthvlm materialize` starts no further
    run (Dagster returns from the interrupted run as from any failed one); main exits 130 with a hint."""
    from synthvlm_assets import cli
    from synthvlm_assets.defs import captions

    pool = tmp_path / "pool.jsonl"
    pool.write_text(
        "".join(f'{{"id": {i}, "caption": "A red bus parked on a quiet street number {i}."}}\n' for i in range(6))
    )
    settings = Settings(storage_root=str(tmp_path / "root"), shard_rows=2, shards_per_run=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield  # a generator, as curate_range is

    monkeypatch.setattr(captions, "curate_range", interrupted)
    with instance_for_test() as instance:
        assert len(cli.register([str(pool)], settings, instance)) == 3
        with pytest.raises(cli.Interrupted, match="interrupted in caption_curation"):
            cli.materialize(settings, instance, image_shards=0)
        (run,) = instance.get_run_records()  # three ranges of one shard: only the first started
        types = [e.dagster_event_type for e in instance.all_logs(run.dagster_run.run_id) if e.dagster_event]
        assert DagsterEventType.STEP_UP_FOR_RETRY not in types and DagsterEventType.STEP_FAILURE in types

    def stopped(*args, **kwargs):
        raise cli.Interrupted("interrupted in sdxl_images (run 1234abcd)")

    monkeypatch.setattr(cli, "materialize", stopped)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SYNTHVLM_STORAGE_ROOT", str(tmp_path / "root"))
    assert cli.main(["materialize"]) == 130
    assert "interrupted in sdxl_images (run 1234abcd); " + cli.RESUME_HINT in capsys.readouterr().err
