"""The training assets through Dagster: a Pipes-launched torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import torch
from dagster import AssetKey, instance_for_test

from synthvlm_assets.defs.build import STAGE2_JOB, TRAINING_JOB, Settings, build_definitions
from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.model import ModelSettings
from synthvlm_assets.training.loop import load_weights
from synthvlm_assets.training.stage1 import COMPLETE, Stage1Settings, train_stage1
from synthvlm_assets_tests.training_toy import publish_toy_dataset, publish_toy_instructions


def test_training_job_two_processes_through_pipes(tmp_path):
    root = StorageRoot(str(tmp_path / "root"))
    publish_toy_dataset(root, 100)
    settings = Settings(
        storage_root=root.root_uri,
        training={
            "vision_tower": "tiny",
            "llm": "tiny",
            "processes": 2,
            "micro_batch": 4,
            "eval_max_records": 16,
            "eval_retrieval_size": 6,
        },
    )
    job = build_definitions(settings).resolve_job_def(TRAINING_JOB)
    with instance_for_test() as instance:
        result = job.execute_in_process(instance=instance)
        assert result.success
        events = {
            m.asset_key.path[-1]: m
            for m in (e.event_specific_data.materialization for e in result.get_asset_materialization_events())
        }
        assert set(events) == {"llava_stage1_checkpoint", "llava_stage1_export", "llava_stage1_sanity_eval"}
        meta = events["llava_stage1_checkpoint"].metadata
        # Reported from the subprocess through Pipes, then completed by the asset.
        summary = root.read_json(f"{root.manifest('llava_stage1')['run_prefix']}/_result.json")
        assert meta["processes"].value == 2 and meta["steps"].value == 6 == summary["total_steps"]
        assert meta["samples"].value == summary["train_records"] and 80 < summary["train_records"] < 100
        assert meta["samples_per_second"].value > 0 and "training_curve" in meta and "peak_gpu_memory_gib" in meta
        checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
        assert checks["loss_finite"] and set(checks) == {
            "loss_finite",
            "loss_falling",
            "heldout_loss_below_untrained",
            "retrieval_above_chance",
        }
        # Streamed step logs reached the run's event log.
        logs = [
            e.message
            for e in instance.all_logs(result.run_id)
            if e.message and "samples/s" in e.message and "step " in e.message
        ]
        assert len(logs) >= 6
        assert len(instance.fetch_materializations(AssetKey("llava_stage1_checkpoint"), limit=10).records) == 1

        # Stage 2 from that stage-1 run, FSDP over the same 2 processes, on a toy LLaVA-665K.
        instruct = publish_toy_instructions(root, 32)
        stage2 = Settings(
            storage_root=root.root_uri,
            training={
                **settings.training,
                "instruct_json": root.uri(instruct),
                "instruct_image_folder": root.uri("instruct/images"),
            },
        )
        result = build_definitions(stage2).resolve_job_def(STAGE2_JOB).execute_in_process(instance=instance)
        assert result.success
        events = {
            m.asset_key.path[-1]: m
            for m in (e.event_specific_data.materialization for e in result.get_asset_materialization_events())
        }
        assert set(events) == {"llava_stage2_checkpoint", "llava_stage2_export"}
        meta = events["llava_stage2_checkpoint"].metadata
        assert meta["processes"].value == 2 and meta["steps"].value == 4 and "training_curve" in meta
        run2 = root.manifest("llava_stage2")
        assert run2["stage1_run_prefix"] == root.manifest("llava_stage1")["run_prefix"] and run2["steps"] == 4
        assert root.read_json(f"{run2['run_prefix']}/_result.json")["fsdp"] is True
        export2 = root.read_json("llava_stage2_export/_manifest.json")["prefix"]
        assert root.exists(f"{export2}/{COMPLETE}") and root.exists(f"{export2}/model.safetensors")
        checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
        assert checks["loss_finite"] and set(checks) == {"loss_finite", "loss_falling"}

    run_prefix = root.manifest("llava_stage1")["run_prefix"]
    export = root.read_json("llava_stage1_export/_manifest.json")["prefix"]
    assert root.exists(f"{export}/{COMPLETE}") and root.exists(f"{export}/mm_projector.bin")
    # Two data-parallel processes train the same projector as one process (up to summation order).
    single_root = StorageRoot(str(tmp_path / "single"))
    publish_toy_dataset(single_root, 100)
    single = train_stage1(single_root, ModelSettings.tiny_preset(), Stage1Settings.tiny_preset(micro_batch=4))
    assert single.run_prefix == run_prefix
    a, b = (
        load_weights(root, f"{run_prefix}/projector.safetensors"),
        load_weights(single_root, f"{run_prefix}/projector.safetensors"),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_launch_takes_its_configuration_inline(tmp_path):
    """What a training pod of its own runs (no shared file): `launch --config-json`; without Pipes it prints
    each step as a JSON line."""
    import json
    import os
    import subprocess
    import sys

    from synthvlm_assets.training.launch import config_json

    root = StorageRoot(str(tmp_path / "root"))
    publish_toy_dataset(root, 40)
    cfg = config_json(root.root_uri, None, ModelSettings.tiny_preset(), Stage1Settings.tiny_preset(), None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    done = subprocess.run(
        [sys.executable, "-m", "synthvlm_assets.training.launch", "--config-json", cfg],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and rows[-1]["step"] == rows[-1]["total_steps"]
    assert len(root.list("llava_stage1")) == 1
    both = subprocess.run(
        [sys.executable, "-m", "synthvlm_assets.training.launch", "x.json", "--config-json", cfg],
        capture_output=True,
        text=True,
    )
    assert both.returncode == 2 and "one of the two" in both.stderr


def test_a_failed_training_process_fails_the_step_with_its_cause(tmp_path):
    """A vision tower that does not exist: the step's failure (what the run page shows) says why in one line,
    and its metadata holds the tail of the training process's stderr."""
    root = StorageRoot(str(tmp_path / "root"))
    publish_toy_dataset(root, 20)
    missing = str(tmp_path / "no_such_vision_tower")
    settings = Settings(storage_root=root.root_uri, training={"vision_tower": missing, "llm": missing, "processes": 1})
    job = build_definitions(settings).resolve_job_def(TRAINING_JOB)
    with instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        (failure,) = [e for e in result.all_events if e.is_step_failure]
        assert failure.step_key == "llava_stage1_checkpoint"
        data = failure.step_failure_data
        cause = data.user_failure_data.description
        assert cause.startswith("ModelWeightsError: ") and "vision_tower" in cause and missing in cause
        assert "\n" not in cause and cause in data.error.message  # the error the run page shows leads with it
        tail = data.user_failure_data.metadata["stderr_tail"].value
        assert "ModelWeightsError" in tail and "File " in tail and tail.count("\n") <= 22  # the traceback's end
        assert data.user_failure_data.metadata["exit_code"].value != 0
        # The training process's exception also reached the run's event log through Pipes.
        logs = [e.message or "" for e in instance.all_logs(result.run_id)]
        assert any("pipes closed with exception" in m for m in logs)


def test_failure_cause_skips_the_launcher_summary():
    from synthvlm_assets.training.launch import failure_cause

    stderr = [
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "synthvlm_assets.models.sources.ModelWeightsError: vision_tower='/x': no such folder",
        "[rank1]: Traceback (most recent call last):",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "============================================================",
    ]
    assert (
        failure_cause(stderr) == "synthvlm_assets.models.sources.ModelWeightsError: vision_tower='/x': no such folder"
    )
    assert failure_cause(stderr[3:]) == "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:"
    assert failure_cause(["all good", "Killed"]) is None


def test_training_job_runs_on_the_settings_of_the_ui_command(tmp_path, monkeypatch):
    """The code location as `dagster dev` builds it from SYNTHVLM_PRESET=tiny alone (the README's UI command):
    its resources read the variables when the run starts, and stage 1, its export and evaluation run offline."""
    import os

    for var in [v for v in os.environ if v.startswith("SYNTHVLM_")]:
        monkeypatch.delenv(var)
    root = StorageRoot(str(tmp_path / "root"))
    publish_toy_dataset(root, 40)
    monkeypatch.setenv("SYNTHVLM_PRESET", "tiny")
    monkeypatch.setenv("SYNTHVLM_STORAGE_ROOT", root.root_uri)
    defs = build_definitions(Settings.from_env())
    assert defs.resources["training"].llm.env_var_name == "SYNTHVLM_PRESET"
    with instance_for_test() as instance:
        result = defs.resolve_job_def(TRAINING_JOB).execute_in_process(instance=instance)
        assert result.success
    assert root.manifest("llava_stage1")["tiny"] is True
