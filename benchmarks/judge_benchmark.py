"""LLM judge throughput: prompts/s and prefill tokens/s of the transformers backend with and without
the shared-prefix KV cache, side by side in one process, on COCO captions.

    .venv/bin/python benchmarks/judge_benchmark.py               # GPU: Llama-3-8B's architecture, random weights, bf16
    .venv/bin/python benchmarks/judge_benchmark.py --preset tiny # CPU: the tiny Llama

vLLM itself (the default backend on GPUs) has no CPU build and is not installed on the lent test GPU;
the settings a user should start from are in the README (Caption judge).
Random weights: speed does not depend on them; the verdicts are meaningless. The tokenizer is built in
code (byte-level BPE trained on the captions) since Llama 3's own is a download: token counts per
prompt are printed so the figures can be scaled to the real tokenizer's (~130 tokens per prompt).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from synthvlm_assets.captions.judge.backends import TransformersJudge
from synthvlm_assets.captions.judge.prompt import INSTRUCTION, JudgePrompt
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--preset", choices=["llama3-8b", "tiny"], default="llama3-8b" if gpu else "tiny")
    p.add_argument("--captions", type=int, default=2048 if gpu else 256)
    p.add_argument("--batch", type=int, default=128 if gpu else 32)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--coco", type=Path, default=COCO, help="COCO captions JSON (default: ../shared/data's copy)")
    args = p.parse_args()
    device = "cuda" if gpu else "cpu"
    if args.preset == "llama3-8b" and not gpu:
        raise SystemExit("the Llama-3-8B benchmark needs a GPU: use --preset tiny on a CPU")
    captions = [a["caption"] for a in json.loads(args.coco.read_text())["annotations"][: args.captions]]
    if args.preset == "tiny":
        tokenizer = tiny_llama_tokenizer()
        model = tiny_llama(tokenizer)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = trained_llama_tokenizer(captions + [INSTRUCTION] * 50 + ["Yes No yes no YES NO"] * 50, 32000)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B, attn_implementation="sdpa")).to(torch.bfloat16)
    prompt = JudgePrompt.build(tokenizer)
    prompts = [prompt.ids(c) for c in captions]
    tokens = sum(map(len, prompts))
    name = (
        torch.cuda.get_device_name()
        if gpu
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(
        f"device: {name}; torch {torch.__version__}; preset {args.preset}; {len(prompts)} COCO captions, batch "
        f"{args.batch}; "
        f"prompt tokens: prefix {len(prompt.prefix)}, mean {tokens / len(prompts):.1f}"
    )

    rows = {}
    for label, cache in (("without prefix cache", False), ("with shared-prefix KV cache", True)):
        judge = TransformersJudge(model, tokenizer, prefix_cache=cache, device=device)
        judge.score(prompts[: args.batch], shared_prefix=len(prompt.prefix))  # warm-up
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for i in range(0, len(prompts), args.batch):
            judge.score(prompts[i : i + args.batch], shared_prefix=len(prompt.prefix))
        if gpu:
            torch.cuda.synchronize()
        s = time.perf_counter() - t
        rows[label] = {
            "prompts_per_s": len(prompts) / s,
            "prompt_tokens_per_s": tokens / s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        }

    print("\n| backend: transformers | prompts / s | prompt tokens / s | peak GiB |")
    print("|---|---|---|---|")
    for label, r in rows.items():
        print(
            f"| {label} | {r['prompts_per_s']:.1f} | {r['prompt_tokens_per_s']:.0f} | "
            f"{r['peak_gib'] or float('nan'):.1f} |"
        )
    ratio = rows["with shared-prefix KV cache"]["prompts_per_s"] / rows["without prefix cache"]["prompts_per_s"]
    print(f"\nprefix cache speed-up: {ratio:.2f}x (tokens/s counts every prompt token, cached or not)")
    if args.out:
        args.out.write_text(
            json.dumps({"device": name, "preset": args.preset, "rows": rows, "ratio": ratio}, indent=1)
        )


if __name__ == "__main__":
    main()
