"""Judge backends behind one interface: `score(prompts as token ids) -> first-token results`.

- `VLLMJudge`: vLLM offline (`LLM.generate` on token-id prompts, max_tokens=1, temperature=0,
  prefix caching), the default on GPUs. vLLM has no CPU build: this path runs on GPU workers only.
- `HTTPJudge`: any OpenAI-compatible `/v1/completions` server with log-probs (`vllm serve`, ours).
- `TransformersJudge`: one forward pass, last-position logits; the shared prefix's KV computed once and
  read in place by every row, the tails sorted by length and packed; for CPUs, tests and GPUs without vLLM.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from synthvlm_assets.captions.judge.prompt import NO, YES, answer_token_ids, logsumexp, parse_verdict


@dataclass
class FirstToken:
    """What the judge's first (greedy) token says."""

    token: str  # decoded text of the first generated token
    yes_logprob: float  # log P(any single-token spelling of Yes); -inf when not among the returned log-probs
    no_logprob: float


@dataclass
class BackendStats:
    prompts: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class JudgeBackend(Protocol):
    name: str
    stats: BackendStats

    def score(self, prompts: list[list[int]], shared_prefix: int = 0) -> list[FirstToken]:
        """First-token results of token-id prompts whose first `shared_prefix` ids are identical."""


def _timed(backend, prompts: list[list[int]], fn):
    t = time.perf_counter()
    out = fn()
    backend.stats.prompts += len(prompts)
    backend.stats.prompt_tokens += sum(map(len, prompts))
    backend.stats.seconds += time.perf_counter() - t
    return out


def length_buckets(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices of `lengths` sorted by length and cut into batches whose padded size (rows x longest)
    stays within `batch_tokens` (a longer single row goes alone): sorting keeps the padding small."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Ascending order: the newest row is the longest, so it sets the batch's width.
        if batches and (len(batches[-1]) + 1) * lengths[i] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class SharedPrefixUnsupported(NotImplementedError):
    """The model's attention needs something `shared_prefix_attention` does not do (softcapping, sinks, a
    sliding window shorter than the prompt, a cache that keeps part of the prefix)."""


SHARED_PREFIX_ATTENTION = "synthvlm_shared_prefix"


@dataclass
class PackedTails:
    """Where B tails packed end to end (N tokens, no padding) sit in a right-padded (B, T) grid: the
    matmuls of a forward pass run on the N packed tokens, only the tails' attention on the grid."""

    grid: object  # (B, T) long: the packed index of each grid cell (pads repeat their row's last token)
    cells: object  # (N,) long: the grid cell (b * T + t) of each packed token
    last: object  # (B,) long: the packed index of each tail's last token (its logits are the answer)
    positions: object  # (1, N) long: each token's position in its prompt (after the shared prefix)

    @classmethod
    def of(cls, lengths: list[int], shared: int, device) -> PackedTails:
        import torch

        lens = torch.tensor(lengths, device=device)
        starts = torch.cumsum(lens, 0) - lens
        t = torch.arange(int(lens.max()), device=device)
        grid = starts[:, None] + torch.minimum(t[None, :], lens[:, None] - 1)
        cells = (torch.arange(len(lengths), device=device)[:, None] * len(t) + t[None, :])[t[None, :] < lens[:, None]]
        positions = shared + torch.arange(int(lens.sum()), device=device) - torch.repeat_interleave(starts, lens)
        return cls(grid, cells, starts + lens - 1, positions[None, :])


def shared_prefix_attention(
    module, query, key, value, attention_mask, scaling: float | None = None, dropout: float = 0.0,
    shared_prefix_kv: list | None = None, packed_tails: PackedTails | None = None, **kwargs,
) -> tuple:  # fmt: skip
    """A transformers attention function (registered as SHARED_PREFIX_ATTENTION) for tails packed in one
    row, (1, H, N, d): every tail token attends to the shared prefix's keys and values (one copy,
    (1, Hkv, P, d), from `shared_prefix_kv[layer]`) and causally to its own tail's tokens.

    The tails' part runs on the right-padded grid of `packed_tails` (under the causal mask a real token
    never sees the pads after it, so no padding mask); grouped by KV head, every row's queries meet the
    prefix in one matmul per head, so the prefix is never copied per row (what the KV-repeat path and SDPA
    over a concatenated cache both do). Scores in the model's dtype, softmax in float32, as transformers'
    eager attention. Returns (1, N, H, d)."""
    import torch

    if shared_prefix_kv is None or packed_tails is None:
        raise ValueError("shared_prefix_attention needs shared_prefix_kv and packed_tails")
    if module.training and dropout:
        raise SharedPrefixUnsupported("attention dropout (the judge runs in eval mode)")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise SharedPrefixUnsupported(f"attention with {name}")
    prefix_k, prefix_v = shared_prefix_kv[module.layer_idx]
    b, t = packed_tails.grid.shape
    h, d, hkv, p = query.shape[1], query.shape[-1], key.shape[1], prefix_k.shape[-2]
    window = kwargs.get("sliding_window")
    if window is not None and window < p + t:
        raise SharedPrefixUnsupported(f"a sliding window of {window} < {p + t} prompt tokens")
    g = h // hkv  # query heads per KV head: head i reads KV head i // g (transformers' repeat_kv)
    scaling = d**-0.5 if scaling is None else scaling
    # (1, heads, N, d) -> the grid, KV-head-major: (hkv, b, g*t, d) and (hkv, b, t, d).
    q = (query[0] * scaling)[:, packed_tails.grid].view(hkv, g, b, t, d).transpose(1, 2).reshape(hkv, b, g * t, d)
    k, v = key[0][:, packed_tails.grid], value[0][:, packed_tails.grid]
    scores = torch.cat(
        [
            torch.matmul(q.view(hkv, b * g * t, d), prefix_k[0].transpose(-1, -2)).view(hkv, b, g * t, p),
            torch.matmul(q, k.transpose(-1, -2)),
        ],
        dim=-1,
    )  # (hkv, b, g*t, p + t)
    causal = torch.ones(t, t, dtype=torch.bool, device=query.device).tril().repeat(g, 1)
    scores[..., p:].masked_fill_(~causal, float("-inf"))  # the diagonal stays: no row is all -inf
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs[..., :p].reshape(hkv, b * g * t, p), prefix_v[0]).view(hkv, b, g * t, d)
    out = out + torch.matmul(probs[..., p:], v)
    # Back to the packed tokens: (b, t, h, d) grid cells -> (1, N, h, d).
    return out.view(hkv, b, g, t, d).permute(1, 3, 0, 2, 4).reshape(b * t, h, d)[packed_tails.cells][None], None


class TransformersJudge:
    """The judge on a transformers causal LM, one forward pass per batch: the verdict is the argmax of the
    log-probs after the prompt, greedy decoding's first token (what `max_tokens=1` generates).

    `path`, for prompts whose first `shared_prefix` tokens are the same:
    - "shared-prefix" (default): the prefix's KV is computed once and kept for the backend's life (batch 1,
      ~16 MB at 8B; the model must not change under it); the tails (caption + closing template) are sorted
      by length, cut into forward passes of at most `batch_tokens` (rows x longest tail) and packed end to
      end, so the matmuls compute no pads; they attend to the one prefix copy (`shared_prefix_attention`).
      Results come back in the prompts' order. Without a shared prefix: whole prompts, right-padded in the
      same length buckets.
    - "repeat-prefix": the 2026-11 path, a benchmark baseline: the prefix's KV computed per call and
      repeated per row, one forward pass over the call's prompts in their order.
    - "plain": whole prompts, one forward pass per call.
    """

    name = "transformers"
    PATHS = ("shared-prefix", "repeat-prefix", "plain")

    def __init__(
        self, model, tokenizer, forced_choice: bool = False, path: str = "shared-prefix", device: str | None = None,
        batch_tokens: int = 8192,
    ) -> None:  # fmt: skip
        import torch

        if path not in self.PATHS:
            raise ValueError(f"path must be one of {', '.join(self.PATHS)}, got {path!r}")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.answers = answer_token_ids(tokenizer)
        self.forced_choice, self.path, self.batch_tokens = forced_choice, path, batch_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Tokens after the prefix: through the matmuls (pads included), in the padded grid, real ones.
        self.stats = BackendStats(
            extra=dict.fromkeys(["forward_passes", "forward_tokens", "grid_tokens", "tail_tokens"], 0)
        )
        self._allowed = torch.tensor(self.answers[YES] + self.answers[NO], device=self.device)
        self._prefix: tuple[tuple[int, ...], list] | None = None  # (ids, per layer (keys, values))
        self._decoded: dict[int, str] = {}
        # Forward passes switch the model's attention function: one at a time (reentrant: the fallback).
        self._lock = threading.RLock()

    def score(self, prompts: list[list[int]], shared_prefix: int = 0) -> list[FirstToken]:
        if not prompts:
            return []
        if self.path == "shared-prefix":
            return _timed(self, prompts, lambda: self._score_shared(prompts, shared_prefix))
        shared = shared_prefix if self.path == "repeat-prefix" else 0
        return _timed(self, prompts, lambda: self._first_tokens(self.logprobs(prompts, shared)))

    def _first_tokens(self, logprobs) -> list[FirstToken]:
        """FirstToken per row of (B, vocab) log-probs: the answers' columns and the greedy (or forced) token
        gathered on the device and copied once; Yes/No log-sums in float64 as before."""
        cols = logprobs[:, self._allowed]
        first = self._allowed[cols.argmax(-1)] if self.forced_choice else logprobs.argmax(-1)
        n_yes = len(self.answers[YES])
        out = []
        for token, row in zip(first.tolist(), cols.double().cpu().tolist()):
            if token not in self._decoded:
                self._decoded[token] = self.tokenizer.decode([token])
            out.append(FirstToken(self._decoded[token], logsumexp(row[:n_yes]), logsumexp(row[n_yes:])))
        return out

    def _score_shared(self, prompts: list[list[int]], shared: int) -> list[FirstToken]:
        if not all(prompts):
            raise ValueError("an empty prompt has no next token to judge")
        # The last prompt token must be computed in the forward pass (its logits are the answer).
        shared = max(0, min(shared, min(map(len, prompts)) - 1))
        prefix = prompts[0][:shared]
        if any(p[:shared] != prefix for p in prompts):
            raise ValueError("prompts do not share their first shared_prefix tokens")
        tails = [p[shared:] for p in prompts]
        with self._lock:
            try:
                prefix_kv = self._prefix_kv(prefix) if shared else None
                return self._in_buckets(tails, lambda batch: self._forward(batch, shared, prefix_kv))
            except SharedPrefixUnsupported as exc:
                # A model this attention cannot serve (found on its first batch): the KV-repeat path for good,
                # in length buckets of the same token budget.
                self.path, self.stats.extra["shared_prefix_unsupported"] = "repeat-prefix", str(exc)
                return self._in_buckets(prompts, lambda batch: self._logprobs(batch, shared))

    def _in_buckets(self, rows: list[list[int]], logprobs_of) -> list[FirstToken]:
        """First tokens of `rows` computed in length buckets, returned in the rows' order."""
        results: list[FirstToken | None] = [None] * len(rows)
        for batch in length_buckets([len(r) for r in rows], self.batch_tokens):
            for i, result in zip(batch, self._first_tokens(logprobs_of([rows[i] for i in batch]))):
                results[i] = result
        return results

    def _prefix_kv(self, prefix: list[int]) -> list:
        """The prefix's keys and values per layer, (1, Hkv, P, d) each, computed on first use and kept."""
        import torch

        if self._prefix is None or self._prefix[0] != tuple(prefix):
            with torch.inference_mode():
                cache = self.model.get_decoder()(
                    torch.tensor([prefix], device=self.device), use_cache=True
                ).past_key_values
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            if any(k.shape[-2] != len(prefix) for k, _ in layers):
                raise SharedPrefixUnsupported("a KV cache that keeps only part of the prefix (sliding layers)")
            self._prefix = (tuple(prefix), layers)
        return self._prefix[1]

    def _forward(self, tails: list[list[int]], shared: int, prefix_kv: list | None):
        """(B, vocab) float32 log-probs after each tail, one forward pass. After a shared prefix the tails are
        packed end to end (the matmuls compute no pads; only their attention is padded, see PackedTails);
        without one, whole prompts right-padded (the model's own attention, causal)."""
        import torch

        lengths = [len(t) for t in tails]
        width = max(lengths)
        extra = self.stats.extra
        extra["forward_passes"] += 1
        extra["forward_tokens"] += sum(lengths) if prefix_kv is not None else len(tails) * width
        extra["grid_tokens"] += len(tails) * width
        extra["tail_tokens"] += sum(lengths)
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        with torch.inference_mode():
            if prefix_kv is None:
                ids = torch.tensor([t + [self.pad_id] * (width - len(t)) for t in tails], device=self.device)
                hidden = decoder(ids, use_cache=False).last_hidden_state  # pads sit after real tokens
                last = hidden[
                    torch.arange(len(tails), device=self.device), torch.tensor(lengths, device=self.device) - 1
                ]
            else:
                packed = PackedTails.of(lengths, shared, self.device)
                ids = torch.tensor([[i for t in tails for i in t]], device=self.device)
                with _attention_implementation(self.model.config, SHARED_PREFIX_ATTENTION):
                    hidden = decoder(
                        ids, position_ids=packed.positions, use_cache=False, shared_prefix_kv=prefix_kv,
                        packed_tails=packed,
                    ).last_hidden_state  # fmt: skip
                last = hidden[0, packed.last]
            return torch.log_softmax(head(last).float(), dim=-1)

    def logprobs(self, prompts: list[list[int]], shared: int = 0):
        """(B, vocab) float32 log-probabilities of the token after each prompt, one forward pass in the
        given order (the "repeat-prefix" and "plain" paths, and the HTTP server's)."""
        if shared and any(p[:shared] != prompts[0][:shared] for p in prompts):
            raise ValueError("prompts do not share their first shared_prefix tokens")
        with self._lock:
            return self._logprobs(prompts, shared)

    def _logprobs(self, prompts: list[list[int]], shared: int):
        import torch

        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        tails = [p[shared:] for p in prompts]
        lengths = torch.tensor([len(t) for t in tails], device=self.device)
        width = int(lengths.max())
        # Right padding: under the causal mask real tokens never see the pads after them.
        ids = torch.tensor([t + [self.pad_id] * (width - len(t)) for t in tails], device=self.device)
        with torch.inference_mode():
            kwargs = {}
            if shared:
                cache = decoder(
                    torch.tensor([prompts[0][:shared]], device=self.device), use_cache=True
                ).past_key_values
                cache.batch_repeat_interleave(len(prompts))
                kwargs = {
                    "past_key_values": cache,
                    "position_ids": (shared + torch.arange(width, device=self.device)).expand(len(prompts), -1),
                }
            hidden = decoder(ids, use_cache=bool(shared), **kwargs).last_hidden_state
            last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]
            return torch.log_softmax(head(last).float(), dim=-1)  # the last positions only: no (B, T, vocab) logits


@contextmanager
def _attention_implementation(config, name: str) -> Iterator[None]:
    """The model's attention function switched to `name` for one forward pass, then restored. A name
    transformers has no mask function for gets no mask built (the function masks by itself)."""
    from transformers import AttentionInterface

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, shared_prefix_attention)
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


class VLLMJudge:
    name = "vllm"

    def __init__(
        self,
        model: str,
        revision: str | None,
        tokenizer,
        tensor_parallel_size: int = 1,
        quantization: str | None = None,
        forced_choice: bool = False,
        top_logprobs: int = 20,
        max_model_len: int = 1024,
        gpu_memory_utilization: float = 0.9,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(
                "judge.backend='vllm' needs the vllm package on a GPU worker (pip install 'synthvlm-assets[vllm]'); "
                "use judge.backend='transformers' on a CPU or 'http' for a running server"
            ) from exc
        self.llm = LLM(
            model=model, revision=revision, tensor_parallel_size=tensor_parallel_size, quantization=quantization,
            enable_prefix_caching=True, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
            dtype="bfloat16",
        )  # fmt: skip
        self.tokenizer, self.answers = tokenizer, answer_token_ids(tokenizer)
        self.forced_choice, self.top_logprobs = forced_choice, top_logprobs
        self.stats = BackendStats()

    def score(self, prompts: list[list[int]], shared_prefix: int = 0) -> list[FirstToken]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        allowed = self.answers[YES] + self.answers[NO]
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=self.top_logprobs,
            allowed_token_ids=allowed if self.forced_choice else None,
        )
        # Prefix caching reuses the shared prefix's KV blocks across prompts by itself.
        outs = _timed(
            self,
            prompts,
            lambda: self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False),
        )
        results = []
        for o in outs:
            c = o.outputs[0]
            top = c.logprobs[0]  # {token id: Logprob}, the top `top_logprobs` and the sampled one
            lp = lambda ids: logsumexp([top[i].logprob for i in ids if i in top])  # noqa: E731
            results.append(
                FirstToken(self.tokenizer.decode([c.token_ids[0]]), lp(self.answers[YES]), lp(self.answers[NO]))
            )
        return results


class HTTPJudge:
    """An OpenAI-compatible completions endpoint; prompts are sent as token ids."""

    name = "http"

    def __init__(
        self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8, timeout_s: float = 60.0,
        retries: int = 4, top_logprobs: int = 20,
    ) -> None:  # fmt: skip
        self.url = base_url.rstrip("/") + "/v1/completions"
        self.model, self.api_key = model, api_key
        self.concurrency, self.timeout_s, self.retries, self.top_logprobs = (
            concurrency,
            timeout_s,
            retries,
            top_logprobs,
        )
        self.stats = BackendStats(extra={"retries": 0})

    def score(self, prompts: list[list[int]], shared_prefix: int = 0) -> list[FirstToken]:
        with ThreadPoolExecutor(self.concurrency) as pool:  # bounded concurrency
            return _timed(self, prompts, lambda: list(pool.map(self._one, prompts)))

    def _one(self, prompt: list[int]) -> FirstToken:
        body = json.dumps(
            {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": self.top_logprobs}
        ).encode()
        headers = {
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
        }
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    choice = json.load(response)["choices"][0]
                break
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500 or attempt == self.retries:
                    raise RuntimeError(f"judge endpoint {self.url}: HTTP {exc.code}: {exc.read()[:300]!r}") from exc
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt == self.retries:
                    raise RuntimeError(
                        f"judge endpoint {self.url} unreachable after {self.retries + 1} attempts: {exc}"
                    ) from exc
            self.stats.extra["retries"] += 1
            time.sleep(min(0.5 * 2**attempt, 8.0))
        top = (choice.get("logprobs") or {}).get("top_logprobs") or [{}]
        top = top[0] or {}
        # Completions log-probs are keyed by token text: group the spellings of Yes and No.
        yes = [v for k, v in top.items() if parse_verdict(k) == YES]
        no = [v for k, v in top.items() if parse_verdict(k) == NO]
        return FirstToken(choice.get("text", ""), logsumexp(yes), logsumexp(no))
