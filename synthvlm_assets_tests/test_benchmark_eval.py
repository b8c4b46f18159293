"""llava_benchmark_eval: lmms-eval's llava_hf on an exported model, one benchmark per partition.

The tests marked `lmms_eval` run the real lmms-eval 0.7.3 (from .venv-eval, built by run_tests.sh, or
SYNTHVLM_LMMS_EVAL_PYTHON) on a tiny exported model and tiny local dataset copies written here in the
layout of the Hugging Face repos lmms-eval's tasks load (README configs + Parquet files); they are skipped
when no such environment exists. The tiny model is made to answer "A" (and stop) after "ASSISTANT:", so
every score is known in advance.
"""

import json
import os
import subprocess
import sys

import pytest

from synthvlm_assets.training import benchmark_eval as bench

EVAL_PYTHON = os.environ.get("SYNTHVLM_LMMS_EVAL_PYTHON") or bench.default_python()


def _lmms_eval_info():
    try:
        return bench.probe_lmms_eval(EVAL_PYTHON)
    except bench.LmmsEvalNotInstalled as exc:
        return exc


_INFO = _lmms_eval_info()
needs_lmms_eval = pytest.mark.skipif(isinstance(_INFO, Exception), reason=f"no lmms-eval environment: {_INFO}")

# lmms-eval 0.7.3's results JSON (the parts we read), as it wrote them for POPE in a real run here.
POPE_RESULTS = {
    "results": {
        "pope_local": {
            "alias": "pope_local",
            "pope_accuracy,none": 0.75,
            "pope_accuracy_stderr,none": "N/A",
            "pope_accuracy_stderr_clt,none": 0.0,
            "pope_accuracy_stderr_clustered,none": "N/A",
            "pope_precision,none": 1,
            "pope_precision_stderr,none": "N/A",
            "pope_precision_stderr_clt,none": 0.0,
            "pope_precision_stderr_clustered,none": "N/A",
            "pope_recall,none": 0.5,
            "pope_recall_stderr,none": "N/A",
            "pope_recall_stderr_clt,none": 0.0,
            "pope_recall_stderr_clustered,none": "N/A",
            "pope_f1_score,none": 0.6666666666666666,
            "pope_f1_score_stderr,none": "N/A",
            "pope_f1_score_stderr_clt,none": 0.0,
            "pope_f1_score_stderr_clustered,none": "N/A",
            "pope_yes_ratio,none": 0.5,
            "pope_yes_ratio_stderr,none": "N/A",
            "pope_yes_ratio_stderr_clt,none": 0.0,
            "pope_yes_ratio_stderr_clustered,none": "N/A",
        }
    },
    "n-samples": {"pope_local": {"original": 4, "effective": 4}},
    "lmms_eval_version": "unknown@unknown",
}


# ---------------------------------------------------------------- our side (no lmms-eval needed)


def test_task_table_has_only_specs_paper_numbers():
    sqa, mmlu = bench.TASKS["scienceqa_img"], bench.TASKS["mmlu"]
    assert [(p.size, p.synthvlm, p.llava15) for p in sqa.paper] == [("7B", 70.4, 69.3), ("13B", 74.9, 74.2)]
    assert [(p.size, p.synthvlm, p.llava15) for p in mmlu.paper] == [("7B", 41.2, 36.3), ("13B", 54.6, 52.4)]
    assert all(not t.paper for k, t in bench.TASKS.items() if k not in ("scienceqa_img", "mmlu"))
    row = bench.comparison_rows({"task": "gqa", "score": 61.9, "model_size": "7B"})
    assert row == [[bench.TASKS["gqa"].title, 61.9, "not in SPEC", "not in SPEC"]]
    rows = bench.comparison_rows({"task": "scienceqa_img", "score": 71.0, "model_size": "13B"})
    assert (
        rows[0][2:] == [70.4, 69.3]
        and rows[1][2:] == [74.9, 74.2]
        and "(our size)" in rows[1][0]
        and "(our size)" not in rows[0][0]
    )
    # MMLU stays in the table (its paper numbers) but is no partition: llava_hf cannot run text-only tasks.
    assert "mmlu" not in bench.RUNNABLE and set(bench.RUNNABLE) == set(bench.TASKS) - {"mmlu"}
    from synthvlm_assets.defs.evaluation import benchmark_tasks

    assert benchmark_tasks.get_partition_keys() == bench.RUNNABLE


def test_eval_extra_stays_out_of_dagsters_environment():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert (
        f"lmms-eval[video-legacy]=={bench.LMMS_EVAL_VERSION}" in pyproject["eval"]
        and "filelock>=3.20,<4" in pyproject["eval"]
    )
    assert not any(
        "eval" in req or "lmms" in req for req in pyproject["test"]
    )  # antlr4 4.7.2 would break Dagster's parser


def test_command():
    cmd = bench.lmms_eval_command(
        "/eval/bin/python", "/m/run-1", "scienceqa_img_local", "/w/output", "cpu", "/w/tasks", limit=8
    )
    assert cmd == [
        "/eval/bin/python",
        "-m",
        "lmms_eval",
        "--model",
        "llava_hf",
        "--model_args",
        "pretrained=/m/run-1,device=cpu,device_map=cpu",
        "--tasks",
        "scienceqa_img_local",
        "--batch_size",
        "1",
        "--output_path",
        "/w/output",
        "--log_samples",
        "--include_path",
        "/w/tasks",
        "--limit",
        "8",
        "--force_simple",
    ]
    cmd = bench.lmms_eval_command("py", "/m", "mme", "/o", "cuda", force_simple=False)
    assert (
        "pretrained=/m,device=cuda:0,device_map=cuda:0" in cmd
        and "--include_path" not in cmd
        and "--force_simple" not in cmd
    )
    assert bench.lmms_eval_command("py", "/m", "mme", "/o", "cpu", limit=0.25)[-3:-1] == ["--limit", "0.25"]
    with pytest.raises(bench.BenchmarkError, match="cannot hold"):
        bench.lmms_eval_command("py", "/m/a,b", "mme", "/o")


def test_parse_results_real_format():
    metrics = bench.parse_results(POPE_RESULTS, "pope_local")
    assert metrics == {
        "pope_accuracy": 0.75,
        "pope_precision": 1.0,
        "pope_recall": 0.5,
        "pope_f1_score": 0.6666666666666666,
        "pope_yes_ratio": 0.5,
    }
    other_filter = {
        "results": {
            "t": {"alias": "t", "exact_match,none": 0.5, "exact_match,flexible": 0.75, "exact_match_stderr,none": 0.1}
        }
    }
    assert bench.parse_results(other_filter, "t") == {"exact_match": 0.5, "exact_match,flexible": 0.75}
    with pytest.raises(bench.LmmsEvalFailed, match="no 'mme'"):
        bench.parse_results(POPE_RESULTS, "mme")


def test_clear_errors_before_running(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(bench.BenchmarkError, match="unknown benchmark"):
        bench.run_benchmark(str(model), "nope", str(tmp_path))
    with pytest.raises(bench.BenchmarkError, match="text-only"):
        bench.run_benchmark(str(model), "mmlu", str(tmp_path))
    with pytest.raises(bench.BenchmarkError, match="no config.json"):
        bench.run_benchmark(str(model), "scienceqa_img", str(tmp_path))
    (model / "config.json").write_text("{}")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(bench.BenchmarkError, match="OPENAI_API_KEY"):
        bench.run_benchmark(str(model), "mmvet", str(tmp_path))
    with pytest.raises(bench.LmmsEvalNotInstalled, match=r"cannot run .*`eval` extra"):
        bench.run_benchmark(str(model), "scienceqa_img", str(tmp_path), python=str(tmp_path / "no-python"))


def test_not_installed_names_the_extra():
    import importlib.util

    if importlib.util.find_spec("lmms_eval") is not None:
        pytest.skip("lmms-eval is installed beside Dagster here")
    with pytest.raises(bench.LmmsEvalNotInstalled) as err:
        bench.probe_lmms_eval(sys.executable)
    assert (
        "lmms-eval is not installed" in str(err.value)
        and "'.[eval]'" in str(err.value)
        and "setup_eval_env.sh" in str(err.value)
    )


# ---------------------------------------------------------------- with the real lmms-eval


def always_a_model(folder) -> str:
    """The tiny preset, saved as an export is: made a bigram model (attention and MLP outputs zeroed, so the
    last hidden state is the last token's embedding) that says "A" after ":" and "</s>" after "A"."""
    import torch

    from synthvlm_assets.training.model import ModelSettings, load_model

    model, processor = load_model(ModelSettings.tiny_preset())
    tok = processor.tokenizer
    colon, a, eos = (tok.convert_tokens_to_ids(t) for t in (":", "A", tok.eos_token))
    lm = model.model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = lm.embed_tokens.weight, model.lm_head.weight
        emb[colon], emb[a] = 0, 0
        emb[colon, 0], emb[a, 1] = 1, 1
        head.zero_()
        head[a, 0], head[eos, 1] = 10, 10
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return str(folder)


def _readme(configs: dict[str, dict[str, str]]) -> str:
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"] + [
            f"  - split: {s}\n    path: {p}" for s, p in splits.items()
        ]
    return "\n".join(lines + ["---", ""])


def scienceqa_copy(datasets_dir, answers: list[int], configs: dict | None = None) -> None:
    """lmms-lab-encoder/ScienceQA's layout: config ScienceQA-IMG, split test, its columns."""
    import datasets
    from PIL import Image

    repo = datasets_dir / "lmms-lab-encoder" / "ScienceQA"
    (repo / "ScienceQA-IMG").mkdir(parents=True)
    rows = [
        dict(
            image=Image.new("RGB", (48 + 8 * i, 40), (40 * i, 200 - 30 * i, 90)),
            question=f"Which is option {i}?",
            choices=["alpha", "beta", "gamma"],
            answer=ans,
            hint="" if i % 2 else "A hint.",
            task="closed choice",
            grade="grade3",
            subject="natural science",
            topic="physics",
            category="c",
            skill="s",
            lecture="",
            solution="",
        )
        for i, ans in enumerate(answers)
    ]
    text = datasets.Value("string")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": text,
            "choices": datasets.List(text),
            "answer": datasets.Value("int8"),
            **{
                k: text
                for k in ("hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")
            },
        }
    )
    datasets.Dataset.from_list(rows, features=features).to_parquet(
        str(repo / "ScienceQA-IMG" / "test-00000-of-00001.parquet")
    )
    (repo / "README.md").write_text(_readme(configs or {"ScienceQA-IMG": {"test": "ScienceQA-IMG/test-*"}}))


def gqa_copy(datasets_dir, questions: list[tuple[str, str, str]]) -> None:
    """lmms-lab-encoder/GQA's layout: the questions (testdev_balanced_instructions) and, by image id, the
    images (testdev_balanced_images), split testdev."""
    import datasets
    from PIL import Image

    repo = datasets_dir / "lmms-lab-encoder" / "GQA"
    for config in ("testdev_balanced_instructions", "testdev_balanced_images"):
        (repo / config).mkdir(parents=True)
    datasets.Dataset.from_list(
        [
            dict(id=f"q{i}", imageId=image_id, question=q, answer=a, fullAnswer=a, isBalanced=True)
            for i, (image_id, q, a) in enumerate(questions)
        ]
    ).to_parquet(  # fmt: skip
        str(repo / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet")
    )
    images = sorted({image_id for image_id, _, _ in questions})
    datasets.Dataset.from_list(
        [dict(id=i, image=Image.new("RGB", (40, 30 + 10 * k), (200, 20 * k, 0))) for k, i in enumerate(images)],
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()}),
    ).to_parquet(str(repo / "testdev_balanced_images" / "testdev-00000-of-00001.parquet"))
    (repo / "README.md").write_text(
        _readme(
            {c: {"testdev": f"{c}/testdev-*"} for c in ("testdev_balanced_images", "testdev_balanced_instructions")}
        )
    )


@needs_lmms_eval
def test_task_table_matches_lmms_eval():
    """Every partition is a task of the installed lmms-eval, its headline metric is one of the task's
    metrics, and its data comes from one Hub dataset repo (what a local copy replaces)."""
    assert _INFO.version == bench.LMMS_EVAL_VERSION
    index = bench.TaskIndex(_INFO.tasks_dir)
    for key in bench.RUNNABLE:
        task = bench.TASKS[key]
        cfg = index.config(index.tasks[task.lmms_task])
        assert task.metric in [m["metric"] for m in cfg["metric_list"]], key
        repo = bench.dataset_repos(index, task.lmms_task)[task.lmms_task]
        assert repo.count("/") == 1, (key, repo)
    assert "mmlu" not in index.tasks  # a group: lmms-eval runs it as 57 tasks


@needs_lmms_eval
def test_missing_local_copy_names_the_download(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(bench.DatasetNotAvailable) as err:
        bench.run_benchmark(
            str(model), "gqa", str(tmp_path / "run"), python=EVAL_PYTHON, datasets_dir=str(tmp_path / "data")
        )
    target = tmp_path / "data" / "lmms-lab-encoder" / "GQA"
    assert f"hf download lmms-lab-encoder/GQA --repo-type dataset --local-dir {target}" in str(err.value)


@needs_lmms_eval
def test_llava_hf_prompt_is_stage2_training_prompt(tmp_path):
    """llava_hf's simple adapter (--force_simple) prompts with the vicuna_v1 text stage 2 trains on."""
    from synthvlm_assets.training.data import vicuna_prompt

    folder = always_a_model(tmp_path / "model")
    script = (
        "import sys; from transformers import AutoProcessor; from lmms_eval.models.simple.llava_hf import "
        "VICUNA_CHAT_TEMPLATE as T\n"
        "tok = AutoProcessor.from_pretrained(sys.argv[1]).tokenizer; tok.chat_template = T\n"
        "print(tok.apply_chat_template([{'role': 'user', 'content': sys.argv[2]}], tokenize=False, "
        "add_generation_prompt=True), end='')"
    )
    question = "<image>\nWhat is shown?\nAnswer the question using a single word or phrase."
    out = subprocess.run(
        [EVAL_PYTHON, "-c", script, folder, question], capture_output=True, text=True, check=True
    ).stdout
    trained, _ = vicuna_prompt([{"from": "human", "value": question}, {"from": "gpt", "value": "A cat"}])
    assert trained.startswith(out + " ") and trained[len(out) + 1 :] == "A cat</s>"


@needs_lmms_eval
def test_asset_runs_lmms_eval_on_stage2_export(tmp_path):
    """The whole path: the current stage-2 export from the storage root, lmms-eval on a local ScienceQA-IMG
    copy, the score (3 of 5 answers are A) beside the paper's, the parsed JSON in storage."""
    from dagster import instance_for_test

    from synthvlm_assets.defs.build import Settings, build_definitions
    from synthvlm_assets.defs.evaluation import BENCHMARK_JOB
    from synthvlm_assets.storage import StorageRoot

    root = StorageRoot(str(tmp_path / "root"))
    model = always_a_model(tmp_path / "model")
    prefix = "llava_stage2_export/run-tiny"
    files = {name: os.path.getsize(os.path.join(model, name)) for name in os.listdir(model)}
    for name in files:
        root.put_file(os.path.join(model, name), f"{prefix}/{name}")
    root.write_bytes(f"{prefix}/_COMPLETE", json.dumps({"files": files}).encode())
    root.write_json("llava_stage2_export/_manifest.json", {"prefix": prefix})
    data = tmp_path / "data"
    scienceqa_copy(data, answers=[0, 1, 0, 2, 0])

    settings = Settings(
        storage_root=root.root_uri,
        benchmark_eval={"datasets_dir": str(data), "lmms_eval_python": EVAL_PYTHON, "device": "cpu"},
    )
    job = build_definitions(settings).resolve_job_def(BENCHMARK_JOB)
    with instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, partition_key="scienceqa_img")
        assert result.success
        [mat] = [e.event_specific_data.materialization for e in result.get_asset_materialization_events()]
        logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    meta = mat.metadata
    assert (
        meta["score"].value == pytest.approx(60.0)
        and meta["samples"].value == 5
        and meta["lmms_eval_version"].value == "0.7.3"
    )
    comparison = meta["comparison"].value
    assert "| 60 | 70.4 | 69.3 |" in comparison and "| 60 | 74.9 | 74.2 |" in comparison
    assert "--include_path" in meta["command"].value and "scienceqa_img_local" in meta["command"].value
    stored = root.read_json("llava_benchmark_eval/llava_stage2_export/run-tiny/scienceqa_img.json")
    assert stored["metrics"] == {"exact_match": pytest.approx(0.6)} and stored["score"] == pytest.approx(60.0)
    assert stored["model"] == root.uri(prefix) and "scienceqa_img_local" in stored["lmms_eval_results"]["results"]
    assert any("Selected Tasks: ['scienceqa_img_local']" in m for m in logs)  # lmms-eval's own log, streamed


@needs_lmms_eval
def test_gqa_local_copy_takes_images_from_the_copy(tmp_path):
    """GQA's images are loaded by lmms-eval's code from the Hub; the override loads them from the copy."""
    model = always_a_model(tmp_path / "model")
    gqa_copy(
        tmp_path / "data",
        [
            ("img1", "Which letter?", "a"),
            ("img2", "Is it red?", "no"),
            ("img1", "Letter?", "A"),
            ("img2", "Blue?", "yes"),
        ],
    )
    result = bench.run_benchmark(
        model,
        "gqa",
        str(tmp_path / "run"),
        python=EVAL_PYTHON,
        datasets_dir=str(tmp_path / "data"),
        device="cpu",
        log=lambda line: None,
    )
    assert result["lmms_task"] == "gqa_local" and result["samples"] == 4
    assert result["metrics"]["exact_match"] == pytest.approx(0.5) and result["score"] == pytest.approx(50.0)


@needs_lmms_eval
def test_broken_local_copy_fails_clearly(tmp_path):
    """lmms-eval logs the error and exits 0: the run still fails, with the loader's message."""
    model = always_a_model(tmp_path / "model")
    scienceqa_copy(tmp_path / "data", [0, 1], configs={"ScienceQA-FULL": {"test": "ScienceQA-IMG/test-*"}})
    lines = []
    with pytest.raises(bench.DatasetNotAvailable, match="ScienceQA-IMG") as err:
        bench.run_benchmark(
            model,
            "scienceqa_img",
            str(tmp_path / "run"),
            python=EVAL_PYTHON,
            datasets_dir=str(tmp_path / "data"),
            device="cpu",
            log=lines.append,
        )
    assert "does not load" in str(err.value) and any("Error during evaluation" in line for line in lines)


@needs_lmms_eval
def test_without_copies_or_hub_names_datasets_dir(tmp_path):
    """No datasets_dir: lmms-eval goes to the Hub, which this run cannot reach (offline, empty HF cache)."""
    model = always_a_model(tmp_path / "model")
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    with pytest.raises(
        bench.DatasetNotAvailable, match=r"Couldn't reach 'lmms-lab-encoder/ScienceQA'.*set `datasets_dir`"
    ):
        bench.run_benchmark(
            model,
            "scienceqa_img",
            str(tmp_path / "new" / "run"),
            python=EVAL_PYTHON,
            device="cpu",
            env=env,
            log=lambda line: None,
        )


def test_exports_are_used_in_place_or_fetched_once_per_version(tmp_path, seaweedfs, monkeypatch):
    """A local export is read where it is; an S3 export is copied into the cache once per version (its
    `_COMPLETE` manifest), not once per benchmark partition."""
    from synthvlm_assets.defs import evaluation
    from synthvlm_assets.storage import StorageRoot
    from synthvlm_assets.training import export

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    local = StorageRoot(str(tmp_path / "root"))
    s3 = StorageRoot(f"s3://{seaweedfs.make_bucket()}/root", s3_endpoint_url=seaweedfs.endpoint)
    for root in (local, s3):
        root.write_bytes("llava_stage2_export/run1/config.json", b"{}")
        root.write_json("llava_stage2_export/run1/_COMPLETE", {"files": {"config.json": 2}})
        root.write_json("llava_stage2_export/_manifest.json", {"prefix": "llava_stage2_export/run1"})
    assert evaluation.fetch_model(local, "llava_stage2_export")[0] == local.path("llava_stage2_export/run1")
    folder, name, _ = evaluation.fetch_model(s3, "llava_stage2_export")
    assert name == "llava_stage2_export/run1" and os.path.exists(os.path.join(folder, "config.json"))
    copies = []
    monkeypatch.setattr(export, "download_export", lambda *a: copies.append(a))
    assert evaluation.fetch_model(s3, "llava_stage2_export")[0] == folder and not copies  # cached
    s3.write_json("llava_stage2_export/run1/_COMPLETE", {"files": {"config.json": 2}, "dtype": "fp32"})  # re-exported
    with pytest.raises(FileNotFoundError):  # a new version is fetched again (the stub copies nothing)
        evaluation.fetch_model(s3, "llava_stage2_export")
    assert len(copies) == 1
    with pytest.raises(bench.BenchmarkError, match="not a complete export"):
        evaluation.fetch_model(local, "llava_stage2_export/none")
