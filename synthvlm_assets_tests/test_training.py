"""SPEC §6 on the CPU with tiny random models of the real architectures (tokenizers built in code)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.data import IGNORE_INDEX, PlainCollator, synthvlm_dataset
from synthvlm_assets.training.evaluate import EvalSettings, sanity_evaluation
from synthvlm_assets.training.model import (
    COMPILED_LENGTH_MULTIPLE,
    IMAGE_TOKEN,
    ModelSettings,
    ModelWeightsError,
    build_processor,
    clip_image_processor,
    compile_layers,
    freeze_all_but_projector,
    load_model,
    projector_state,
    tiny_vicuna_tokenizer,
    vision_token_count,
)
from synthvlm_assets.training.loop import load_weights
from synthvlm_assets.training.stage1 import (
    COMPLETE,
    Stage1Settings,
    complete_checkpoints,
    token_loss_sum,
    train_stage1,
)
from synthvlm_assets_tests.training_toy import publish_toy_dataset, save_tiny_parts


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """One intra-op thread for this module (what the tiny preset uses on CPUs; these parts load from
    folders, so it is set here): reductions then add up in one order whatever the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy SynthVLM-100K (coloured shapes) and tiny parts saved to folders like a user's weights.
    360 records: about 36 are held out (hashed ids), enough for retrieval to tell learning from luck."""
    folder = tmp_path_factory.mktemp("toy")
    storage = StorageRoot(str(folder / "root"))
    records = publish_toy_dataset(storage, 360)
    vision_dir, llm_dir = save_tiny_parts(str(folder), [r["conversations"][1]["value"] for r in records])
    return storage, ModelSettings(vision_tower=vision_dir, llm=llm_dir)


@pytest.fixture(scope="module")
def trained(toy):
    storage, model = toy
    settings = Stage1Settings.tiny_preset(lr=1e-2, epochs=5, holdout_fraction=0.1)
    return train_stage1(storage, model, settings), settings


def _batch(processor, model, captions, pad_to_multiple_of=1):
    from PIL import Image

    images = [Image.new("RGB", (40, 30 + 10 * i), (200, 20 * i, 0)) for i in range(len(captions))]
    collator = PlainCollator(processor, vision_token_count(model), pad_to_multiple_of=pad_to_multiple_of)
    return collator([(im, c, str(i)) for i, (im, c) in enumerate(zip(images, captions))])


def test_only_the_projector_receives_gradients():
    model, processor = load_model(ModelSettings.tiny_preset())
    trainable = freeze_all_but_projector(model)
    token_loss_sum(model, _batch(processor, model, ["a red circle", "a blue square on a table"])).backward()
    projector = {id(p) for p in model.model.multi_modal_projector.parameters()}
    assert {id(p) for p in trainable} == projector and len(projector) == 4  # two Linear layers, weights and biases
    for name, p in model.named_parameters():
        if id(p) in projector:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_plain_template_labels_mask_bos_image_tokens_and_padding():
    model, processor = load_model(ModelSettings.tiny_preset())
    tok = processor.tokenizer
    n = vision_token_count(model)
    batch = _batch(processor, model, ["a red circle", "a much longer caption of a blue square"])
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    for row in range(2):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        caption = ["a red circle", "a much longer caption of a blue square"][row]
        text = tok(caption + "\n", add_special_tokens=False)["input_ids"]
        length = 1 + n + len(text)
        assert (
            ids[0] == tok.bos_token_id and (ids[1 : 1 + n] == image_id).all() and ids[1 + n : length].tolist() == text
        )
        assert (labels[: 1 + n] == IGNORE_INDEX).all() and labels[1 + n : length].tolist() == text
        assert (labels[length:] == IGNORE_INDEX).all() and (ids[length:] == tok.pad_token_id).all()
        assert mask[:length].all() and not mask[length:].any()
    assert (batch["input_ids"][0] == tok.pad_token_id).sum() > 0  # the short caption was padded
    # The collator's expansion agrees with transformers' LlavaProcessor and the model's own placeholder check.
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    # The training loss (LM head on caption positions only, no attention mask: right padding under the
    # causal mask) equals transformers' own labels= loss with the padding mask.
    n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(token_loss_sum(model, batch) / n_tokens, out.loss, rtol=1e-5, atol=1e-6)
    # Padded to a multiple (a compiled run's collator): a static width, more padding, the same loss.
    wide = _batch(processor, model, ["a red circle", "a much longer caption of a blue square"], pad_to_multiple_of=64)
    assert wide["input_ids"].shape[1] % 64 == 0 and wide["input_ids"].shape[1] > batch["input_ids"].shape[1]
    assert (
        wide["attention_mask"].sum() == batch["attention_mask"].sum()
        and (wide["labels"] != IGNORE_INDEX).sum() == n_tokens
    )
    torch.testing.assert_close(token_loss_sum(model, wide), token_loss_sum(model, batch), rtol=1e-5, atol=1e-5)


def test_vision_tokens_at_336_px_are_576():
    """From the real CLIP ViT-L/14-336 configuration (no weights: the model lives on the meta device)."""
    from PIL import Image
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    clip_l_336 = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
        image_size=336, projection_dim=768,
    )  # fmt: skip
    tokenizer = tiny_vicuna_tokenizer()
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(
            LlavaConfig(vision_config=clip_l_336.to_dict(),
                        text_config={"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 1,
                                     "intermediate_size": 64, "num_attention_heads": 32, "vocab_size": len(tokenizer)},
                        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2)
        )  # fmt: skip
        features = model.model.get_image_features(
            torch.empty(1, 3, 336, 336), vision_feature_layer=-2, vision_feature_select_strategy="default"
        )
    assert vision_token_count(model) == 576
    assert features.pooler_output[0].shape == (576, 4096)
    processor = build_processor(clip_image_processor(336), tokenizer, patch_size=14)
    ids = processor(images=[Image.new("RGB", (500, 400))], text=[IMAGE_TOKEN + "a caption"])["input_ids"][0]
    assert sum(int(i == processor.image_token_id) for i in ids) == 576


def _binomial_tail(n: int, k: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the chance of k or more right answers by luck."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_toy_task_loss_falls_and_retrieval_beats_chance(toy, trained):
    storage, model_settings = toy
    result, settings = trained
    first, last = sum(result.loop.losses[:5]) / 5, sum(result.loop.losses[-5:]) / 5
    assert result.loop.steps == len(result.loop.losses) >= 24 and last < first - 1.0
    projector = load_weights(storage, f"{result.run_prefix}/projector.safetensors")
    # Every held-out item (about 36; retrieval_size is a cap).
    ev = sanity_evaluation(
        storage, model_settings, projector, EvalSettings(settings.holdout_fraction, retrieval_size=64)
    )
    assert ev["trained"]["heldout_loss"] < ev["untrained"]["heldout_loss"] - 1.0
    # Retrieval over every held-out item (each image against every caption), not a handful: the trained
    # model must beat chance by more than luck explains (one-sided binomial p < 0.001), and beat the untrained one.
    trained_ev, n = ev["trained"], ev["trained"]["retrieval_size"]
    hits = round(trained_ev["retrieval_accuracy"] * n)
    assert n >= 25, f"only {n} held-out items"
    p_luck = _binomial_tail(n, hits, trained_ev["retrieval_chance"])
    assert p_luck < 1e-3, f"{hits}/{n} right, chance {trained_ev['retrieval_chance']:.3f}: p = {p_luck:.2g}"
    assert trained_ev["retrieval_accuracy"] > ev["untrained"]["retrieval_accuracy"]
    # A finished run with the same data and recipe is found, not retrained.
    again = train_stage1(storage, model_settings, settings)
    assert again.run_prefix == result.run_prefix and again.loop.losses == result.loop.losses


def test_assembly_from_locally_saved_parts(toy):
    from transformers import AutoModelForCausalLM, CLIPModel

    _, settings = toy
    model, processor = load_model(settings)
    # The whole CLIP, as OpenAI publishes it.
    saved_vision = CLIPModel.from_pretrained(settings.vision_tower).vision_model
    saved_llm = AutoModelForCausalLM.from_pretrained(settings.llm)
    for name, p in saved_vision.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], p), name
    old_vocab = saved_llm.config.vocab_size
    assert torch.equal(model.lm_head.weight[:old_vocab], saved_llm.lm_head.weight)
    assert processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == old_vocab  # added by the assembly
    assert model.config.image_token_id == old_vocab and model.config.vision_feature_layer == -2
    with pytest.raises(ModelWeightsError, match="llm="):
        load_model(dataclasses.replace(settings, llm=settings.llm + "-missing"))
    with pytest.raises(ModelWeightsError, match="vision_tower="):
        load_model(dataclasses.replace(settings, vision_tower=settings.llm))  # a folder without a CLIP model


def test_export_reloads_through_auto_classes_with_equal_logits(toy, trained, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from synthvlm_assets.training.export import download_export, export_model

    storage, model_settings = toy
    result, _ = trained
    manifest = export_model(storage, result.run_prefix, model_settings, "export-test", dtype="fp32")
    assert storage.exists(f"export-test/{COMPLETE}") and "mm_projector.bin" in manifest["files"]
    local = download_export(storage, "export-test", str(tmp_path / "export"))
    reloaded, processor = AutoModelForImageTextToText.from_pretrained(local), AutoProcessor.from_pretrained(local)
    model, _ = load_model(model_settings)
    model.model.multi_modal_projector.load_state_dict(
        load_weights(storage, f"{result.run_prefix}/projector.safetensors")
    )
    batch = _batch(processor, reloaded, ["a red circle", "a green triangle"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    mm = torch.load(f"{local}/mm_projector.bin")
    assert sorted(mm) == [
        "model.mm_projector.0.bias",
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
        "model.mm_projector.2.weight",
    ]
    trained_state = projector_state(model)
    assert torch.equal(mm["model.mm_projector.2.weight"], trained_state["linear_2.weight"].to(torch.bfloat16))


def test_resume_from_the_newest_complete_checkpoint_is_bit_exact(tmp_path):
    settings = Stage1Settings.tiny_preset(checkpoint_every=2, holdout_fraction=0.1)
    model = ModelSettings.tiny_preset()
    roots = [StorageRoot(str(tmp_path / name)) for name in ("straight", "interrupted")]
    for root in roots:
        publish_toy_dataset(root, 100)
    straight = train_stage1(roots[0], model, settings)
    assert straight.loop.steps == 6
    # Interrupted after step 3: checkpoint 2 is complete; a half-written one (no marker) must be ignored.
    first = train_stage1(roots[1], model, dataclasses.replace(settings, stop_after_steps=3))
    assert first.loop.steps == 3 and [s for s, _ in complete_checkpoints(roots[1], first.run_prefix)] == [2]
    roots[1].write_bytes(f"{first.run_prefix}/checkpoints/step-0000004/projector.safetensors", b"half written")
    resumed = train_stage1(roots[1], model, settings)
    assert resumed.loop.resumed_from_step == 2 and resumed.loop.losses == straight.loop.losses
    a, b = (load_weights(r, f"{straight.run_prefix}/projector.safetensors") for r in roots)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in complete_checkpoints(roots[1], resumed.run_prefix)] == [4, 6]  # keep_checkpoints=2


def test_dataset_reads_the_current_version_and_splits_held_out(tmp_path):
    storage = StorageRoot(str(tmp_path))
    with pytest.raises(RuntimeError, match="materialize synthvlm_100k first"):
        synthvlm_dataset(storage)
    publish_toy_dataset(storage, 60)
    full, manifest = synthvlm_dataset(storage)
    train, _ = synthvlm_dataset(storage, "train", 0.2)
    held, _ = synthvlm_dataset(storage, "heldout", 0.2)
    assert len(full) == 60 and len(train) + len(held) == 60 and 0 < len(held) < 30
    assert not {r["id"] for r in train.records} & {r["id"] for r in held.records}
    image, caption, rid = full[0]
    assert image.size == (48, 48) and caption == "a red circle" and rid == "toy-00000"


def test_compiled_layers_train_like_eager(tmp_path):
    """Stage1Settings.compile (regional torch.compile, an execution setting) changes speed, not the result:
    the same run name and the same losses as eager."""
    from torch._dynamo.utils import counters

    model = ModelSettings.tiny_preset()
    runs = []
    counters.clear()
    for name, compiled in (("eager", False), ("compiled", True)):
        root = StorageRoot(str(tmp_path / name))
        publish_toy_dataset(root, 40)
        runs.append(train_stage1(root, model, Stage1Settings.tiny_preset(compile=compiled, stop_after_steps=2)))
    assert runs[0].run_prefix == runs[1].run_prefix and len(runs[1].loop.losses) == 2
    # One graph per layer kind (vision, decoder; the padded length rounded up to one static width), no
    # breaks: a KV cache in training (use_cache) recompiled per layer until dynamo's limit sent the layers
    # back to eager, and a dynamic-length graph ran at half speed (both seen on an H100).
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    torch.testing.assert_close(
        torch.tensor(runs[1].loop.losses), torch.tensor(runs[0].loop.losses), rtol=1e-5, atol=1e-6
    )


def test_compiled_layers_compile_one_static_graph_per_padded_width():
    """A compiled model sees one static graph per padded width (multiples of COMPILED_LENGTH_MULTIPLE),
    never a dynamic-length one: three widths give three decoder graphs (dynamo's automatic dynamic shapes
    would give two and run the third width through a dynamic graph, half as fast on an H100), and a width
    seen before compiles nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, processor = load_model(ModelSettings.tiny_preset())
    freeze_all_but_projector(model)
    compile_layers(model)
    captions = {w: ["a red circle " * k] for w, k in (("short", 1), ("middle", 6), ("long", 11))}
    widths = []
    for name in ("short", "middle", "long", "short"):
        batch = _batch(processor, model, captions[name], pad_to_multiple_of=COMPILED_LENGTH_MULTIPLE)
        widths.append(batch["input_ids"].shape[1])
        token_loss_sum(model, batch).backward()
    assert len(set(widths)) == 3 and all(w % COMPILED_LENGTH_MULTIPLE == 0 for w in widths)
    assert counters["stats"]["unique_graphs"] == 1 + 3 and not counters["graph_break"]  # vision + one per width
