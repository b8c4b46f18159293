"""judged_captions for one shard: every curated caption gets a verdict, cached by (normalised caption,
model and revision, prompt version) so reruns and re-curated shards judge only what is new."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from synthvlm_assets.captions.judge.backends import (
    BackendStats,
    FirstToken,
    HTTPJudge,
    JudgeBackend,
    TransformersJudge,
    VLLMJudge,
)
from synthvlm_assets.captions.judge.prompt import (
    NO,
    PARSE_FAILURE,
    YES,
    JudgePrompt,
    Unjudgeable,
    p_yes,
    parse_verdict,
)
from synthvlm_assets.captions.normalize import dedup_key
from synthvlm_assets.captions.pair_filters import ASSET as PAIR_FILTERED
from synthvlm_assets.models.sources import TINY, load_error, resolve_model
from synthvlm_assets.progress import Progress, no_progress
from synthvlm_assets.storage import StorageRoot

ASSET = "judged_captions"
UNJUDGEABLE = "unjudgeable"  # not asked: too long or not valid text (raw_token says why)

VERDICT_FIELDS = [
    ("verdict", pa.string()),  # yes | no | parse_failure | unjudgeable
    ("p_yes", pa.float64()),  # P(Yes) / (P(Yes) + P(No)) of the first token; null when neither was returned
    ("raw_token", pa.string()),  # the first decoded token, verbatim
    ("yes_logprob", pa.float64()),
    ("no_logprob", pa.float64()),
]
CACHE_SCHEMA = pa.schema([("judge_key", pa.binary(16)), *VERDICT_FIELDS])
JUDGED_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("caption", pa.string()),
        *VERDICT_FIELDS,
        ("judge_model", pa.string()),
        ("judge_revision", pa.string()),
        ("prompt_version", pa.string()),
        ("reject_reason", pa.string()),  # null when kept: judge_no, judge_parse_failure, judge_unjudgeable
        ("shard", pa.string()),
    ]
)


@dataclass(frozen=True)
class JudgeSettings:
    model: str = "meta-llama/Meta-Llama-3-70B-Instruct"  # HF id, local folder, s3:// prefix, or "tiny"
    revision: str | None = None
    tokenizer: str | None = None  # default: the model's
    backend: str = "auto"  # auto (vllm on a GPU, else transformers) | vllm | transformers | http
    endpoint_url: str | None = None  # http: e.g. http://127.0.0.1:8000 (`vllm serve`)
    api_key_env: str = "SYNTHVLM_JUDGE_API_KEY"  # http: the variable holding the bearer token, if any
    # Prompts per backend call: vLLM schedules them itself; the transformers backend sorts them by length
    # into forward passes of at most batch_tokens (a bigger window, less padding and fuller passes).
    batch_size: int = 1024
    batch_tokens: int = 8192  # transformers: padded caption+template tokens per forward pass (prefix not counted)
    max_caption_tokens: int = 512
    forced_choice: bool = False  # restrict the first token to Yes/No (structured output): changes parse failures
    tensor_parallel_size: int = 1  # vllm
    quantization: str | None = None  # vllm: e.g. "fp8"
    max_model_len: int = 1024  # vllm
    concurrency: int = 8  # http
    timeout_s: float = 60.0  # http
    cache_every: int = 512  # verdicts are made durable every this many captions (resume granularity)

    @classmethod
    def tiny(cls, **overrides) -> JudgeSettings:
        # A random model rarely starts with Yes or No: forced choice keeps the demo flowing (its verdicts
        # are meaningless and labelled so); tests exercise the unforced path explicitly.
        return cls(**{"model": TINY, "backend": "transformers", "forced_choice": True, **overrides})

    @property
    def is_tiny(self) -> bool:
        return self.model == TINY

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        import torch

        return "vllm" if torch.cuda.is_available() and not self.is_tiny else "transformers"


@dataclass
class Judge:
    prompt: JudgePrompt
    backend: JudgeBackend
    model_id: str
    revision: str

    @property
    def cache_id(self) -> str:
        """Verdicts are valid for one model, revision and prompt version (forced choice changes them too)."""
        forced = getattr(self.backend, "forced_choice", False)
        doc = json.dumps([self.model_id, self.revision, self.prompt.version, forced])
        return hashlib.sha256(doc.encode()).hexdigest()[:16]


def load_judge(settings: JudgeSettings, cache_dir: str | None = None, s3_endpoint_url: str | None = None) -> Judge:
    """The judge's tokenizer, prompt and backend from the settings (the real loading path)."""
    if settings.is_tiny:
        from synthvlm_assets.models.tiny import tiny_llama, tiny_llama_tokenizer

        tokenizer = tiny_llama_tokenizer()
        backend = TransformersJudge(
            tiny_llama(tokenizer), tokenizer, settings.forced_choice, batch_tokens=settings.batch_tokens
        )
        return Judge(
            JudgePrompt.build(tokenizer, max_caption_tokens=settings.max_caption_tokens), backend, TINY, "tiny-random"
        )
    from transformers import AutoTokenizer

    kind = settings.resolved_backend()
    source = (
        resolve_model("judge.model", settings.model, cache_dir, s3_endpoint_url)
        if kind != "http" or settings.tokenizer is None
        else None
    )
    tokenizer_source = (
        resolve_model("judge.tokenizer", settings.tokenizer, cache_dir, s3_endpoint_url)
        if settings.tokenizer
        else source
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, revision=settings.revision)
    except (OSError, ValueError) as exc:
        raise load_error(
            "judge.tokenizer" if settings.tokenizer else "judge.model", settings.tokenizer or settings.model, exc
        ) from exc
    prompt = JudgePrompt.build(tokenizer, max_caption_tokens=settings.max_caption_tokens)
    if kind == "transformers":
        import torch
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        try:
            model = AutoModelForCausalLM.from_pretrained(source, revision=settings.revision, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise load_error("judge.model", settings.model, exc) from exc
        backend: JudgeBackend = TransformersJudge(
            model, tokenizer, settings.forced_choice, batch_tokens=settings.batch_tokens
        )
    elif kind == "vllm":
        backend = VLLMJudge(
            source,
            settings.revision,
            tokenizer,
            settings.tensor_parallel_size,
            settings.quantization,
            settings.forced_choice,
            max_model_len=settings.max_model_len,
        )
    elif kind == "http":
        if not settings.endpoint_url:
            raise ValueError("judge.backend='http' needs judge.endpoint_url (e.g. http://127.0.0.1:8000)")
        import os

        backend = HTTPJudge(
            settings.endpoint_url,
            settings.model,
            os.environ.get(settings.api_key_env),
            settings.concurrency,
            settings.timeout_s,
        )
    else:
        raise ValueError(f"judge.backend must be auto, vllm, transformers or http, got {settings.backend!r}")
    return Judge(prompt, backend, settings.model, settings.revision or _snapshot(tokenizer) or "unpinned")


def _snapshot(tokenizer) -> str | None:
    import re

    m = re.search(r"/snapshots/([0-9a-f]{40})(/|$)", str(getattr(tokenizer, "name_or_path", "")))
    return m.group(1) if m else None


def verdict_row(key: bytes, result: FirstToken) -> dict:
    return {
        "judge_key": key,
        "verdict": parse_verdict(result.token),
        "p_yes": p_yes(result.yes_logprob, result.no_logprob),
        "raw_token": result.token,
        "yes_logprob": None if result.yes_logprob == float("-inf") else result.yes_logprob,
        "no_logprob": None if result.no_logprob == float("-inf") else result.no_logprob,
    }


@dataclass
class JudgedShard:
    judged: pa.Table
    judged_now: int
    cache_hits: int
    prefix: str
    stats: BackendStats


class VerdictCache:
    """Per shard and judge: Parquet chunks under `judged_captions/_cache/<cache id>/<shard>/`, each
    written atomically as soon as its verdicts exist, so interrupted work resumes."""

    def __init__(self, storage: StorageRoot, judge: Judge, shard: str) -> None:
        self.storage, self.folder = storage, f"{ASSET}/_cache/{judge.cache_id}/{shard}"

    def load(self) -> dict[bytes, dict]:
        out = {}
        for key in self.storage.list(self.folder):
            if key.endswith(".parquet"):
                for row in self.storage.read_parquet(key).to_pylist():
                    out[row["judge_key"]] = row
        return out

    def add(self, rows: list[dict]) -> None:
        if rows:
            chunk = hashlib.sha256(b"".join(sorted(r["judge_key"] for r in rows))).hexdigest()[:16]
            self.storage.write_parquet(
                f"{self.folder}/chunk-{chunk}.parquet", pa.Table.from_pylist(rows, schema=CACHE_SCHEMA)
            )


def judge_shard(
    storage: StorageRoot,
    shard: str,
    judge: Judge,
    settings: JudgeSettings,
    run_id: str = "",
    captions_from: str = PAIR_FILTERED,
    progress: Progress = no_progress,
) -> JudgedShard:
    """Judge the shard's kept captions of `captions_from` (cached ones are not judged again) and publish
    `judged_captions/<shard>/{judged,kept}.parquet`. `progress(done, total)` counts distinct captions
    (cached ones are done from the start) and is called after each batch."""
    curated = storage.read_partition(f"{captions_from}/{shard}", "kept", columns=["caption_id", "caption"])
    captions = curated.column("caption").to_pylist()
    keys = [dedup_key(c) for c in captions]
    cache = VerdictCache(storage, judge, shard)
    known = cache.load()
    hits = sum(k in known for k in keys)
    todo: dict[bytes, str] = {}
    for key, caption in zip(keys, captions):
        if key not in known and key not in todo:
            todo[key] = caption
    pending: list[dict] = []
    items = list(todo.items())
    total = len(set(keys))
    done = total - len(items)
    progress(done, total)
    try:
        for start in range(0, len(items), settings.batch_size):
            batch, prompts = [], []
            for key, caption in items[start : start + settings.batch_size]:
                try:
                    prompts.append(judge.prompt.ids(caption))
                    batch.append(key)
                except Unjudgeable as exc:
                    pending.append(
                        {
                            "judge_key": key,
                            "verdict": UNJUDGEABLE,
                            "p_yes": None,
                            "raw_token": str(exc),
                            "yes_logprob": None,
                            "no_logprob": None,
                        }
                    )
            for key, result in zip(batch, judge.backend.score(prompts, shared_prefix=len(judge.prompt.prefix))):
                pending.append(verdict_row(key, result))
            if len(pending) >= settings.cache_every:
                cache.add(pending)
                known.update((r["judge_key"], r) for r in pending)
                pending.clear()
            done = min(start + settings.batch_size, len(items)) + total - len(items)
            progress(done, total)
    except BaseException:
        # Interrupted (a terminated run) or failed: the verdicts already computed stay valid, so they are
        # cached for the next run; the original error wins over a failure to save them.
        try:
            cache.add(pending)
        except Exception:  # noqa: BLE001
            pass
        raise
    cache.add(pending)
    known.update((r["judge_key"], r) for r in pending)

    rows = []
    for caption_id, caption, key in zip(curated.column("caption_id").to_pylist(), captions, keys):
        v = known[key]
        reason = None if v["verdict"] == YES else "judge_" + v["verdict"]
        rows.append({
            "caption_id": caption_id, "caption": caption, **{k: v[k] for k, _ in VERDICT_FIELDS},
            "judge_model": judge.model_id, "judge_revision": judge.revision, "prompt_version": judge.prompt.version,
            "reject_reason": reason, "shard": shard,
        })  # fmt: skip
    judged = pa.Table.from_pylist(rows, schema=JUDGED_SCHEMA)
    kept = judged.filter(pc.equal(judged.column("verdict"), YES))
    prefix = f"{ASSET}/{shard}"
    storage.publish_partition(
        prefix,
        {"judged": judged, "kept": kept},
        {"shard": shard, "run_id": run_id, "judge": {"model": judge.model_id, "revision": judge.revision,
         "prompt_version": judge.prompt.version, "cache_id": judge.cache_id, "settings": asdict(settings)}},
    )  # fmt: skip
    return JudgedShard(judged, len(todo), hits, prefix, judge.backend.stats)


def judge_checks(
    storage: StorageRoot, out: JudgedShard, captions_from: str = PAIR_FILTERED
) -> dict[str, tuple[bool, dict]]:
    """judged_captions' checks of one published shard, against what it read (`captions_from`, as judge_shard)
    and what it published: check name -> (passed, what it saw)."""
    shard = out.prefix.rsplit("/", 1)[-1]
    curated = storage.read_partition(f"{captions_from}/{shard}", "kept", columns=["caption_id"])
    curated_ids = curated.column("caption_id").to_pylist()
    judged = out.judged
    kept_ids = judged.filter(pc.equal(judged.column("verdict"), YES)).column("caption_id").to_pylist()
    published_kept = storage.read_partition(out.prefix, "kept", columns=["caption_id"]).column("caption_id")
    return {
        "every_caption_judged": (
            sorted(judged.column("caption_id").to_pylist()) == sorted(curated_ids)
            and judged.column("verdict").null_count == 0,
            {"curated": len(curated_ids), "judged": judged.num_rows},
        ),
        "only_yes_kept": (published_kept.to_pylist() == kept_ids, {"kept": len(kept_ids)}),
    }


def verdict_counts(judged: pa.Table) -> dict[str, int]:
    counts = dict.fromkeys([YES, NO, PARSE_FAILURE, UNJUDGEABLE], 0)
    for v in judged.column("verdict").to_pylist():
        counts[v] = counts.get(v, 0) + 1
    return counts


def timed_rate(stats: BackendStats) -> tuple[float, float]:
    """(prompts/s, prompt tokens/s) of what the backend judged."""
    return (stats.prompts / stats.seconds, stats.prompt_tokens / stats.seconds) if stats.seconds else (0.0, 0.0)
