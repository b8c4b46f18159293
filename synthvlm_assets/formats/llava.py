"""SynthVLM-100K in three formats: LLaVA pretraining JSON with loose images (folders of at most
10,000), WebDataset tar shards (jpg + txt + json), and Parquet that Hugging Face `datasets` loads as
an image dataset; plus a dataset card."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from synthvlm_assets import tars

# LLaVA's eleven brief-caption instructions (SPEC §5).
BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
IMAGES_PER_FOLDER = 10_000


def instruction_for(caption_id: str, seed: int = 0) -> str:
    """The instruction of a record: drawn from the eleven, seeded by the caption id."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}\x00{caption_id}".encode(), digest_size=8).digest(), "big")
    return BRIEF_INSTRUCTIONS[h % len(BRIEF_INSTRUCTIONS)]


def sample_name(caption_id: str) -> str:
    """A file/sample name for a caption id (WebDataset keys may not contain dots)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in caption_id)
    return f"{safe}_{hashlib.sha1(caption_id.encode()).hexdigest()[:8]}"


def image_path(rank: int, caption_id: str) -> str:
    return f"images/{(rank - 1) // IMAGES_PER_FOLDER:05d}/{sample_name(caption_id)}.jpg"


def llava_record(caption_id: str, caption: str, rank: int) -> dict:
    return {
        "id": caption_id,
        "image": image_path(rank, caption_id),
        "conversations": [
            {"from": "human", "value": "<image>\n" + instruction_for(caption_id)},
            {"from": "gpt", "value": caption},
        ],
    }


def webdataset_shard(samples: Iterable[tuple[dict, bytes]]) -> bytes:
    """A WebDataset shard of selected rows: `<name>.jpg`, `.txt` (the caption) and `.json` (the row)."""

    def members(row: dict, jpeg: bytes) -> dict[str, bytes]:
        row_json = json.dumps(row, sort_keys=True, default=str).encode()
        return {"jpg": jpeg, "txt": row["caption"].encode("utf-8"), "json": row_json}

    buf = io.BytesIO()
    tars.write_samples(buf, ((sample_name(row["caption_id"]), members(row, jpeg)) for row, jpeg in samples))
    return buf.getvalue()


HF_FEATURES = {
    "image": {"_type": "Image"},
    "text": {"dtype": "string", "_type": "Value"},
    "caption_id": {"dtype": "string", "_type": "Value"},
    "clip_score": {"dtype": "float64", "_type": "Value"},
    "ssim": {"dtype": "float64", "_type": "Value"},
    "score": {"dtype": "float64", "_type": "Value"},
}


def hf_parquet(samples: Iterable[tuple[dict, bytes]]) -> bytes:
    """Parquet with the `huggingface` schema metadata, so `datasets` decodes `image` as an Image."""
    rows = [
        {
            "image": {"bytes": jpeg, "path": sample_name(r["caption_id"]) + ".jpg"},
            "text": r["caption"],
            "caption_id": r["caption_id"],
            "clip_score": r["clip_score"],
            "ssim": r["ssim"],
            "score": r["score"],
        }
        for r, jpeg in samples
    ]
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("text", pa.string()),
            ("caption_id", pa.string()),
            ("clip_score", pa.float64()),
            ("ssim", pa.float64()),
            ("score", pa.float64()),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})},
    )
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, compression="zstd")
    return buf.getvalue()
