"""CLIPScore (Hessel et al.) as SPEC §3 fixes it: open_clip, images resized (bicubic) and centre
cropped to the tower's size with CLIP's mean/std, text "A photo depicts " + caption truncated to 77
tokens, both embeddings L2-normalised, clip_score = max(cos, 0) (Hessel's 2.5 * max(cos, 0) / 2.5)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from synthvlm_assets.models.sources import TINY, ModelWeightsError, load_error
from synthvlm_assets.storage import filesystem_for, split_protocol


@dataclass(frozen=True)
class ClipSettings:
    model: str = "ViT-B-32"  # open_clip name; "ViT-L-14-336" for the paper's VLM tower
    pretrained: str = "openai"  # open_clip tag, a local file, an s3:// file, "none" (random); ignored for "tiny"
    prefix: str = "A photo depicts "
    dtype: str = "fp16"  # on a GPU; the CPU computes in fp32
    batch_size: int = 256
    # Where JPEGs are decoded and resized for scoring (scoring/stage.py): "device" (batched nvjpeg decode,
    # then CLIP's and SSIM's resizes on the GPU, pixel-identical to PIL's; nvjpeg's decode is not bit-exact
    # with PIL's; JPEGs it does not decode, e.g. CMYK, go through PIL one by one), "device-resize" (PIL
    # decodes in CPU worker processes, the GPU resizes: the reference's pixels), "workers" (PIL decodes and
    # resizes in the worker processes), "auto" ("device" on a GPU, else "workers"). Not part of the output.
    decode: str = "auto"


class ClipScorer:
    def __init__(self, settings: ClipSettings, model, preprocess, tokenizer, device: str | None = None) -> None:
        import torch

        self.settings = settings
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = (
            {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[settings.dtype]
            if self.device == "cuda"
            else torch.float32
        )
        self.model = model.to(self.device, self.dtype).eval()
        self.preprocess, self.tokenizer = preprocess, tokenizer

    @classmethod
    def load(
        cls, settings: ClipSettings, cache_dir: str | None = None, s3_endpoint_url: str | None = None
    ) -> ClipScorer:
        import open_clip

        name, pretrained = settings.model, settings.pretrained
        if name == TINY:
            from synthvlm_assets.models.tiny import register_tiny_open_clip

            import torch

            torch.manual_seed(0)
            name, pretrained = register_tiny_open_clip(), None
        elif pretrained in ("", "none"):
            pretrained = None  # random weights of the real architecture (benchmarks)
        elif split_protocol(pretrained)[0] in ("s3", "s3a"):
            pretrained = _cached_file(pretrained, cache_dir, s3_endpoint_url)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        except (RuntimeError, OSError, ValueError) as exc:
            raise load_error("scoring.clip_pretrained", f"{settings.model}/{settings.pretrained}", exc) from exc
        return cls(settings, model, preprocess, open_clip.get_tokenizer(name))

    def image_features(self, pixels) -> "torch.Tensor":  # noqa: F821
        """L2-normalised embeddings of preprocessed images (N, 3, S, S)."""
        import torch

        with torch.inference_mode():
            f = self.model.encode_image(pixels.to(self.device, self.dtype)).float()
        return f / f.norm(dim=-1, keepdim=True)

    def text_features(self, captions: list[str]) -> "torch.Tensor":  # noqa: F821
        import torch

        tokens = self.tokenizer([self.settings.prefix + c for c in captions])  # truncates to 77, EOT kept
        with torch.inference_mode():
            f = self.model.encode_text(tokens.to(self.device)).float()
        return f / f.norm(dim=-1, keepdim=True)

    def clip_scores(self, pixels, captions: list[str]) -> np.ndarray:
        cos = (self.image_features(pixels) * self.text_features(captions)).sum(dim=-1)
        return cos.clamp(min=0).cpu().numpy().astype(np.float64)


def _cached_file(uri: str, cache_dir: str | None, s3_endpoint_url: str | None) -> str:
    import hashlib

    from synthvlm_assets.models.sources import default_cache_dir

    local = os.path.join(
        cache_dir or default_cache_dir(), hashlib.sha1(uri.encode()).hexdigest()[:16], os.path.basename(uri)
    )
    if not os.path.exists(local):
        fs = filesystem_for(uri, s3_endpoint_url)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        try:
            fs.get_file(split_protocol(uri)[1], local + ".part")
        except FileNotFoundError as exc:
            raise ModelWeightsError(f"scoring.clip_pretrained={uri!r}: no such object") from exc
        os.replace(local + ".part", local)
    return local
