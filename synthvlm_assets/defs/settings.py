"""The settings of the code location, read in one place for every way it starts (`synthvlm`, `dagster dev`,
compose, Kubernetes): which SYNTHVLM_* variable sets which resource field, the model presets, and the resources
built from them. Resources of the code location take a variable's value as a Dagster `EnvVar`, so the UI's
resource page names the variable; code that runs outside a run (the CLI, code versions, op tags) gets plain values.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from dagster import ConfigurableResource, EnvVar
from pydantic_core import PydanticUndefined

from synthvlm_assets.defs.evaluation import BenchmarkEvalResource
from synthvlm_assets.defs.resources import (
    CaptionSourceResource,
    CurationResource,
    JudgeResource,
    PairFilterResource,
    ScoringResource,
    SelectionResource,
    StorageResource,
    SynthesisResource,
    TrainingResource,
)

RESOURCES: dict[str, type[ConfigurableResource]] = {
    "storage": StorageResource,
    "caption_source": CaptionSourceResource,
    "curation": CurationResource,
    "pair_filters": PairFilterResource,
    "judge": JudgeResource,
    "synthesis": SynthesisResource,
    "scoring": ScoringResource,
    "selection": SelectionResource,
    "training": TrainingResource,
    "benchmark_eval": BenchmarkEvalResource,
}

# The one map from environment variables to resource fields ("resource.field"). An unset or empty variable
# leaves the field to the preset, then to its default.
ENV_FIELDS: dict[str, str] = {
    "SYNTHVLM_STORAGE_ROOT": "storage.root_uri",
    "SYNTHVLM_S3_ENDPOINT_URL": "storage.s3_endpoint_url",
    "SYNTHVLM_INPUT_URI": "caption_source.input_uri",
    "SYNTHVLM_SHARD_ROWS": "caption_source.shard_rows",
    "SYNTHVLM_JUDGE_MODEL": "judge.model",
    "SYNTHVLM_JUDGE_BACKEND": "judge.backend",
    "SYNTHVLM_JUDGE_ENDPOINT_URL": "judge.endpoint_url",
    "SYNTHVLM_JUDGE_TENSOR_PARALLEL_SIZE": "judge.tensor_parallel_size",
    "SYNTHVLM_SDXL_MODEL": "synthesis.model",
    "SYNTHVLM_CLIP_MODEL": "scoring.clip_model",
    "SYNTHVLM_CLIP_PRETRAINED": "scoring.clip_pretrained",
    "SYNTHVLM_SELECT_K": "selection.k",
    "SYNTHVLM_SELECT_FRACTION": "selection.fraction",
    "SYNTHVLM_LAMBDA": "selection.lam",
    "SYNTHVLM_LLAVA_VISION_TOWER": "training.vision_tower",
    "SYNTHVLM_LLAVA_VISION_REVISION": "training.vision_revision",
    "SYNTHVLM_LLAVA_LLM": "training.llm",
    "SYNTHVLM_LLAVA_LLM_REVISION": "training.llm_revision",
    "SYNTHVLM_LLAVA_PROCESSES": "training.processes",
    "SYNTHVLM_LLAVA_MICRO_BATCH": "training.micro_batch",
    "SYNTHVLM_LLAVA_INSTRUCT_JSON": "training.instruct_json",
    "SYNTHVLM_LLAVA_INSTRUCT_IMAGES": "training.instruct_image_folder",
    "SYNTHVLM_LLAVA_LAUNCHER": "training.launcher",
    "SYNTHVLM_LLAVA_K8S_IMAGE": "training.k8s_image",
    "SYNTHVLM_EVAL_MODEL": "benchmark_eval.model",
    "SYNTHVLM_EVAL_DATASETS_DIR": "benchmark_eval.datasets_dir",
    "SYNTHVLM_LMMS_EVAL_PYTHON": "benchmark_eval.lmms_eval_python",
}
# Settings of the code location's shape (not resource fields): they are fixed when the definitions load.
LOCATION_ENV: dict[str, tuple[str, type]] = {
    "SYNTHVLM_PRESET": ("preset", str),
    "SYNTHVLM_SHARDS_PER_RUN": ("shards_per_run", int),
    "SYNTHVLM_EXECUTOR": ("executor", str),
}
PRESET_ENV = "SYNTHVLM_PRESET"

# Model presets: groups of fields set together, each only where none of its fields is set otherwise (the LLaVA
# parts are tiny together or not at all). `tiny`: every model small, random and built offline in code.
PRESETS: dict[str, list[tuple[str, dict[str, str]]]] = {
    "tiny": [
        ("judge", {"model": "tiny"}),
        ("synthesis", {"model": "tiny"}),
        ("scoring", {"clip_model": "tiny"}),
        ("pair_filters", {"blip_model": "tiny"}),
        ("pair_filters", {"clip_model": "tiny"}),
        ("training", {"vision_tower": "tiny", "llm": "tiny"}),
    ],
}


def _field_type(target: str) -> tuple[type, bool]:
    """(the scalar type of a resource field, whether it is optional)."""
    resource, name = target.split(".")
    annotation = RESOURCES[resource].model_fields[name].annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0], True
    return annotation, False


def _parse(var: str, raw: str, kind: type) -> object:
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
    return raw


@dataclass
class Settings:
    """Deployment settings: `from_env` reads the SYNTHVLM_* variables (ENV_FIELDS, LOCATION_ENV); tests pass
    values directly. The dicts hold resource fields; `preset` fills in model fields left unset."""

    storage_root: str = "synthvlm_data"
    s3_endpoint_url: str | None = None
    input_uri: str | None = None  # default: <storage_root>/inbox
    shard_rows: int = 1000
    shards_per_run: int = 1000  # caption shards one curation run covers (its backfill policy)
    preset: str | None = None  # "tiny": every model the tiny preset, unless set otherwise (PRESETS)
    curation: dict = field(default_factory=dict)
    pair_filters: dict = field(default_factory=dict)  # PairFilterResource fields (off by default)
    judge: dict = field(default_factory=dict)  # JudgeResource fields
    synthesis: dict = field(default_factory=dict)  # SynthesisResource fields
    scoring: dict = field(default_factory=dict)  # ScoringResource fields
    selection: dict = field(default_factory=dict)  # SelectionResource fields (lam, k, fraction)
    executor: str = "multiprocess"  # or "k8s": each step its own pod, GPU steps request a GPU (deploy/helm)
    training: dict = field(default_factory=dict)  # TrainingResource fields
    benchmark_eval: dict = field(default_factory=dict)  # BenchmarkEvalResource fields (llava_benchmark_job)
    # "resource.field" (or "preset") -> the variable of the process environment it was read from.
    env_vars: dict[str, str] = field(default_factory=dict)

    # Resource fields held as top-level attributes (the storage root and the caption source).
    _TOP_LEVEL: typing.ClassVar[dict[str, str]] = {
        "storage.root_uri": "storage_root",
        "storage.s3_endpoint_url": "s3_endpoint_url",
        "caption_source.input_uri": "input_uri",
        "caption_source.shard_rows": "shard_rows",
    }

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings of the SYNTHVLM_* variables of `env` (default: this process's environment, whose
        variables the resources then take as `EnvVar`s)."""
        live = env is None
        env = os.environ if env is None else env
        settings = cls()
        for var, (attr, kind) in LOCATION_ENV.items():
            if env.get(var):
                setattr(settings, attr, _parse(var, env[var], kind))
                if live:
                    settings.env_vars[attr] = var
        for var, target in ENV_FIELDS.items():
            if env.get(var):
                settings.set_field(target, _parse(var, env[var], _field_type(target)[0]))
                if live:
                    settings.env_vars[target] = var
        return settings

    def set_field(self, target: str, value: object) -> None:
        """Set one resource field ("resource.field")."""
        if target in self._TOP_LEVEL:
            setattr(self, self._TOP_LEVEL[target], value)
            return
        resource, name = target.split(".")
        getattr(self, resource)[name] = value

    def resource_fields(self) -> dict[str, dict]:
        """Every resource's given fields: the settings, then the preset where they leave a model unset."""
        return self._fields()[0]

    def _fields(self) -> tuple[dict[str, dict], set[str]]:
        """(every resource's given fields, the "resource.field"s of them the preset set)."""
        from synthvlm_assets.storage import local_or_absolute

        root = local_or_absolute(self.storage_root).rstrip("/")
        fields = {
            "storage": {"root_uri": root, "s3_endpoint_url": self.s3_endpoint_url},
            "caption_source": {
                "input_uri": local_or_absolute(self.input_uri) if self.input_uri else f"{root}/inbox",
                "shard_rows": self.shard_rows,
            },
            **{key: dict(getattr(self, key)) for key in RESOURCES if key not in ("storage", "caption_source")},
        }
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"{PRESET_ENV}={self.preset!r}: expected one of {sorted(PRESETS)} or unset")
        from_preset = set()
        for resource, group in PRESETS.get(self.preset, []):
            if not set(group) & set(fields[resource]):
                fields[resource].update(group)
                from_preset |= {f"{resource}.{name}" for name in group}
        return fields, from_preset

    def resources(self) -> dict[str, ConfigurableResource]:
        """The resources with plain values, for code that runs outside a run (the CLI, code versions, tags)."""
        return {key: RESOURCES[key](**values) for key, values in self.resource_fields().items()}

    def definition_resources(self) -> dict[str, ConfigurableResource]:
        """The code location's resources: a field read from the environment is that variable as an `EnvVar`
        (resolved when a run starts; the UI shows its name), where the field's type allows it (str and int)."""
        fields, from_preset = self._fields()
        for target, var in self.env_vars.items():
            if "." not in target:
                continue  # a setting of the location's shape
            kind, optional = _field_type(target)
            resource, name = target.split(".")
            if kind is str:
                fields[resource][name] = EnvVar(var)
            elif kind is int and not optional:
                fields[resource][name] = EnvVar.int(var)
        if "preset" in self.env_vars:
            # A preset's value that is the preset's own name ("tiny") is the preset variable itself.
            for target in from_preset:
                resource, name = target.split(".")
                if fields[resource][name] == self.preset and _field_type(target)[0] is str:
                    fields[resource][name] = EnvVar(self.env_vars["preset"])
        return {key: RESOURCES[key](**values) for key, values in fields.items()}

    def environment(self) -> dict[str, str]:
        """The variables these settings were read from and their values (the demo's hint for `dagster dev`)."""
        return {var: os.environ[var] for var in self.env_vars.values() if var in os.environ}

    def executor_def(self):
        """The executor of every job: Dagster's default (steps as processes of the run), or on
        Kubernetes one pod per step, so that only GPU steps hold a GPU (their `dagster-k8s/config` tags)."""
        if self.executor == "multiprocess":
            return None
        if self.executor == "k8s":
            from dagster_k8s import k8s_job_executor  # the deploy extra

            return k8s_job_executor
        raise ValueError(f"SYNTHVLM_EXECUTOR={self.executor!r}: expected 'multiprocess' or 'k8s'")


REFERENCE_BEGIN = (
    "<!-- resource fields: generated by `python -m synthvlm_assets.defs.settings docs/configuration.md` -->"
)
REFERENCE_END = "<!-- end of the generated resource fields -->"


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if value is PydanticUndefined:
        return "set from the settings"
    return '`""`' if value == "" else f"`{value}`"


def configuration_reference() -> str:
    """docs/configuration.md's resource fields, from the resources themselves: each one's docstring, and every
    field's default and description (what the UI shows)."""
    lines = []
    for key, resource in RESOURCES.items():
        doc = " ".join(line.strip() for line in (resource.__doc__ or "").strip().splitlines())
        lines += [f"### `{key}`", "", doc, "", "| field | default | what |", "|---|---|---|"]
        for name, info in resource.model_fields.items():
            what = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {_cell(info.default)} | {what} |")
        lines.append("")
    return "\n".join(lines)


def _write_reference(path: str) -> None:
    """Replace the generated block of `path` with the current reference."""
    text = open(path, encoding="utf-8").read()
    head, rest = text.split(REFERENCE_BEGIN, 1)
    tail = rest.split(REFERENCE_END, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{REFERENCE_BEGIN}\n\n{configuration_reference()}\n{REFERENCE_END}{tail}")


if __name__ == "__main__":
    import sys

    _write_reference(sys.argv[1])
