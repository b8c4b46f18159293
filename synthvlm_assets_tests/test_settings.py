"""One set of settings for every way the graph starts: the SYNTHVLM_* map, the tiny preset, resources built
from `EnvVar`s, the README's UI command, code versions from one place and the judge's GPUs from its settings."""

from __future__ import annotations

import ast
import json
import re
import runpy
import shlex
from pathlib import Path

import pytest
from dagster import EnvVar, asset, materialize

from synthvlm_assets.defs.build import Settings, build_definitions
from synthvlm_assets.defs.resources import (
    CaptionSourceResource,
    JudgeResource,
    ScoringResource,
    StorageResource,
    SynthesisResource,
    TrainingResource,
)
from synthvlm_assets.defs.settings import ENV_FIELDS, PRESETS, RESOURCES

ROOT = Path(__file__).resolve().parents[1]
MODEL_FIELDS = ("judge.model", "synthesis.model", "scoring.clip_model", "pair_filters.blip_model",
                "pair_filters.clip_model", "training.vision_tower", "training.llm")  # fmt: skip


def _clear_env(monkeypatch) -> None:
    import os

    for var in [v for v in os.environ if v.startswith("SYNTHVLM_")]:
        monkeypatch.delenv(var)


def _value(resources: dict, target: str):
    resource, name = target.split(".")
    return getattr(resources[resource], name)


def test_every_mapped_field_exists_and_every_model_has_a_tiny_preset():
    for var, target in ENV_FIELDS.items():
        resource, name = target.split(".")
        assert name in RESOURCES[resource].model_fields, f"{var} -> {target}: no such resource field"
    tiny = {f"{r}.{k}" for r, group in PRESETS["tiny"] for k in group}
    assert tiny == set(MODEL_FIELDS)


def test_tiny_preset_sets_every_model_and_a_models_own_variable_wins():
    settings = Settings.from_env({"SYNTHVLM_PRESET": "tiny", "SYNTHVLM_SDXL_MODEL": "my/sdxl"})
    plain = settings.resources()
    assert {t: _value(plain, t) for t in MODEL_FIELDS} == {
        **{t: "tiny" for t in MODEL_FIELDS},
        "synthesis.model": "my/sdxl",
    }
    assert plain["judge"].settings().is_tiny and plain["training"].model_settings().tiny
    # LLaVA's parts are tiny together or not at all (a mixed pair cannot load).
    mixed = Settings.from_env({"SYNTHVLM_PRESET": "tiny", "SYNTHVLM_LLAVA_LLM": "lmsys/vicuna-7b-v1.5"}).resources()
    assert (mixed["training"].llm, mixed["training"].vision_tower) == (
        "lmsys/vicuna-7b-v1.5",
        "openai/clip-vit-large-patch14-336",
    )
    # No preset: the real models' defaults.
    assert {_value(Settings.from_env({}).resources(), t) for t in MODEL_FIELDS} & {"tiny"} == set()
    with pytest.raises(ValueError, match="SYNTHVLM_PRESET='small'"):
        Settings.from_env({"SYNTHVLM_PRESET": "small"}).resources()
    with pytest.raises(ValueError, match="SYNTHVLM_SHARD_ROWS='many'"):
        Settings.from_env({"SYNTHVLM_SHARD_ROWS": "many"})


def test_resources_take_the_environment_as_env_vars(monkeypatch, tmp_path):
    """The code location's resources name their variables (the UI's resource page shows them); a run resolves
    them when it starts. Plain values where Dagster's EnvVar cannot type the field (floats, optional ints)."""
    _clear_env(monkeypatch)
    env = {"SYNTHVLM_PRESET": "tiny", "SYNTHVLM_STORAGE_ROOT": str(tmp_path / "root"), "SYNTHVLM_SHARD_ROWS": "250",
           "SYNTHVLM_CLIP_MODEL": "tiny", "SYNTHVLM_LAMBDA": "0.25", "SYNTHVLM_SELECT_K": "7"}  # fmt: skip
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    settings = Settings.from_env()
    resources = build_definitions(settings).resources
    named = {t: _value(resources, t).env_var_name for t in ("storage.root_uri", "scoring.clip_model", "judge.model")}
    assert named == {"storage.root_uri": "SYNTHVLM_STORAGE_ROOT", "scoring.clip_model": "SYNTHVLM_CLIP_MODEL",
                     "judge.model": "SYNTHVLM_PRESET"}  # fmt: skip
    assert _value(resources, "caption_source.shard_rows").name == "SYNTHVLM_SHARD_ROWS"
    assert (resources["selection"].lam, resources["selection"].k) == (0.25, 7)
    # Given an explicit mapping (not this process's environment), every value is plain.
    explicit = Settings.from_env(env).definition_resources()
    assert not any(isinstance(v, EnvVar) for r in explicit.values() for v in r.model_dump().values())

    @asset
    def seen(
        storage: StorageResource,
        caption_source: CaptionSourceResource,
        judge: JudgeResource,
        synthesis: SynthesisResource,
        scoring: ScoringResource,
        training: TrainingResource,
    ) -> dict:
        return {
            "root": storage.root_uri,
            "shard_rows": caption_source.shard_rows,
            "models": [judge.model, synthesis.model, scoring.clip_model, training.vision_tower, training.llm],
        }

    monkeypatch.setenv("SYNTHVLM_SHARD_ROWS", "300")  # read when the run starts, not when the code loaded
    result = materialize([seen], resources=resources)
    assert result.output_for_node("seen") == {
        "root": str(tmp_path / "root"),
        "shard_rows": 300,
        "models": ["tiny"] * 5,
    }


def _readme_ui_command() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"`([^`]*dagster dev[^`]*)`", text)
    assert commands, "README.md names no `dagster dev` command"
    assert len(set(commands)) == 1, f"README.md names several UI commands: {commands}"
    return commands[0]


def test_readme_ui_command_runs_every_model_on_the_tiny_preset(monkeypatch):
    """The README's UI command, as `dagster dev` loads it (synthvlm_assets.definitions): every model tiny,
    so every asset runs offline; and it is the command the demo prints."""
    from synthvlm_assets.cli import ui_command

    words = shlex.split(_readme_ui_command())
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    assert words[-2:] == [".venv/bin/dagster", "dev"] and "DAGSTER_HOME" in env
    _clear_env(monkeypatch)
    for var, value in env.items():
        if var.startswith("SYNTHVLM_"):
            monkeypatch.setenv(var, value)
    # What `dagster dev` loads (workspace.yaml), run afresh here without replacing the imported module.
    defs = runpy.run_module("synthvlm_assets.definitions")["defs"]
    plain = Settings.from_env().resources()
    assert {t: _value(plain, t) for t in MODEL_FIELDS} == {t: "tiny" for t in MODEL_FIELDS}
    assert all(_value(defs.resources, t).env_var_name == "SYNTHVLM_PRESET" for t in MODEL_FIELDS)
    # The demo's hint: the same variables and command (DAGSTER_HOME is the demo's own, absolute).
    monkeypatch.setenv("DAGSTER_HOME", "/somewhere/.dagster_home")
    monkeypatch.chdir(ROOT)
    demo = Settings.from_env({})
    demo.preset = "tiny"  # what `synthvlm demo` does when SYNTHVLM_PRESET is unset
    printed = shlex.split(ui_command(demo))
    assert [w.split("=")[0] for w in printed] == [w.split("=")[0] for w in words]
    assert {w for w in printed if not w.startswith("DAGSTER_HOME=")} == {w for w in words if "DAGSTER_HOME" not in w}


def test_demo_sets_the_preset_in_one_place():
    """run_demo.sh and the compose files leave models to the settings: no per-model `tiny` of their own."""
    assert "=tiny" not in (ROOT / "run_demo.sh").read_text() and ":-tiny" not in (ROOT / "run_demo.sh").read_text()
    cli = (ROOT / "synthvlm_assets" / "cli.py").read_text()
    assert '"tiny"' not in cli.replace('settings.preset = "tiny"', "")


def _k8s_gpus(defs, job: str, node_name: str) -> str | None:
    node = next(n for n in defs.resolve_job_def(job).nodes if n.name == node_name)
    config = node.definition.tags.get("dagster-k8s/config")
    if config is None:
        return None
    config = json.loads(config) if isinstance(config, str) else config
    return config["container_config"]["resources"]["limits"]["nvidia.com/gpu"]


def test_judge_step_requests_the_gpus_of_its_settings():
    assert _k8s_gpus(build_definitions(Settings()), "synthvlm_job", "judged_captions") == "1"
    seventy_b = Settings.from_env({"SYNTHVLM_JUDGE_TENSOR_PARALLEL_SIZE": "4"})
    defs = build_definitions(seventy_b)
    assert _k8s_gpus(defs, "synthvlm_job", "judged_captions") == "4"
    assert _k8s_gpus(defs, "synthvlm_job", "sdxl_images") == "1"  # the others keep theirs
    served = build_definitions(Settings(judge={"backend": "http", "endpoint_url": "http://judge:8000/v1"}))
    assert _k8s_gpus(served, "synthvlm_job", "judged_captions") is None  # the server holds the GPUs


def test_code_versions_come_from_one_place():
    """No literal code_version on an asset decorator: build.py sets them from defs/automation.py's
    code_versions, and assets that it does not version have none."""
    from synthvlm_assets.defs.automation import CODE_REVISIONS

    for path in sorted((ROOT / "synthvlm_assets" / "defs").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("asset", "multi_asset"):
                assert "code_version" not in {k.arg for k in node.keywords}, f"{path.name}:{node.lineno}"
    defs = build_definitions(Settings())
    versions = {
        k.to_user_string(): a.code_versions_by_key[k]
        for a in defs.resolve_asset_graph().assets_defs
        if a.is_executable
        for k in a.keys
    }
    versioned = {k for k, v in versions.items() if v is not None}
    assert versioned == set(CODE_REVISIONS)
    assert all(versions[k].startswith(f"{CODE_REVISIONS[k]}.") for k in versioned)
