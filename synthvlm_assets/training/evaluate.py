"""Sanity evaluation of a stage-1 model on held-out SynthVLM records: the caption loss, and
image->caption retrieval from the model's own likelihoods, each beside the untrained model (the same
assembly with the fresh projector). Not a benchmark: it says whether the projector learned anything."""

from __future__ import annotations

from dataclasses import dataclass

from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.training.data import IGNORE_INDEX, PlainCollator, synthvlm_dataset
from synthvlm_assets.training.model import ModelSettings, load_model, tiny_cpu_threads, vision_token_count


@dataclass(frozen=True)
class EvalSettings:
    holdout_fraction: float = 0.01  # must match the training run's
    max_records: int = 256  # held-out records for the caption loss
    retrieval_size: int = 16  # n images x n captions scored
    batch_size: int = 16
    max_length: int = 2048


def caption_nll(
    model, collator: PlainCollator, pairs: list[tuple], batch_size: int, device, dtype
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, caption tokens) of each (image, caption, id) pair."""
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            b = {k: v.to(device) for k, v in collator(pairs[i : i + batch_size]).items()}
            b["pixel_values"] = b["pixel_values"].to(dtype)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(
                    input_ids=b["input_ids"],
                    attention_mask=b["attention_mask"],
                    pixel_values=b["pixel_values"],
                    use_cache=False,
                ).logits
            labels = b["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels.clamp(min=0), reduction="none"
            ) * (labels != IGNORE_INDEX)
            out += [(float(s), int(c)) for s, c in zip(nll.sum(1).tolist(), (labels != IGNORE_INDEX).sum(1).tolist())]
    return out


def retrieval_accuracy(
    model, collator: PlainCollator, items: list[tuple], batch_size: int, device, dtype
) -> tuple[float, float]:
    """Image->caption retrieval over n held-out items: each image picks the caption with the highest
    log-likelihood given it, minus that caption's mean over all images (so short, likely captions do
    not win everywhere). Returns (accuracy, chance); identical captions count as correct."""
    n = len(items)
    pairs = [(items[i][0], items[j][1], "") for i in range(n) for j in range(n)]
    nll = caption_nll(model, collator, pairs, batch_size, device, dtype)
    logp = [[-nll[i * n + j][0] for j in range(n)] for i in range(n)]
    col_mean = [sum(logp[i][j] for i in range(n)) / n for j in range(n)]
    correct, chance = 0, 0.0
    for i in range(n):
        best = max(range(n), key=lambda j: logp[i][j] - col_mean[j])
        correct += items[best][1] == items[i][1]
        chance += sum(items[j][1] == items[i][1] for j in range(n)) / n
    return correct / n, chance / n


def evaluate(model, processor, storage: StorageRoot, settings: EvalSettings, device=None, dtype=None) -> dict:
    """Held-out caption loss (mean per token) and retrieval accuracy of one model."""
    import torch

    device = device or next(model.parameters()).device
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    dataset, manifest = synthvlm_dataset(storage, "heldout", settings.holdout_fraction)
    if len(dataset) < 2:
        raise RuntimeError(
            f"only {len(dataset)} held-out records in {storage.uri(manifest['prefix'])} at "
            f"holdout_fraction={settings.holdout_fraction}: "
            "raise it (the training run must use the same value)"
        )
    items = [dataset[i] for i in range(min(len(dataset), settings.max_records))]
    collator = PlainCollator(processor, vision_token_count(model), settings.max_length)
    nll = caption_nll(model, collator, items, settings.batch_size, device, dtype)
    loss = sum(s for s, _ in nll) / max(1, sum(c for _, c in nll))
    acc, chance = retrieval_accuracy(
        model, collator, items[: settings.retrieval_size], settings.batch_size, device, dtype
    )
    return {"heldout_records": len(items), "heldout_loss": loss, "retrieval_accuracy": acc, "retrieval_chance": chance,
            "retrieval_size": min(len(items), settings.retrieval_size)}  # fmt: skip


def sanity_evaluation(
    storage: StorageRoot, model_settings: ModelSettings, projector: dict, settings: EvalSettings,
    cache_dir: str | None = None,
) -> dict:  # fmt: skip
    """The trained model (the given projector) and the untrained one (the fresh projector of the same
    seed), evaluated on the same held-out records."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tiny_cpu_threads(model_settings):
        model, processor = load_model(
            model_settings, dtype=dtype, cache_dir=cache_dir, s3_endpoint_url=storage.s3_endpoint_url
        )
        model.to(device)
        untrained = evaluate(model, processor, storage, settings, device, dtype)
        model.model.multi_modal_projector.load_state_dict(projector)
        trained = evaluate(model, processor, storage, settings, device, dtype)
    return {"trained": trained, "untrained": untrained}
