"""Judge backends behind one interface: `score(prompts as token ids) -> first-token results`.

- `VLLMJudge`: vLLM offline (`LLM.generate` on token-id prompts, max_tokens=1, temperature=0,
  prefix caching), the default on GPUs. vLLM has no CPU build: this path runs on GPU workers only.
- `HTTPJudge`: any OpenAI-compatible `/v1/completions` server with log-probs (`vllm serve`, ours).
- `TransformersJudge`: one forward pass, last-position logits, the shared prefix's KV cache computed
  once per batch; for CPUs and tests.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
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


class TransformersJudge:
    name = "transformers"

    def __init__(
        self, model, tokenizer, forced_choice: bool = False, prefix_cache: bool = True, device: str | None = None
    ) -> None:
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.answers = answer_token_ids(tokenizer)
        self.forced_choice, self.prefix_cache = forced_choice, prefix_cache
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stats = BackendStats()

    def score(self, prompts: list[list[int]], shared_prefix: int = 0) -> list[FirstToken]:
        return (
            _timed(self, prompts, lambda: self._score(prompts, shared_prefix if self.prefix_cache else 0))
            if prompts
            else []
        )

    def _score(self, prompts: list[list[int]], shared: int) -> list[FirstToken]:
        import torch

        logprobs = self.logprobs(prompts, shared)
        out = []
        yes, no = self.answers[YES], self.answers[NO]
        allowed = torch.tensor(yes + no, device=logprobs.device)
        for row in logprobs:
            # Greedy decoding; forced choice restricts the first token to the Yes/No spellings.
            first = int(allowed[row[allowed].argmax()]) if self.forced_choice else int(row.argmax())
            out.append(
                FirstToken(self.tokenizer.decode([first]), logsumexp(row[yes].tolist()), logsumexp(row[no].tolist()))
            )
        return out

    def logprobs(self, prompts: list[list[int]], shared: int = 0):
        """(B, vocab) float32 log-probabilities of the token after each prompt."""
        import torch

        if shared and any(p[:shared] != prompts[0][:shared] for p in prompts):
            raise ValueError("prompts do not share their first shared_prefix tokens")
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
