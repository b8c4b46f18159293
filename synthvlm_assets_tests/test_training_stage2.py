"""SPEC §6 stage 2 (instruction tuning) on the CPU at tiny scale: the vicuna_v1 template and its labels,
our LLaVA forward against transformers', training the projector + LLM, FSDP over 2 processes (gloo)
against one process, and bit-exact resume under FSDP."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.data import (
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    ConversationCollator,
    DatasetError,
    vicuna_prompt,
)
from synthvlm_assets.training.loop import complete_checkpoints, load_weights
from synthvlm_assets.training.model import IMAGE_TOKEN, ModelSettings, load_model, vision_token_count
from synthvlm_assets.training.stage1 import Stage1Settings, token_loss_sum, train_stage1
from synthvlm_assets.training.stage2 import (
    TRAINABLE,
    Stage2Settings,
    instruct_dataset,
    llava_loss_module,
    loss_sum,
    stage2_trainable,
    train_stage2,
)
from synthvlm_assets_tests.training_toy import publish_toy_dataset, publish_toy_instructions

CONVERSATION = [
    {"from": "human", "value": "What colour is it?\n<image>"},
    {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "And the shape?"},
    {"from": "gpt", "value": "A circle."},
]


def _settings(root: StorageRoot, **overrides) -> Stage2Settings:
    return Stage2Settings.tiny_preset(
        instruct_json=root.uri("instruct/toy_665k.json"),
        image_folder=root.uri("instruct/images"),
        lr=1e-3,
        **overrides,
    )


@pytest.fixture(scope="module")
def stage1_root(tmp_path_factory):
    """A finished tiny stage-1 run and a toy LLaVA-665K beside it (the template every test copies)."""
    root = StorageRoot(str(tmp_path_factory.mktemp("stage2") / "root"))
    publish_toy_dataset(root, 60)
    publish_toy_instructions(root, 48)
    run = train_stage1(root, ModelSettings.tiny_preset(), Stage1Settings.tiny_preset())
    return root, run.run_prefix


def test_vicuna_v1_prompt_is_llavas_and_labels_cover_the_answers_only():
    text, spans = vicuna_prompt(CONVERSATION)
    # LLaVA's conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>"), `<image>` moved to the front of its turn.
    assert (
        text
        == VICUNA_SYSTEM
        + " USER: <image>\nWhat colour is it? ASSISTANT: Red.</s>USER: And the shape? ASSISTANT: A circle.</s>"
    )
    assert [text[a:b] for a, b in spans] == ["Red.</s>", "A circle.</s>"]

    model, processor = load_model(ModelSettings.tiny_preset())
    tok, n = processor.tokenizer, vision_token_count(model)
    collator = ConversationCollator(processor, n)
    ids, labels = collator.encode(CONVERSATION)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == n and ids[0] == tok.bos_token_id
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert [lab for lab in labels if lab != IGNORE_INDEX] == trained
    answers = tok("Red.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    answers += tok("A circle.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert trained == answers  # the byte-level tiny tokenizer: exact token boundaries
    # The expansion is the processor's: the same ids as transformers' LlavaProcessor on the same text.
    from PIL import Image

    via_processor = processor(images=[Image.new("RGB", (32, 32))], text=[text])["input_ids"][0]
    assert list(via_processor) == ids


def _sentencepiece_style_tokenizer():
    """Vicuna's kind of tokenizer, built in code: BPE over Metaspace pieces (a piece never spans a word
    boundary, "▁" starts words), byte fallback, BOS prepended, merges trained on the template's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["What colour is it? Red. And the shape? A circle. It is red. A blue square on a table."] * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=[f"<0x{i:02X}>" for i in range(256)]
    )
    tok.train_from_iterator(texts + [VICUNA_SYSTEM + " USER: ASSISTANT:"] * 50, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def test_answer_labels_with_a_sentencepiece_style_tokenizer():
    """With Vicuna's kind of tokenizer (whole words with their leading "▁", merges across the template),
    the trained tokens are each answer tokenised alone plus `</s>`: what LLaVA's preprocess_v1 masks to."""
    from synthvlm_assets.training.model import build_processor, clip_image_processor

    tok = _sentencepiece_style_tokenizer()
    collator = ConversationCollator(build_processor(clip_image_processor(32), tok, patch_size=8), 16)
    ids, labels = collator.encode(CONVERSATION)
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    answers = [
        t for a in ("Red.", "A circle.") for t in tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ]
    assert trained == answers and len(tok.convert_ids_to_tokens(answers)) < len(
        "Red.A circle."
    )  # real merges, not bytes


def test_batches_mix_image_and_text_only_records_and_text_only_batches_get_a_flagged_dummy(stage1_root):
    root, _ = stage1_root
    data = instruct_dataset(_settings(root))
    model, processor = load_model(ModelSettings.tiny_preset())
    collator = ConversationCollator(processor, vision_token_count(model))
    with_image = [data[i] for i in range(4)]  # record 3 is text-only
    assert with_image[3][0] is None and with_image[0][0] is not None
    batch = collator(with_image)
    assert batch["pixel_values"].shape[0] == 3 and not batch["dummy_image"]
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 3 * vision_token_count(model)
    text_only = collator([data[3], data[7]])
    assert text_only["pixel_values"].shape[0] == 1 and text_only["dummy_image"]
    assert not (text_only["input_ids"] == model.config.image_token_id).any()
    # A cut inside the image drops the image rather than leaving a partial one.
    cut = ConversationCollator(processor, vision_token_count(model), max_length=vision_token_count(model) + 2)
    out = cut([with_image[0]])
    assert out["dummy_image"] and not (out["input_ids"] == model.config.image_token_id).any()


def test_our_llava_forward_equals_transformers_loss():
    """The loss module (what FSDP wraps) computes what LlavaForConditionalGeneration computes."""
    from PIL import Image

    model, processor = load_model(ModelSettings.tiny_preset())
    model.eval()
    collator = ConversationCollator(processor, vision_token_count(model))
    image = Image.new("RGB", (40, 30), (200, 40, 0))
    batch = collator([(image, CONVERSATION, "a"), (image.rotate(90), CONVERSATION[:2], "b")])
    module = llava_loss_module(model)
    ours = loss_sum(module, batch)
    theirs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        labels=batch["labels"],
    ).loss
    n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours / n_tokens, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, token_loss_sum(model, batch), rtol=1e-5, atol=1e-5)


def test_stage2_trains_projector_and_llm_not_the_vision_tower(stage1_root, tmp_path):
    template, stage1_run = stage1_root
    root = StorageRoot(str(tmp_path / "root"))
    _copy(template, root)
    settings = _settings(root, epochs=3)
    result = train_stage2(root, ModelSettings.tiny_preset(), stage1_run, settings)
    losses = result.loop.losses
    assert result.loop.steps == 18 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    trained = load_weights(root, f"{result.run_prefix}/{TRAINABLE}")
    before, _ = load_model(ModelSettings.tiny_preset())
    names = stage2_trainable(before)
    assert set(trained) == set(names) and not any(n.startswith("model.vision_tower.") for n in names)
    assert any(n.startswith("model.multi_modal_projector.") for n in names) and "lm_head.weight" in names
    start = before.state_dict()
    projector = load_weights(root, f"{stage1_run}/projector.safetensors")
    for name, weight in trained.items():
        initial = (
            projector[name.removeprefix("model.multi_modal_projector.")]
            if "multi_modal_projector" in name
            else start[name]
        )
        assert not torch.equal(weight, initial), f"{name} did not train"
    # The export holds the trained weights and an untouched vision tower.
    from synthvlm_assets.training.export import export_model

    export_model(root, result.run_prefix, ModelSettings.tiny_preset(), "export2", dtype="fp32")
    from transformers import AutoModelForImageTextToText

    from synthvlm_assets.training.export import download_export

    reloaded = AutoModelForImageTextToText.from_pretrained(
        download_export(root, "export2", str(tmp_path / "export"))
    ).state_dict()
    assert torch.equal(reloaded["lm_head.weight"], trained["lm_head.weight"])
    vision = [k for k in start if k.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(reloaded[k], start[k]) for k in vision)
    # Found finished, not retrained.
    again = train_stage2(root, ModelSettings.tiny_preset(), stage1_run, settings)
    assert again.run_prefix == result.run_prefix and again.loop.losses == losses


def _copy(src: StorageRoot, dst: StorageRoot) -> None:
    import shutil

    shutil.copytree(src.root_uri, dst.root_uri, dirs_exist_ok=True)


def _torchrun(tmp_path, root: StorageRoot, stage1_run: str, settings: Stage2Settings) -> dict:
    """Stage 2 in 2 CPU processes (torchrun, gloo, FSDP; rank 1 cannot load weights); returns rank 0's summary."""
    script = tmp_path / "stage2_run.py"
    script.write_text(
        "import json, sys\n"
        "from synthvlm_assets.storage import StorageRoot\n"
        "from synthvlm_assets.training.model import ModelSettings\n"
        "from synthvlm_assets.training.stage2 import Stage2Settings, train_stage2\n"
        "cfg = json.load(open(sys.argv[1]))\n"
        "import os, synthvlm_assets.training.stage2 as stage2\n"
        "if os.environ['RANK'] != '0':  # only rank 0 reads the weights; the others get theirs broadcast\n"
        "    stage2.load_model = lambda *a, **k: (_ for _ in ()).throw(AssertionError('rank > 0 loaded the model'))\n"
        "root = StorageRoot(cfg['root'], cfg['endpoint'])\n"
        "r = train_stage2(root, ModelSettings.tiny_preset(), cfg['stage1'], Stage2Settings(**cfg['settings']))\n"
        "if __import__('os').environ['RANK'] == '0':\n"
        "    json.dump({'run_prefix': r.run_prefix, 'losses': r.loop.losses, 'resumed': r.loop.resumed_from_step,\n"
        "               'fsdp': r.summary['fsdp'], 'steps': r.loop.steps}, open(sys.argv[2], 'w'))\n"
    )
    cfg, out = tmp_path / "cfg.json", tmp_path / "out.json"
    cfg.write_text(json.dumps({"root": root.root_uri, "endpoint": root.s3_endpoint_url, "stage1": stage1_run,
                               "settings": dataclasses.asdict(settings)}))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(cfg),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_fsdp_two_processes_equal_one_process_and_resume_bit_exact(stage1_root, tmp_path):
    template, stage1_run = stage1_root
    roots = {name: StorageRoot(str(tmp_path / "shared" / name)) for name in ("single", "fsdp", "interrupted")}
    for root in roots.values():
        _copy(template, root)
    # One image folder for all three, so the runs have the same name (the folder is part of the recipe).
    settings = _settings(template, checkpoint_every=2)
    single = train_stage2(roots["single"], ModelSettings.tiny_preset(), stage1_run, settings)
    sharded = _torchrun(tmp_path, roots["fsdp"], stage1_run, settings)
    assert sharded["fsdp"] and sharded["run_prefix"] == single.run_prefix and sharded["steps"] == 6
    a = load_weights(roots["single"], f"{single.run_prefix}/{TRAINABLE}")
    b = load_weights(roots["fsdp"], f"{single.run_prefix}/{TRAINABLE}")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(single.loop.losses), rtol=1e-5, atol=1e-6)
    # Adam hides a constant gradient scale from the weights: the gradient norms show FSDP's reduction is a sum,
    # as here.
    norms = [
        [roots[n].read_json(f"{single.run_prefix}/metrics/step-{s:07d}.json")["grad_norm"] for s in range(1, 7)]
        for n in ("single", "fsdp")
    ]
    torch.testing.assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]), rtol=1e-4, atol=1e-6)

    # Under FSDP: interrupted after step 3 (checkpoint 2 complete), resumed -> the same weights bit for bit.
    first = _torchrun(tmp_path, roots["interrupted"], stage1_run, dataclasses.replace(settings, stop_after_steps=3))
    assert first["steps"] == 3 and [s for s, _ in complete_checkpoints(roots["interrupted"], first["run_prefix"])] == [
        2
    ]
    checkpoint = f"{first['run_prefix']}/checkpoints/step-0000002"
    assert roots["interrupted"].exists(f"{checkpoint}/shards/.metadata") and not roots["interrupted"].exists(
        f"{checkpoint}/{TRAINABLE}"
    )
    resumed = _torchrun(tmp_path, roots["interrupted"], stage1_run, settings)
    assert resumed["resumed"] == 2 and resumed["losses"] == sharded["losses"]
    c = load_weights(roots["interrupted"], f"{single.run_prefix}/{TRAINABLE}")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_clear_errors_for_missing_or_malformed_instruction_data(stage1_root, tmp_path):
    template, stage1_run = stage1_root
    root = StorageRoot(str(tmp_path / "root"))
    _copy(template, root)
    with pytest.raises(DatasetError, match="needs instruct_json"):
        train_stage2(root, ModelSettings.tiny_preset(), stage1_run, Stage2Settings.tiny_preset())
    with pytest.raises(DatasetError, match="missing.json"):
        instruct_dataset(Stage2Settings(instruct_json=root.uri("instruct/missing.json")))
    bad = [
        {
            "id": "x",
            "image": "a.jpg",
            "conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "ok"}],
        }
    ]
    root.write_json("instruct/bad.json", bad)
    with pytest.raises(DatasetError, match=r"record 0 \(x\).*0 '<image>' placeholders"):
        instruct_dataset(
            Stage2Settings(instruct_json=root.uri("instruct/bad.json"), image_folder=root.uri("instruct/images"))
        )
    root.write_json(
        "instruct/bad.json",
        [{"id": "y", "conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]}],
    )
    with pytest.raises(DatasetError, match="alternate"):
        instruct_dataset(Stage2Settings(instruct_json=root.uri("instruct/bad.json")))
    with pytest.raises(FileNotFoundError, match="finished stage-1 run"):
        train_stage2(root, ModelSettings.tiny_preset(), "llava_stage1/none", _settings(root))


def test_fsdp_sharded_checkpoints_and_data_on_s3(stage1_root, tmp_path, seaweedfs):
    """Every process writes and reads its checkpoint shards on S3 (SeaweedFS); the instruction data and
    the stage-1 projector are read from there too."""
    template, stage1_run = stage1_root
    root = StorageRoot(f"s3://{seaweedfs.make_bucket()}/run", s3_endpoint_url=seaweedfs.endpoint)
    root.fs.put(template.path("instruct"), root.path("instruct"), recursive=True)
    root.fs.put(template.path(stage1_run), root.path(stage1_run), recursive=True)
    settings = _settings(root, checkpoint_every=2)
    first = _torchrun(tmp_path, root, stage1_run, dataclasses.replace(settings, stop_after_steps=3))
    assert root.exists(f"{first['run_prefix']}/checkpoints/step-0000002/shards/.metadata")
    resumed = _torchrun(tmp_path, root, stage1_run, settings)
    assert resumed["resumed"] == 2 and resumed["steps"] == 6 and resumed["fsdp"]
    # The same losses as the straight run on a local copy (the data order does not depend on where it lives).
    local = StorageRoot(str(tmp_path / "local"))
    _copy(template, local)
    straight = train_stage2(local, ModelSettings.tiny_preset(), stage1_run, _settings(template, checkpoint_every=2))
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(straight.loop.losses), rtol=1e-5, atol=1e-6
    )
    assert root.exists(f"{resumed['run_prefix']}/{TRAINABLE}")
