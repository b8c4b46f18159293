"""A toy SynthVLM-100K the tiny LLaVA can learn: coloured shapes with matching captions, published in
the real layout (LLaVA JSON + images + `synthvlm_100k/_manifest.json`)."""

from __future__ import annotations

import io
import itertools

from synthvlm_assets.formats.dataset import ASSET
from synthvlm_assets.formats.llava import image_path, llava_record
from synthvlm_assets.storage import StorageRoot

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square", "triangle")


def shape_image(colour: str, shape: str, jitter: int, size: int = 48) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    lo, hi = 8 + jitter % 5, size - 8 - (jitter // 5) % 5
    box = (lo, lo, hi, hi)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def publish_toy_dataset(storage: StorageRoot, n: int = 180, version: str = "toy0001") -> list[dict]:
    pairs = list(itertools.product(COLOURS, SHAPES))
    records = []
    base = f"{ASSET}/{version}"
    for i in range(n):
        colour, shape = pairs[i % len(pairs)]
        cid = f"toy-{i:05d}"
        rec = llava_record(cid, f"a {colour} {shape}", i + 1)
        storage.write_bytes(f"{base}/{rec['image']}", shape_image(colour, shape, i // len(pairs)))
        records.append(rec)
    storage.write_json(f"{base}/{ASSET}.json", records)
    storage.write_json(f"{ASSET}/_manifest.json", {"version": version, "prefix": base, "records": n, "tiny": True})
    assert image_path(1, "toy-00000") == records[0]["image"]
    return records


def save_tiny_parts(folder: str, captions: list[str], pretrain_steps: int = 150, seed: int = 0) -> tuple[str, str]:
    """Tiny random parts saved as a user's pretrained weights would be: a CLIP vision tower with its
    image processor, and a Llama with a tokenizer that has no `<image>` token. The Llama is first
    trained on the captions' text alone (a stand-in for a pretrained LLM: a random one is too flat to
    learn from). Returns (vision folder, llm folder)."""
    import torch

    from synthvlm_assets.training.model import _tiny_parts

    vision, image_processor, llm, tokenizer = _tiny_parts(seed, with_image_token=False)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(llm.parameters(), lr=1e-2)
    texts = [c + "\n" for c in captions]
    for step in range(pretrain_steps):
        batch = tokenizer(texts[(step * 16) % len(texts) :][:16] or texts[:16], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = llm(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    vision_dir, llm_dir = f"{folder}/clip-vision", f"{folder}/llama"
    # Saved as a whole CLIP (text tower too), the way openai/clip-vit-large-patch14-336 is published.
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "vocab_size": 100,
                "bos_token_id": 0,
                "eos_token_id": 1,
                "pad_token_id": 1,
            },
            vision_config=vision.config.to_dict(),
            projection_dim=32,
        )
    )
    clip.vision_model.load_state_dict(vision.state_dict())
    clip.save_pretrained(vision_dir)
    image_processor.save_pretrained(vision_dir)
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return vision_dir, llm_dir


def publish_toy_instructions(storage: StorageRoot, n: int = 48, text_only_every: int = 4) -> str:
    """A toy LLaVA-665K: questions about the shapes' colour and kind (one or two turns), every
    `text_only_every`-th record a text-only conversation, in `instruct/toy_665k.json` with images
    under `instruct/images/`. Returns the JSON's key."""
    pairs = list(itertools.product(COLOURS, SHAPES))
    records = []
    for i in range(n):
        colour, shape = pairs[i % len(pairs)]
        if text_only_every and i % text_only_every == text_only_every - 1:
            records.append(
                {
                    "id": f"text-{i}",
                    "conversations": [
                        {"from": "human", "value": f"Name a {shape}-shaped thing."},
                        {"from": "gpt", "value": f"A {shape} is a {shape}."},
                    ],
                }
            )
            continue
        image = f"coco/{i:06d}.jpg"
        storage.write_bytes(f"instruct/images/{image}", shape_image(colour, shape, i // len(pairs)))
        turns = [
            {"from": "human", "value": "What colour is the shape?\n<image>"},
            {"from": "gpt", "value": f"It is {colour}."},
        ]
        if i % 2:
            turns += [{"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": f"A {shape}."}]
        records.append({"id": f"q-{i}", "image": image, "conversations": turns})
    storage.write_json("instruct/toy_665k.json", records)
    return "instruct/toy_665k.json"
