"""SPEC §6 as assets: the stage-1 training run (through Dagster Pipes, so a long GPU job streams its
loss, samples/s and GPU memory into the run's log), its Hugging Face export and a sanity evaluation;
the optional stage-2 run (instruction tuning on the user's LLaVA-665K-format JSON) and its export."""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque

from dagster import (
    AssetCheckResult,
    AssetsDefinition,
    AssetCheckSpec,
    AssetExecutionContext,
    DagsterExecutionInterruptedError,
    Failure,
    MaterializeResult,
    MetadataValue,
    PipesClientCompletedInvocation,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    asset,
    open_pipes_session,
)

from synthvlm_assets.defs.metadata import md_table, png_markdown
from synthvlm_assets.defs.resources import StorageResource, TrainingResource
from synthvlm_assets.defs.selection import synthvlm_100k
from synthvlm_assets.defs.partitions import GPU_TAGS
from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.export import EXPORT, STAGE2_EXPORT
from synthvlm_assets.training.launch import config_json, failure_cause
from synthvlm_assets.training.loop import RESULT
from synthvlm_assets.training.stage1 import ASSET as STAGE1
from synthvlm_assets.training.stage1 import PROJECTOR
from synthvlm_assets.training.stage2 import ASSET as STAGE2
from synthvlm_assets.training.stage2 import TRAINABLE

CHECKPOINT = "llava_stage1_checkpoint"
STAGE2_CHECKPOINT = "llava_stage2_checkpoint"
SANITY = "llava_stage1_sanity_eval"
TINY_LABEL = " (tiny preset: random weights, meaningless)"
STDERR_TAIL_LINES = 20  # of a failed training process's stderr, in the failure's metadata
STDERR_SCAN_LINES = 400  # searched for its exception (torchrun's own report follows the failed process's)


def training_curve(losses: list[float], title: str) -> MetadataValue:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, len(losses) + 1), losses, color="#4C78A8")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per label token")
    ax.set_title(title, fontsize=9)
    return png_markdown(fig)


def _current_run(root: StorageRoot, stage: str = STAGE1) -> dict:
    manifest = root.manifest(stage)
    if manifest is None:
        asset_name = CHECKPOINT if stage == STAGE1 else STAGE2_CHECKPOINT
        raise RuntimeError(f"{root.uri(stage)} has no finished training run: materialize {asset_name} first")
    return manifest


def _package_parent() -> str:
    import synthvlm_assets

    return os.path.dirname(os.path.dirname(os.path.abspath(synthvlm_assets.__file__)))


def training_command(python: str, processes: int, config_args: list[str]) -> list[str]:
    """The training process (under torchrun when there are several)."""
    launch = ["-m", "synthvlm_assets.training.launch", *config_args]
    if processes == 1:
        return [python, *launch]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *launch]


def training_pod_spec(gpus: int, base: dict | None = None) -> dict:
    """The pod of a training run on Kubernetes: `gpus` GPUs on one node (torchrun's processes), the
    GPU toleration, and /dev/shm in memory (the DataLoader's workers and NCCL need more than the
    container default of 64 MB), over the user's base spec (node selector, secrets, volumes...)."""
    spec = json.loads(json.dumps(base or {}))  # a deep copy
    containers = spec.setdefault("containers", [{}])
    container = containers[0]
    container.setdefault("name", "training")
    limits = container.setdefault("resources", {}).setdefault("limits", {})
    limits["nvidia.com/gpu"] = str(gpus)
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    if toleration not in spec.setdefault("tolerations", []):
        spec["tolerations"].append(toleration)
    if not any(v.get("name") == "dshm" for v in spec.setdefault("volumes", [])):
        spec["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        container.setdefault("volumeMounts", []).append({"name": "dshm", "mountPath": "/dev/shm"})
    return spec


def run_through_pipes(
    context: AssetExecutionContext, command: list[str], env: dict[str, str]
) -> PipesClientCompletedInvocation:
    """PipesSubprocessClient's run, keeping the tail of the child's stderr (which still reaches the step's own):
    a failed child fails the step with its cause, the exception it reported through Pipes (else the last
    exception line of its stderr, e.g. from torchrun's other processes), and the tail as metadata."""
    tail: deque[str] = deque(maxlen=STDERR_SCAN_LINES)
    with open_pipes_session(context, PipesTempFileContextInjector(), PipesTempFileMessageReader()) as session:
        process = subprocess.Popen(
            command,
            env={**os.environ, **env, **session.get_bootstrap_env_vars()},
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )

        def pump() -> None:
            for line in process.stderr:
                sys.stderr.write(line)
                tail.append(line.rstrip("\n"))
            sys.stderr.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            process.wait()
        except DagsterExecutionInterruptedError:
            context.log.info("training interrupted: sending SIGINT to the training process")
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
            raise
        reader.join(timeout=10)
    if process.returncode != 0:
        reported = [m["error"] for m in session.get_custom_messages() if isinstance(m, dict) and "error" in m]
        cause = (reported or [failure_cause(tail) or f"the training process exited with code {process.returncode}"])[0]
        lines = list(tail)[-STDERR_TAIL_LINES:]
        raise Failure(
            description=cause,
            metadata={
                "exit_code": process.returncode,
                "stderr_tail": MetadataValue.md("```\n" + "\n".join(lines) + "\n```"),
                "command": " ".join(command),
            },
            allow_retries=False,
        )
    return PipesClientCompletedInvocation(session)


def _launch(context: AssetExecutionContext, storage: StorageResource, training: TrainingResource, settings,
            stage1_run_prefix: str | None = None) -> tuple[dict, str, dict]:  # fmt: skip
    """Run one training run through Dagster Pipes: a subprocess here, or (launcher "k8s") a GPU pod of its
    own; under torchrun for several processes. Returns (reported metadata, run prefix, its _result.json)."""
    root = storage.root()
    cfg = config_json(
        root.root_uri,
        storage.s3_endpoint_url,
        training.model_settings(),
        settings,
        training.cache_dir,
        stage1_run_prefix,
    )
    processes = training.process_count()
    if training.launcher not in ("subprocess", "k8s"):
        raise ValueError(f"training.launcher={training.launcher!r}: expected 'subprocess' or 'k8s'")
    if training.launcher == "k8s":
        from dagster_k8s import PipesK8sClient  # the deploy extra

        image = training.k8s_image or os.environ.get("DAGSTER_CURRENT_IMAGE")
        if not image:
            raise ValueError(
                "training.launcher is 'k8s' but no image: set training.k8s_image (or run where DAGSTER_CURRENT_IMAGE "
                "is set)"
            )
        command = training_command("python", processes, ["--config-json", cfg])
        context.log.info(f"training in a pod of {image} with {processes} GPU process(es)")
        invocation = PipesK8sClient().run(
            context=context,
            image=image,
            command=command,
            namespace=training.k8s_namespace,
            base_pod_spec=training_pod_spec(processes, training.k8s_pod_spec),
        )
        reported = invocation.get_materialize_result()
    else:
        with tempfile.TemporaryDirectory(prefix="synthvlm-train-") as tmp:
            path = os.path.join(tmp, "config.json")
            with open(path, "w") as f:
                f.write(cfg)
            command = training_command(sys.executable, processes, [path])
            context.log.info(f"training with {processes} process(es): {' '.join(command)}")
            pythonpath = os.pathsep.join(p for p in (_package_parent(), os.environ.get("PYTHONPATH")) if p)
            reported = run_through_pipes(context, command, {"PYTHONPATH": pythonpath}).get_materialize_result()
    run_prefix = reported.metadata["run_prefix"].value
    run_prefix = run_prefix[len(root.uri()) + 1 :] if run_prefix.startswith(root.uri()) else run_prefix
    return reported, run_prefix, root.read_json(f"{run_prefix}/{RESULT}")


def _loss_checks(asset_key: str) -> list[AssetCheckSpec]:
    return [
        AssetCheckSpec("loss_finite", asset=asset_key, blocking=True, description="Every step's loss is finite."),
        AssetCheckSpec(
            "loss_falling",
            asset=asset_key,
            description="Mean loss of the last tenth of the steps below the first tenth's.",
        ),
    ]


def _training_result(reported, losses: list[float], title: str, metadata: dict) -> MaterializeResult:
    """The materialization of a training run: what the subprocess reported, its curve, and the checks."""
    tenth = max(1, len(losses) // 10)
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    return MaterializeResult(
        metadata={
            **reported.metadata,
            "training_curve": training_curve(losses, title),
            **metadata,
            "first_tenth_mean_loss": first,
            "last_tenth_mean_loss": last,
        },  # fmt: skip
        data_version=reported.data_version,
        check_results=[
            AssetCheckResult(check_name="loss_finite", passed=bool(losses) and all(math.isfinite(x) for x in losses)),
            AssetCheckResult(
                check_name="loss_falling", passed=last < first, metadata={"first_tenth": first, "last_tenth": last}
            ),
        ],
    )


def checkpoint_assets(step_tags: dict) -> tuple[AssetsDefinition, AssetsDefinition]:
    """The two training runs as assets. `step_tags`: GPU_TAGS when the training runs in the step (its
    pod on Kubernetes asks for the GPU); none when it runs in a GPU pod of its own (launcher "k8s")."""

    @asset(
        deps=[synthvlm_100k],
        kinds={"pytorch", "safetensors"},
        group_name="training",
        op_tags=step_tags,
        check_specs=_loss_checks(CHECKPOINT),
    )
    def llava_stage1_checkpoint(
        context: AssetExecutionContext, storage: StorageResource, training: TrainingResource
    ) -> MaterializeResult:
        """LLaVA-1.5 stage 1 on SynthVLM-100K: the projector trained, everything else frozen (SPEC §6). One
        materialization per training run; it runs through Dagster Pipes (a subprocess, under torchrun with
        several processes, or a GPU pod of its own) and resumes from the newest complete checkpoint."""
        root = storage.root()
        reported, run_prefix, summary = _launch(context, storage, training, training.stage1_settings())
        root.write_json(f"{STAGE1}/_manifest.json", {"run_prefix": run_prefix, "run_id": context.run.run_id, **{
            k: summary[k] for k in ("model", "recipe", "dataset_version", "steps", "samples", "tiny")}})  # fmt: skip
        label = TINY_LABEL if summary["tiny"] else ""
        return _training_result(
            reported,
            summary["losses"],
            f"stage 1 on SynthVLM ({summary['dataset_records']} records){label}",
            {
                "model": md_table(["part", "value"], [[k, v] for k, v in summary["model"].items()]),
                "recipe": md_table(
                    ["setting", "value"],
                    [[k, v] for k, v in summary["recipe"].items()]
                    + [["micro_batch", summary["micro_batch"]], ["accumulation", summary["accumulation"]]],
                ),
                "projector": MetadataValue.path(root.uri(f"{run_prefix}/{PROJECTOR}")),
                "preset": "tiny" + TINY_LABEL if summary["tiny"] else "pretrained weights",
            },
        )

    @asset(deps=[llava_stage1_checkpoint], kinds={"pytorch", "safetensors"}, group_name="training",
           op_tags=step_tags, check_specs=_loss_checks(STAGE2_CHECKPOINT))  # fmt: skip
    def llava_stage2_checkpoint(
        context: AssetExecutionContext, storage: StorageResource, training: TrainingResource
    ) -> MaterializeResult:
        """LLaVA-1.5 stage 2 (optional): instruction tuning of the projector and the LLM on a LLaVA-665K-format
        JSON you provide (`instruct_json`, `instruct_image_folder`), starting from the current stage-1 run;
        FSDP over several processes. Launched like stage 1 (Pipes, resumable)."""
        root = storage.root()
        stage1 = _current_run(root)
        reported, run_prefix, summary = _launch(
            context, storage, training, training.stage2_settings(), stage1["run_prefix"]
        )
        root.write_json(
            f"{STAGE2}/_manifest.json",
            {
                "run_prefix": run_prefix,
                "run_id": context.run.run_id,
                **{
                    k: summary[k]
                    for k in ("model", "recipe", "data", "data_version", "stage1_run_prefix", "steps", "tiny")
                },
            },
        )
        label = TINY_LABEL if summary["tiny"] else ""
        return _training_result(
            reported,
            summary["losses"],
            f"stage 2 on {summary['records']} conversations{label}",
            {
                "recipe": md_table(
                    ["setting", "value"],
                    [[k, v] for k, v in summary["recipe"].items() if k != "image_folder"]
                    + [
                        ["micro_batch", summary["micro_batch"]],
                        ["accumulation", summary["accumulation"]],
                        ["fsdp", summary["fsdp"]],
                    ],
                ),
                "instruct_json": MetadataValue.path(summary["data"]),
                "stage1_run": MetadataValue.path(root.uri(summary["stage1_run_prefix"])),
                "trained_weights": MetadataValue.path(root.uri(f"{run_prefix}/{TRAINABLE}")),
                "preset": "tiny" + TINY_LABEL if summary["tiny"] else "pretrained weights",
            },
        )

    return llava_stage1_checkpoint, llava_stage2_checkpoint


def _export(
    context: AssetExecutionContext, storage: StorageResource, training: TrainingResource, stage: str, export: str
) -> MaterializeResult:
    from synthvlm_assets.training.export import export_model

    root = storage.root()
    run = _current_run(root, stage)
    dest = f"{export}/{run['run_prefix'].rsplit('/', 1)[-1]}"
    manifest = export_model(root, run["run_prefix"], training.model_settings(), dest, {"run_id": context.run.run_id},
                            training.cache_dir, training.export_dtype)  # fmt: skip
    root.write_json(f"{export}/_manifest.json", {"prefix": dest, "run_prefix": run["run_prefix"]})
    return MaterializeResult(
        metadata={
            "export": MetadataValue.path(root.uri(dest)),
            "mm_projector_bin": MetadataValue.path(root.uri(f"{dest}/mm_projector.bin")),
            "files": md_table(["file", "bytes"], sorted(manifest["files"].items())),
            "dtype": manifest["dtype"],
            "load_with": MetadataValue.md(
                "`AutoModelForImageTextToText.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)`"
                + (TINY_LABEL if run.get("tiny") else "")
            ),  # fmt: skip
        }
    )


@asset(deps=[CHECKPOINT], kinds={"huggingface"}, group_name="training")
def llava_stage1_export(
    context: AssetExecutionContext, storage: StorageResource, training: TrainingResource
) -> MaterializeResult:
    """The trained stage-1 model in Hugging Face format (`LlavaForConditionalGeneration` + processor)
    plus LLaVA's `mm_projector.bin`, under `llava_stage1_export/<run>/`."""
    return _export(context, storage, training, STAGE1, EXPORT)


@asset(deps=[STAGE2_CHECKPOINT], kinds={"huggingface"}, group_name="training")
def llava_stage2_export(
    context: AssetExecutionContext, storage: StorageResource, training: TrainingResource
) -> MaterializeResult:
    """The instruction-tuned model in Hugging Face format, under `llava_stage2_export/<run>/`: what
    lmms-eval's `llava_hf` evaluates."""
    return _export(context, storage, training, STAGE2, STAGE2_EXPORT)


@asset(
    deps=[CHECKPOINT],
    kinds={"pytorch"},
    group_name="training",
    op_tags=GPU_TAGS,
    check_specs=[
        AssetCheckSpec(
            "heldout_loss_below_untrained",
            asset=SANITY,
            description="Held-out caption loss below the untrained model's.",
        ),
        AssetCheckSpec(
            "retrieval_above_chance",
            asset=SANITY,
            description="Image->caption retrieval from likelihoods beats chance.",
        ),
    ],
)
def llava_stage1_sanity_eval(
    context: AssetExecutionContext, storage: StorageResource, training: TrainingResource
) -> MaterializeResult:
    """Held-out caption loss and image->caption retrieval from the model's likelihoods, trained vs
    untrained (the same assembly with the fresh projector). A sanity check, not a benchmark."""
    from synthvlm_assets.training.evaluate import sanity_evaluation
    from synthvlm_assets.training.loop import load_weights

    root = storage.root()
    run = _current_run(root)
    projector = load_weights(root, f"{run['run_prefix']}/{PROJECTOR}")
    result = sanity_evaluation(
        root, training.model_settings(), projector, training.eval_settings(), training.cache_dir
    )
    root.write_bytes(f"{run['run_prefix']}/sanity_eval.json", json.dumps(result, indent=1).encode())
    t, u = result["trained"], result["untrained"]
    rows = [
        [name, r["heldout_loss"], r["retrieval_accuracy"], r["retrieval_chance"]]
        for name, r in (("trained", t), ("untrained", u))
    ]
    return MaterializeResult(
        metadata={
            "results": md_table(
                ["model", "held-out loss", f"retrieval accuracy ({t['retrieval_size']} images)", "chance"], rows
            ),
            "heldout_records": t["heldout_records"],
            "heldout_loss": t["heldout_loss"],
            "untrained_heldout_loss": u["heldout_loss"],
            "retrieval_accuracy": t["retrieval_accuracy"],
            "note": "tiny preset: random weights, meaningless" if run.get("tiny") else "pretrained weights",
        },
        check_results=[
            AssetCheckResult(
                check_name="heldout_loss_below_untrained",
                passed=t["heldout_loss"] < u["heldout_loss"],
                metadata={"trained": t["heldout_loss"], "untrained": u["heldout_loss"]},
            ),  # fmt: skip
            AssetCheckResult(
                check_name="retrieval_above_chance",
                passed=t["retrieval_accuracy"] > t["retrieval_chance"],
                metadata={"accuracy": t["retrieval_accuracy"], "chance": t["retrieval_chance"]},
            ),  # fmt: skip
        ],
    )
