"""A small OpenAI-compatible completions server over the transformers judge backend: the HTTP
backend's counterpart on a CPU (tests, laptops). `vllm serve` is the production server; this one
answers only what the judge asks (max_tokens=1 with log-probs).

    synthvlm judge-serve --model tiny --port 8000
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from synthvlm_assets.captions.judge.backends import TransformersJudge


def make_server(
    backend: TransformersJudge, model_name: str, host: str = "127.0.0.1", port: int = 8000
) -> ThreadingHTTPServer:
    lock = threading.Lock()  # one forward pass at a time on the shared model

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: the client logs what matters
            pass

        def _send(self, code: int, doc: dict) -> None:
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompt = req["prompt"]
                if isinstance(prompt, str):
                    prompt = backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                if not (isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt)):
                    raise ValueError("prompt must be a string or a non-empty list of token ids")
                if req.get("max_tokens", 16) != 1:
                    raise ValueError("this server generates exactly one token (max_tokens=1)")
                if float(req.get("temperature", 1.0)) != 0.0:
                    raise ValueError("this server decodes greedily only (temperature=0)")
                k = int(req.get("logprobs") or 0)
            except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
                return self._send(400, {"error": {"message": str(exc), "type": "invalid_request_error"}})
            try:
                with lock:
                    row = backend.logprobs([prompt])[0]
            except Exception as exc:  # noqa: BLE001 - the client gets a 500 naming it (and may retry)
                return self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}})
            k = min(k, row.numel())
            first = int(row.argmax())
            text = backend.tokenizer.decode([first])
            logprobs = {
                "tokens": [text],
                "token_logprobs": [float(row[first])],
                "top_logprobs": [first_token_text_logprobs(row, backend.tokenizer, k)] if k else None,
            }
            self._send(200, {
                "id": "cmpl-synthvlm", "object": "text_completion", "model": model_name,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1, "total_tokens": len(prompt) + 1},
            })  # fmt: skip

    return ThreadingHTTPServer((host, port), Handler)


def first_token_text_logprobs(logprobs_row, tokenizer, k: int) -> dict[str, float]:
    """The top-k of a log-prob vector keyed by decoded token text (the completions API's format)."""
    import torch

    values, ids = torch.topk(logprobs_row, k)
    out: dict[str, float] = {}
    for v, i in zip(values.tolist(), ids.tolist()):
        text = tokenizer.decode([i])
        out[text] = max(out.get(text, -math.inf), v)
    return out
