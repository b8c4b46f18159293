"""SPEC §1's optional pair filters, when the caption pool knows each caption's original web image:
BLIP image-text matching probability (`Salesforce/blip-itm-base-coco`, softmax of the ITM head, index 1)
>= 0.8 and CLIP (`openai/clip-vit-base-patch32`) cosine similarity >= 0.28. Off by default; when off,
every curated caption passes through unscored. Unreadable images are rejected with the reason, and so are
references outside the image root and the storage root: a caption file must not make the pipeline open any
path or URL it names (local secrets, internal services)."""

from __future__ import annotations

import io
import os
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from synthvlm_assets.captions.stages import CURATED
from synthvlm_assets.models.sources import TINY, load_error, resolve_model
from synthvlm_assets.storage import StorageRoot, filesystem_for, split_protocol

ASSET = "pair_filtered_captions"
PAIR_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("caption", pa.string()),
        ("image_ref", pa.string()),
        ("itm_probability", pa.float64()),  # null when the filters are off or the image is unreadable
        ("clip_cosine", pa.float64()),
        # null when kept: itm_probability, clip_cosine, image_missing, image_unreadable, image_outside_roots
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
        ("shard", pa.string()),
    ]
)


@dataclass(frozen=True)
class PairFilterSettings:
    enabled: bool = False
    blip_model: str = "Salesforce/blip-itm-base-coco"  # HF id, local folder, s3:// prefix, or "tiny"
    clip_model: str = "openai/clip-vit-base-patch32"
    itm_probability_min: float = 0.8
    clip_cosine_min: float = 0.28
    image_root: str | None = None  # where relative image references live (local folder or s3:// prefix)
    batch_size: int = 32


class PairScorer:
    """BLIP ITM probability and CLIP cosine of (image, caption) pairs."""

    def __init__(self, blip, blip_processor, clip, clip_processor, device: str | None = None) -> None:
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.blip, self.blip_processor = blip.to(self.device).eval(), blip_processor
        self.clip, self.clip_processor = clip.to(self.device).eval(), clip_processor

    @classmethod
    def load(
        cls, settings: PairFilterSettings, cache_dir: str | None = None, s3_endpoint_url: str | None = None
    ) -> PairScorer:
        from transformers import BlipForImageTextRetrieval, BlipProcessor, CLIPModel, CLIPProcessor

        from synthvlm_assets.models.tiny import tiny_blip_itm, tiny_hf_clip

        def load(setting, value, model_cls, processor_cls, tiny):
            if value == TINY:
                return tiny()
            source = resolve_model(setting, value, cache_dir, s3_endpoint_url)
            try:
                return model_cls.from_pretrained(source), processor_cls.from_pretrained(source)
            except (OSError, ValueError) as exc:
                raise load_error(setting, value, exc) from exc

        blip = load(
            "pair_filters.blip_model", settings.blip_model, BlipForImageTextRetrieval, BlipProcessor, tiny_blip_itm
        )
        clip = load("pair_filters.clip_model", settings.clip_model, CLIPModel, CLIPProcessor, tiny_hf_clip)
        return cls(*blip, *clip)

    def score(self, images: list[Image.Image], captions: list[str]) -> tuple[list[float], list[float]]:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            b = self.blip_processor(
                images=images, text=captions, return_tensors="pt", padding=True, truncation=True
            ).to(self.device)
            itm = self.blip(**b, use_itm_head=True).itm_score.float().softmax(dim=1)[:, 1]
            c = self.clip_processor(
                images=images, text=captions, return_tensors="pt", padding=True, truncation=True
            ).to(self.device)
            img = F.normalize(
                self.clip.get_image_features(pixel_values=c["pixel_values"]).pooler_output.float(), dim=-1
            )
            txt = F.normalize(
                self.clip.get_text_features(
                    input_ids=c["input_ids"], attention_mask=c["attention_mask"]
                ).pooler_output.float(),
                dim=-1,
            )
        return itm.tolist(), (img * txt).sum(dim=-1).tolist()


def _normalized(uri: str) -> tuple[str, str]:
    """(scheme, path) with `.` and `..` resolved (and symbolic links, locally), for prefix checks."""
    protocol, path = split_protocol(uri)
    if protocol == "file":
        return "file", os.path.realpath(path)
    protocol = "s3" if protocol == "s3a" else protocol
    return protocol, posixpath.normpath("/" + path)


def image_uri(ref: str, image_root: str | None, allowed_roots: list[str]) -> tuple[str | None, str | None]:
    """(uri, None) for a reference under one of `allowed_roots`, else (None, why): relative references are
    under `image_root`; an absolute path or URL must already be under a root once `..` is resolved."""
    if "://" in ref or ref.startswith("/"):
        uri = ref
    elif image_root:
        uri = posixpath.join(image_root.rstrip("/"), ref)
    else:
        return None, f"{ref!r} is relative and pair_filters.image_root is not set"
    scheme, path = _normalized(uri)
    for root in allowed_roots:
        root_scheme, root_path = _normalized(root)
        if scheme == root_scheme and (path == root_path or path.startswith(root_path.rstrip("/") + "/")):
            return (path if scheme == "file" else f"{scheme}://{path.lstrip('/')}"), None
    return None, f"{ref!r} is not under the image root or the storage root ({', '.join(allowed_roots)})"


def open_image(
    ref: str | None,
    image_root: str | None,
    s3_endpoint_url: str | None = None,
    allowed_roots: list[str] | None = None,
) -> tuple[Image.Image | None, str | None, str | None]:
    """(image, None, None) or (None, reason, detail): image_missing (no reference or no such file),
    image_outside_roots (not under `allowed_roots`, by default the image root) or image_unreadable (not an
    image, truncated, unreachable)."""
    if not ref:
        return None, "image_missing", "the caption has no image reference"
    roots = [image_root] if allowed_roots is None and image_root else list(allowed_roots or [])
    uri, why = image_uri(ref, image_root, roots)
    if uri is None:
        return None, "image_outside_roots", why
    try:
        fs = filesystem_for(uri, s3_endpoint_url)
        data = fs.cat_file(split_protocol(uri)[1] if split_protocol(uri)[0] in ("s3", "s3a", "file") else uri)
    except FileNotFoundError:
        return None, "image_missing", f"no such image: {uri}"
    except Exception as exc:  # noqa: BLE001 - unreachable storage or URL: recorded per caption
        return None, "image_unreadable", f"{uri}: {type(exc).__name__}: {exc}"[:500]
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB"), None, None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return None, "image_unreadable", f"{uri}: {type(exc).__name__}: {exc}"[:500]


@dataclass
class PairFilteredShard:
    table: pa.Table
    kept: int
    prefix: str


def pair_filter_checks(storage: StorageRoot, out: PairFilteredShard) -> dict[str, tuple[bool, dict]]:
    """pair_filtered_captions' check of one published shard: every curated caption is in `pairs`, and
    curated = kept + rejected in what was published."""
    shard = out.prefix.rsplit("/", 1)[-1]
    n_curated = storage.read_partition(f"{CURATED}/{shard}", "kept", columns=["caption_id"]).num_rows
    files = storage.manifest(out.prefix)["files"]
    n_rejected = pc.sum(pc.is_valid(out.table.column("reject_reason"))).as_py() or 0
    return {
        "rows_accounted_for": (
            files["pairs"]["rows"] == n_curated == files["kept"]["rows"] + n_rejected,
            {"curated": n_curated, "kept": files["kept"]["rows"], "rejected": n_rejected},
        )
    }


def pair_filter_shard(
    storage: StorageRoot, shard: str, settings: PairFilterSettings, scorer: PairScorer | None, run_id: str = ""
) -> PairFilteredShard:
    curated = storage.read_partition(f"{CURATED}/{shard}", "kept", columns=["caption_id", "caption", "image_ref"])
    rows = [
        {
            **r,
            "itm_probability": None,
            "clip_cosine": None,
            "reject_reason": None,
            "reject_detail": None,
            "shard": shard,
        }
        for r in curated.to_pylist()
    ]
    if settings.enabled:
        if scorer is None:
            raise ValueError("pair filters are enabled but no scorer was given")
        allowed_roots = [r for r in (settings.image_root, storage.uri()) if r]
        for start in range(0, len(rows), settings.batch_size):
            batch = rows[start : start + settings.batch_size]
            readable = []
            for row in batch:
                image, reason, detail = open_image(
                    row["image_ref"], settings.image_root, storage.s3_endpoint_url, allowed_roots
                )
                if image is None:
                    row.update(reject_reason=reason, reject_detail=detail)
                else:
                    readable.append((row, image))
            if readable:
                itm, cos = scorer.score([im for _, im in readable], [r["caption"] for r, _ in readable])
                for (row, _), p, c in zip(readable, itm, cos):
                    row.update(itm_probability=p, clip_cosine=c)
                    if p < settings.itm_probability_min:
                        row.update(
                            reject_reason="itm_probability", reject_detail=f"{p:.4f} < {settings.itm_probability_min}"
                        )
                    elif c < settings.clip_cosine_min:
                        row.update(reject_reason="clip_cosine", reject_detail=f"{c:.4f} < {settings.clip_cosine_min}")
    table = pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)
    kept = table.filter(pc.is_null(table.column("reject_reason")))
    prefix = f"{ASSET}/{shard}"
    storage.publish_partition(
        prefix, {"pairs": table, "kept": kept}, {"shard": shard, "run_id": run_id, "enabled": settings.enabled,
                                                "settings": {k: v for k, v in settings.__dict__.items()}},
    )  # fmt: skip
    return PairFilteredShard(table, kept.num_rows, prefix)
