"""Training samples: SynthVLM-100K (the LLaVA JSON and its images read through the storage root) with
the collator of stage 1's "plain" template, and a LLaVA-665K-format instruction JSON with stage 2's
"vicuna_v1" conversation collator."""

from __future__ import annotations

import hashlib
import io
import json
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

    def __init__(
        self, storage: StorageRoot, json_key: str, image_prefix: str, split: str = "all", holdout_fraction: float = 0.0
    ):
        if split not in ("all", "train", "heldout"):
            raise ValueError(f"split must be 'all', 'train' or 'heldout', not {split!r}")
        self.storage, self.image_prefix = storage, image_prefix.rstrip("/")
        try:
            records = storage.read_json(json_key)
        except Exception as exc:  # noqa: BLE001
            raise DatasetError(f"cannot read the LLaVA JSON {storage.uri(json_key)}: {exc}") from exc
        if not isinstance(records, list):
            raise DatasetError(
                f"{storage.uri(json_key)}: expected a JSON list of LLaVA records, got {type(records).__name__}"
            )
        for i, r in enumerate(records):
            if not (isinstance(r, dict) and "image" in r and len(r.get("conversations") or []) >= 2):
                raise DatasetError(
                    f"{storage.uri(json_key)}: record {i} is not a LLaVA record with an image and two turns: "
                    f"{str(r)[:200]}"
                )
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


def synthvlm_dataset(
    storage: StorageRoot, split: str = "all", holdout_fraction: float = 0.0
) -> tuple[LlavaJsonDataset, dict]:
    """The current version of `synthvlm_100k` (named by its `_manifest.json`) and that manifest."""
    manifest = storage.manifest(DATASET)
    if manifest is None:
        raise DatasetError(
            f"{storage.uri(DATASET)} is not materialized (no _manifest.json): materialize synthvlm_100k first"
        )
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
class _LlavaCollator:
    """What both templates' collators share: the processor, the vision-token count, the length limit,
    LLaVA-1.5's pad colour, and right padding (to the longest row, rounded up to `pad_to_multiple_of`:
    a compiled model then sees a few static lengths instead of one per batch)."""

    processor: object
    n_image_tokens: int
    max_length: int = 2048
    pad_to_multiple_of: int = 1

    def __post_init__(self) -> None:
        self.image_token_id = self.processor.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        self.fill = tuple(int(round(255 * m)) for m in self.processor.image_processor.image_mean)

    def pad(self, rows: list[list[int]], label_rows: list[list[int]]) -> dict:
        """input_ids, labels and attention_mask, padded on the right to the longest row (rounded up)."""
        import torch

        width = -(-max(len(r) for r in rows) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.processor.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, label_rows)):
            input_ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PlainCollator(_LlavaCollator):
    """Stage 1's "plain" template: BOS, `<image>` expanded to the vision tokens, the caption, the
    separator. Labels are the caption tokens only (BOS, image tokens and padding are IGNORE_INDEX);
    padding on the right, cut at `max_length` (SPEC §6: 2048)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length <= self.n_image_tokens + 2:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for a caption after {self.n_image_tokens} image tokens"
            )

    def __call__(self, batch: list[tuple]) -> dict:
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
        return {**self.pad(rows, label_rows), "pixel_values": pixel_values}


# Stage 2: LLaVA-1.5's instruction tuning (conversation template "vicuna_v1", as in LLaVA's conversation.py).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_ROLES = {"human": "USER", "gpt": "ASSISTANT"}


class InstructDataset:
    """A LLaVA-665K-format JSON (`{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}`)
    and its image folder, each read through its own storage root (a local folder or an s3:// prefix).
    Records without "image" are text-only conversations (LLaVA-665K has ~41K). Item i is
    (PIL image or None, conversations, id)."""

    def __init__(
        self, json_storage: StorageRoot, json_key: str, image_storage: StorageRoot | None, image_prefix: str = ""
    ):
        self.json_uri = json_storage.uri(json_key)
        try:
            raw = json_storage.read_bytes(json_key)
            records = json.loads(raw)
        except Exception as exc:  # noqa: BLE001
            raise DatasetError(f"cannot read the instruction JSON {self.json_uri}: {exc}") from exc
        self.version = hashlib.sha256(raw).hexdigest()[:12]  # the data's identity in the run's name
        if not isinstance(records, list):
            raise DatasetError(f"{self.json_uri}: expected a JSON list of LLaVA records, got {type(records).__name__}")
        for i, r in enumerate(records):
            problem = _conversation_problem(r)
            if problem:
                raise DatasetError(
                    f"{self.json_uri}: record {i} ({str(r.get('id')) if isinstance(r, dict) else '?'}): {problem}"
                )
            if "image" in r and image_storage is None:
                raise DatasetError(f"{self.json_uri}: record {i} has an image but no image folder is configured")
        self.records, self.image_storage, self.image_prefix = records, image_storage, image_prefix.rstrip("/")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        from PIL import Image

        r = self.records[i]
        image = None
        if "image" in r:
            key = f"{self.image_prefix}/{r['image']}" if self.image_prefix else r["image"]
            try:
                image = Image.open(io.BytesIO(self.image_storage.read_bytes(key))).convert("RGB")
            except Exception as exc:  # noqa: BLE001
                raise DatasetError(
                    f"record {r.get('id')!r}: cannot read image {self.image_storage.uri(key)}: {exc}"
                ) from exc
        return image, r["conversations"], str(r.get("id", i))


def _conversation_problem(r) -> str | None:
    if not isinstance(r, dict):
        return "not a JSON object"
    turns = r.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return "needs a 'conversations' list of at least two turns"
    for j, t in enumerate(turns):
        if not (isinstance(t, dict) and t.get("from") in VICUNA_ROLES and isinstance(t.get("value"), str)):
            return f"turn {j} is not {{'from': 'human'|'gpt', 'value': str}}: {str(t)[:120]}"
    if any(t["from"] != ("human", "gpt")[j % 2] for j, t in enumerate(_from_first_human(turns))):
        return "turns must alternate human, gpt"
    n_images = sum(t["value"].count("<image>") for t in turns)
    if "image" in r and n_images != 1:
        return f"has an image but {n_images} '<image>' placeholders (one expected)"
    if "image" not in r and n_images:
        return "has an '<image>' placeholder but no 'image'"
    return None


def _from_first_human(turns: list[dict]) -> list[dict]:
    """LLaVA skips a leading turn that is not the human's."""
    return turns[1:] if turns and turns[0]["from"] != "human" else turns


def vicuna_prompt(conversations: list[dict], image_token: str = "<image>") -> tuple[str, list[tuple[int, int]]]:
    """LLaVA's "vicuna_v1" text of a conversation and the character spans the loss trains on (each
    answer with its closing `</s>`). As LLaVA does, `<image>` is moved to the start of its turn."""
    text = VICUNA_SYSTEM + " "
    spans = []
    for t in _from_first_human(conversations):
        value = t["value"]
        if image_token in value:
            value = (image_token + "\n" + value.replace(image_token, "").strip()).strip()
        role = VICUNA_ROLES[t["from"]]
        text += role + ": "
        if t["from"] == "gpt":
            start = len(text)
            text += value + "</s>"
            spans.append((start, len(text)))
        else:
            text += value + " "
    return text, spans


@dataclass
class ConversationCollator(_LlavaCollator):
    """Stage 2's batches: the vicuna_v1 prompt tokenised whole (as LLaVA does), `<image>` expanded to the
    vision tokens, labels on the answer tokens only (a token is trained when it overlaps an answer's
    characters), right padding, cut at `max_length`. A micro-batch of text-only conversations gets one
    blank image flagged `dummy_image`, so every process runs the vision tower (FSDP's collectives
    must match across processes); its features enter the loss multiplied by zero."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not getattr(self.processor.tokenizer, "is_fast", False):
            raise ValueError("stage 2 needs a fast tokenizer (character offsets mark the answer tokens)")

    def encode(self, conversations: list[dict]) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one conversation, image tokens expanded, before truncation."""
        tok = self.processor.tokenizer
        text, spans = vicuna_prompt(conversations, self.processor.image_token)
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, labels = [], []
        for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if token == self.image_token_id:
                ids += [token] * self.n_image_tokens
                labels += [IGNORE_INDEX] * self.n_image_tokens
                continue
            trained = b > a and any(a < end and b > start for start, end in spans)
            ids.append(token)
            labels.append(token if trained else IGNORE_INDEX)
        return ids, labels

    def __call__(self, batch: list[tuple]) -> dict:
        import torch
        from PIL import Image

        rows, label_rows, images = [], [], []
        for image, conversations, _ in batch:
            ids, labels = self.encode(conversations)
            if len(ids) > self.max_length:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                kept = ids.count(self.image_token_id)
                if image is not None and kept != self.n_image_tokens:  # the cut dropped the image or went through it
                    if kept:
                        first = ids.index(self.image_token_id)
                        ids, labels = ids[:first], labels[:first]
                    image = None
            rows.append(ids)
            label_rows.append(labels)
            if image is not None:
                images.append(expand_to_square(image, self.fill))
        dummy = not images
        if dummy:
            size = self.processor.image_processor.crop_size["height"]
            images = [Image.new("RGB", (size, size), self.fill)]
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return {**self.pad(rows, label_rows), "pixel_values": pixel_values, "dummy_image": torch.tensor(dummy)}
