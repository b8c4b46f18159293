"""SynthVLM-100K as training samples: the LLaVA JSON and its images read through the storage root, and
the collator of stage 1's "plain" template."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from synthvlm_assets.formats.dataset import ASSET as DATASET
from synthvlm_assets.storage import StorageRoot

IGNORE_INDEX = -100  # labels the loss skips (transformers' and LLaVA's value)
PLAIN_SEPARATOR = "\n"  # LLaVA's "plain" conversation ends each caption with its separator


class DatasetError(RuntimeError):
    """The training data is missing or malformed; the message names the object."""


def is_held_out(record_id: str, fraction: float) -> bool:
    """A fixed, seed-free split: the same records are held out in every run and on every rank."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(record_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


class LlavaJsonDataset:
    """The records of a LLaVA-format JSON (`{"id", "image", "conversations"}`) with images under
    `image_prefix`, both read through the storage root. Item i is (PIL image, caption, id)."""

    def __init__(self, storage: StorageRoot, json_key: str, image_prefix: str, split: str = "all", holdout_fraction: float = 0.0):
        if split not in ("all", "train", "heldout"):
            raise ValueError(f"split must be 'all', 'train' or 'heldout', not {split!r}")
        self.storage, self.image_prefix = storage, image_prefix.rstrip("/")
        try:
            records = storage.read_json(json_key)
        except Exception as exc:  # noqa: BLE001
            raise DatasetError(f"cannot read the LLaVA JSON {storage.uri(json_key)}: {exc}") from exc
        if not isinstance(records, list):
            raise DatasetError(f"{storage.uri(json_key)}: expected a JSON list of LLaVA records, got {type(records).__name__}")
        for i, r in enumerate(records):
            if not (isinstance(r, dict) and "image" in r and len(r.get("conversations") or []) >= 2):
                raise DatasetError(f"{storage.uri(json_key)}: record {i} is not a LLaVA record with an image and two turns: {str(r)[:200]}")
        if split != "all":
            keep = split == "heldout"
            records = [r for r in records if is_held_out(str(r["id"]), holdout_fraction) == keep]
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, i: int) -> str:
        return self.records[i]["conversations"][1]["value"]

    def __getitem__(self, i: int):
        from PIL import Image

        r = self.records[i]
        key = f"{self.image_prefix}/{r['image']}" if self.image_prefix else r["image"]
        try:
            image = Image.open(io.BytesIO(self.storage.read_bytes(key))).convert("RGB")
        except Exception as exc:  # noqa: BLE001
            raise DatasetError(f"record {r['id']!r}: cannot read image {self.storage.uri(key)}: {exc}") from exc
        return image, self.caption(i), str(r["id"])


def synthvlm_dataset(storage: StorageRoot, split: str = "all", holdout_fraction: float = 0.0) -> tuple[LlavaJsonDataset, dict]:
    """The current version of `synthvlm_100k` (named by its `_manifest.json`) and that manifest."""
    manifest = storage.manifest(DATASET)
    if manifest is None:
        raise DatasetError(f"{storage.uri(DATASET)} is not materialized (no _manifest.json): materialize synthvlm_100k first")
    prefix = manifest["prefix"]
    return LlavaJsonDataset(storage, f"{prefix}/{DATASET}.json", prefix, split, holdout_fraction), manifest


def expand_to_square(image, fill: tuple[int, int, int]):
    """LLaVA-1.5's `image_aspect_ratio="pad"`: pad to a square with the processor's mean colour."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


@dataclass
class PlainCollator:
    """Stage 1's "plain" template: BOS, `<image>` expanded to the vision tokens, the caption, the
    separator. Labels are the caption tokens only (BOS, image tokens and padding are IGNORE_INDEX);
    padding on the right, cut at `max_length` (SPEC §6: 2048)."""

    processor: object
    n_image_tokens: int
    max_length: int = 2048

    def __post_init__(self) -> None:
        tok = self.processor.tokenizer
        self.image_token_id = tok.convert_tokens_to_ids(self.processor.image_token)
        if self.max_length <= self.n_image_tokens + 2:
            raise ValueError(f"max_length={self.max_length} leaves no room for a caption after {self.n_image_tokens} image tokens")
        ip = self.processor.image_processor
        self.fill = tuple(int(round(255 * m)) for m in ip.image_mean)

    def __call__(self, batch: list[tuple]) -> dict:
        import torch

        tok = self.processor.tokenizer
        images = [expand_to_square(img, self.fill) for img, _, _ in batch]
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        room = self.max_length - 1 - self.n_image_tokens
        rows, label_rows = [], []
        for _, caption, _ in batch:
            text_ids = tok(caption + PLAIN_SEPARATOR, add_special_tokens=False)["input_ids"][:room]
            prefix = [tok.bos_token_id] + [self.image_token_id] * self.n_image_tokens
            rows.append(prefix + text_ids)
            label_rows.append([IGNORE_INDEX] * len(prefix) + text_ids)
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, label_rows)):
            input_ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, "labels": labels}
