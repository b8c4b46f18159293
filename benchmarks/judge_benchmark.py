"""LLM judge throughput of the transformers backend's three paths side by side in one process, on COCO
captions, with the agreement of their answers:

- plain: whole prompts, batches of --batch in file order (no prefix reuse);
- repeat-prefix: the 2026-11 path: the shared prefix's KV computed per batch and repeated per row;
- shared-prefix: the current default: the prefix's KV computed once (in the warm-up call) and read by every
  row in place; the tails sorted by length into forward passes of at most --batch-tokens (rows x longest
  tail), packed end to end so the matmuls compute no pads, over calls of --window prompts (the stage's
  batch_size).

    .venv/bin/python benchmarks/judge_benchmark.py               # GPU: Llama-3-8B's architecture, random weights, bf16
    .venv/bin/python benchmarks/judge_benchmark.py --preset tiny # CPU: the tiny Llama
    .venv/bin/python benchmarks/judge_benchmark.py --preset llama3-8b --layers 1 --captions 48  # CPU smoke test

vLLM itself (the default backend on GPUs) has no CPU build and is not installed on the lent test GPU;
the settings a user should start from are in the README (Caption judge).
Random weights: speed does not depend on them; the verdicts are meaningless (mostly parse failures), so
agreement is also given on the first token and on P(Yes) > P(No). The tokenizer is built in
code (byte-level BPE trained on the captions) since Llama 3's own is a download: token counts per
prompt are printed so the figures can be scaled to the real tokenizer's (~130 tokens per prompt).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from synthvlm_assets.captions.judge.backends import TransformersJudge
from synthvlm_assets.captions.judge.prompt import INSTRUCTION, JudgePrompt, p_yes, parse_verdict
from synthvlm_assets.captions.judge.stage import JudgeSettings
from synthvlm_assets.models.tiny import tiny_llama, tiny_llama_tokenizer, trained_llama_tokenizer

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_captions_val2017.json"
# Meta-Llama-3-8B-Instruct's architecture (config.json), vocabulary size included.
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def padded(lengths: list[int], batch: int) -> int:
    """Tokens a forward pass computes for batches of `batch` rows in order, each padded to its longest."""
    return sum(len(c) * max(c) for c in (lengths[i : i + batch] for i in range(0, len(lengths), batch)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--preset", choices=["llama3-8b", "tiny"], default="llama3-8b" if gpu else "tiny")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a CPU smoke test of 8B's width)")
    p.add_argument("--captions", type=int, default=2048 if gpu else 256)
    p.add_argument("--batch", type=int, default=128 if gpu else 32, help="rows per pass of plain and repeat-prefix")
    p.add_argument("--window", type=int, default=JudgeSettings().batch_size, help="prompts per shared-prefix call")
    p.add_argument(
        "--batch-tokens", type=int, nargs="+", default=[8192, 16384] if gpu else [JudgeSettings().batch_tokens]
    )
    p.add_argument("--repeats", type=int, default=3, help="timed passes of each shared-prefix setting (median)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--coco", type=Path, default=COCO, help="COCO captions JSON (default: ../shared/data's copy)")
    args = p.parse_args()
    device = "cuda" if gpu else "cpu"
    if args.preset == "llama3-8b" and not gpu and not args.layers:
        raise SystemExit("the Llama-3-8B benchmark needs a GPU: use --preset tiny (or --layers 1) on a CPU")
    started = time.perf_counter()
    captions = [a["caption"] for a in json.loads(args.coco.read_text())["annotations"][: args.captions]]
    if args.preset == "tiny":
        tokenizer = tiny_llama_tokenizer()
        model = tiny_llama(tokenizer)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = trained_llama_tokenizer(captions + [INSTRUCTION] * 50 + ["Yes No yes no YES NO"] * 50, 32000)
        config = {**LLAMA3_8B, "num_hidden_layers": args.layers or LLAMA3_8B["num_hidden_layers"]}
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa")).to(torch.bfloat16)
    prompt = JudgePrompt.build(tokenizer)
    prompts = [prompt.ids(c) for c in captions]
    shared = len(prompt.prefix)
    tails = [len(q) - shared for q in prompts]
    tokens = sum(map(len, prompts))
    name = (
        torch.cuda.get_device_name()
        if gpu
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    layers = model.config.num_hidden_layers
    # FLOPs per real tail token: 2 x the decoder's weights (embeddings are lookups; the LM head runs once per row).
    embeddings = model.get_input_embeddings().weight.numel()
    decoder_params = sum(q.numel() for q in model.get_decoder().parameters()) - embeddings
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; device: {name}; "
        f"torch {torch.__version__}; "
        f"transformers {transformers.__version__}; preset {args.preset} ({layers} layers, {str(model.dtype)[6:]}); "
        f"{len(prompts)} COCO captions; prompt tokens: prefix {shared}, mean {tokens / len(prompts):.1f}, "
        f"tail mean {statistics.mean(tails):.1f} (min {min(tails)}, max {max(tails)})"
    )

    def timed(fn) -> float:
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def run(judge: TransformersJudge, step: int) -> list:
        out = []
        for i in range(0, len(prompts), step):
            out += judge.score(prompts[i : i + step], shared_prefix=shared)
        return out

    rows, answers = {}, {}
    configs = [("plain", "plain", args.batch, None), ("repeat-prefix", "repeat-prefix", args.batch, None)]
    configs += [(f"shared-prefix, {b} tokens", "shared-prefix", args.window, b) for b in args.batch_tokens]
    for label, path, step, budget in configs:
        judge = TransformersJudge(model, tokenizer, path=path, device=device, batch_tokens=budget or 8192)
        judge.score(prompts[:step], shared_prefix=shared)  # warm-up (shared-prefix: computes the prefix KV once)
        judge.stats.extra.update(forward_passes=0, forward_tokens=0, grid_tokens=0, tail_tokens=0)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats if budget else 1):
            times.append(timed(lambda: answers.__setitem__(label, run(judge, step))))
        s = statistics.median(times)
        grid = None  # the shared-prefix path pads only the tails' attention (a grid of rows x longest tail)
        if path == "plain":
            computed, real = padded([len(q) for q in prompts], step), tokens
        elif path == "repeat-prefix":
            computed, real = padded(tails, step), sum(tails)  # and a prefix pass per batch
        else:
            computed, real = judge.stats.extra["forward_tokens"] / len(times), sum(tails)
            grid = judge.stats.extra["grid_tokens"] / len(times) / real - 1
        rows[label] = {
            "prompts_per_s": len(prompts) / s,
            "prompt_tokens_per_s": tokens / s,
            "seconds": times,
            "padding": computed / real - 1,
            "attention_grid_padding": grid,
            "tflops": len(prompts) / s * statistics.mean(tails) * 2 * decoder_params / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        }

    reference = answers["plain"]
    for label, r in rows.items():
        mine = answers[label]
        r["same_first_token"] = sum(a.token == b.token for a, b in zip(mine, reference)) / len(prompts)
        same = lambda x, y: sum(parse_verdict(a.token) == parse_verdict(b.token) for a, b in zip(x, y))  # noqa: E731
        r["same_verdict"] = same(mine, reference) / len(prompts)
        prefers = lambda x: [a.yes_logprob > a.no_logprob for a in x]  # noqa: E731 - what forced choice would pick
        r["same_yes_no_preference"] = sum(a == b for a, b in zip(prefers(mine), prefers(reference))) / len(prompts)
        diffs = [
            abs(p_yes(a.yes_logprob, a.no_logprob) - p_yes(b.yes_logprob, b.no_logprob))
            for a, b in zip(mine, reference)
            if p_yes(a.yes_logprob, a.no_logprob) is not None and p_yes(b.yes_logprob, b.no_logprob) is not None
        ]
        r["max_p_yes_diff"] = max(diffs, default=math.nan)

    print(
        f"\nplain and repeat-prefix: batches of {args.batch} in file order; shared-prefix: calls of {args.window} "
        f"prompts, median of {args.repeats} passes.\npadding: tokens through the matmuls / real tokens - 1 (whole "
        "prompts for plain, tails otherwise); shared-prefix packs the tails and pads only their attention (grid).\n"
        "TFLOP/s: 2 x decoder weights x real tail tokens / s (the work left once the prefix is reused).\n"
        "Agreement with plain: first token, verdict, P(Yes) > P(No) (forced choice's answer); max |p_yes difference|."
    )
    print("\n| backend: transformers | prompts / s | prompt tokens / s | padding | TFLOP/s | peak GiB "
          "| same token | same verdict | same Yes/No preference | max d p_yes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(
            f"| {label} | {r['prompts_per_s']:.1f} | {r['prompt_tokens_per_s']:.0f} | {r['padding']:.1%}"
            + (f" (grid {r['attention_grid_padding']:.1%})" if r["attention_grid_padding"] is not None else "")
            + " | "
            f"{r['tflops']:.3g} | {r['peak_gib'] or float('nan'):.1f} | {r['same_first_token']:.2%} | "
            f"{r['same_verdict']:.2%} | {r['same_yes_no_preference']:.2%} | {r['max_p_yes_diff']:.3g} |"
        )
    base = rows["repeat-prefix"]["prompts_per_s"]
    best = max((label for label in rows if label.startswith("shared")), key=lambda k: rows[k]["prompts_per_s"])
    ratios = {
        "repeat-prefix / plain": base / rows["plain"]["prompts_per_s"],
        f"{best} / repeat-prefix": rows[best]["prompts_per_s"] / base,
        f"{best} / plain": rows[best]["prompts_per_s"] / rows["plain"]["prompts_per_s"],
    }
    print("\n" + "; ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(
            json.dumps(
                {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                 "preset": args.preset, "layers": layers, "rows": rows, "ratios": ratios}, indent=1,
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
