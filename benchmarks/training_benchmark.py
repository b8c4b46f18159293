"""Stage-1 training step: this project's step (cross-entropy on the caption positions only, loss per caption
token of the global batch; `project-compiled` adds regional torch.compile) against a plain transformers
step (`labels=` loss over all logits: BASELINES.md's reference), both with the frozen parts stored in bf16
as LLaVA's train.py loads them and the projector in fp32 under bf16 autocast, side by side in one run on
the same batches and the same initial projector. Reports samples/s, TFLOP/s (counted with torch's
FlopCounterMode), steady-state peak memory and the two losses of the first step.

    .venv/bin/python benchmarks/training_benchmark.py                          # GPU: the LLaVA-1.5-7B shape
    .venv/bin/python benchmarks/training_benchmark.py --micro-batch 16 24 32   # several micro-batches
    .venv/bin/python benchmarks/training_benchmark.py --paths plain project project-compiled # + regional torch.compile
    .venv/bin/python benchmarks/training_benchmark.py --preset tiny            # CPU: the tiny preset

Each row is printed as soon as it is measured (a run cut short by a time limit keeps what it measured).

Random weights of the real shapes (CLIP ViT-L/14-336 tower, Llama-7B = Vicuna-1.5-7B, mlp2x_gelu):
speed does not depend on the weights. 576 image tokens + 48 caption tokens per sample (BASELINES.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch

from synthvlm_assets.training.data import IGNORE_INDEX
from synthvlm_assets.training.model import (
    COMPILED_LENGTH_MULTIPLE,
    ModelSettings,
    _tiny_parts,
    assemble,
    compile_layers,
    freeze_all_but_projector,
    tiny_vicuna_tokenizer,
    vision_token_count,
)
from synthvlm_assets.training.stage1 import optimizer_step, token_loss_sum

CAPTION_TOKENS = 48


def build(preset: str, device: torch.device, dtype: torch.dtype):
    """(model, processor) of the preset with random weights, built on the device in `dtype`."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same random weights in every path, so their first-step losses compare
    if preset == "tiny":
        vision, image_processor, llm, tokenizer = _tiny_parts(0)
    else:
        tokenizer = tiny_vicuna_tokenizer()  # only its <image> id matters: the batches are synthetic
        with torch.device(device):
            torch.set_default_dtype(dtype)
            try:
                vision = CLIPVisionModel(
                    CLIPVisionConfig(
                        hidden_size=1024,
                        intermediate_size=4096,
                        num_hidden_layers=24,
                        num_attention_heads=16,
                        patch_size=14,
                        image_size=336,
                        projection_dim=768,
                        attn_implementation="sdpa",
                    )
                )
                llm = LlamaForCausalLM(
                    LlamaConfig(
                        hidden_size=4096,
                        intermediate_size=11008,
                        num_hidden_layers=32,
                        num_attention_heads=32,
                        num_key_value_heads=32,
                        vocab_size=32000,
                        max_position_embeddings=4096,
                        attn_implementation="sdpa",
                    )
                )
            finally:
                torch.set_default_dtype(torch.float32)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    model, processor = assemble(vision, image_processor, llm, tokenizer, ModelSettings(seed=0))
    return model.to(device), processor


def batch(model, processor, n: int, seed: int, varied: bool = False, multiple: int = 1) -> dict:
    """n samples of the plain template: BOS, the image tokens, CAPTION_TOKENS caption tokens. `varied`:
    caption lengths drawn from 24..72 (mean 48) as real captions are, right-padded to the batch's longest
    rounded up to `multiple` (padding masked), so the padded length changes from batch to batch. Without
    `varied` every row has the same length (BASELINES.md's shape) and nothing is padded."""
    g = torch.Generator().manual_seed(seed)
    n_img = vision_token_count(model)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    vocab = min(model.config.text_config.vocab_size, image_id)  # caption ids below the <image> id
    lengths = torch.randint(24, 73, (n,), generator=g) if varied else torch.full((n,), CAPTION_TOKENS)
    caption = torch.randint(3, vocab, (n, int(lengths.max())), generator=g)
    if varied:  # padded as the collator pads: to the longest row, rounded up to the multiple
        width = -(-(1 + n_img + caption.shape[1]) // multiple) * multiple
        caption = torch.nn.functional.pad(caption, (0, width - 1 - n_img - caption.shape[1]))
    caption_mask = torch.arange(caption.shape[1]) < lengths[:, None]
    ids = torch.cat(
        [torch.ones(n, 1, dtype=torch.long), torch.full((n, n_img), image_id), caption.where(caption_mask, 0)], 1
    )
    attention_mask = torch.cat([torch.ones(n, 1 + n_img, dtype=torch.long), caption_mask.long()], 1)
    labels = ids.where(attention_mask.bool(), IGNORE_INDEX)
    labels[:, : 1 + n_img] = IGNORE_INDEX
    size = model.config.vision_config.image_size
    return {
        "input_ids": ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.randn(n, 3, size, size, generator=g),
    }


def plain_step(model, b: dict, optimizer, device, dtype) -> float:
    b = {k: v.to(device) for k, v in b.items()}
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(**b).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure(
    path: str,
    preset: str,
    micro_batch: int,
    steps: int,
    device: torch.device,
    profile_rows: int = 0,
    varied: bool = False,
) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    cuda = device.type == "cuda"
    compute = torch.bfloat16 if cuda else torch.float32
    # Both store the frozen parts in bf16, as LLaVA's train.py loads them (torch_dtype=bf16 under --bf16).
    model, processor = build(preset, device, compute)
    model.model.multi_modal_projector.float()
    params = freeze_all_but_projector(model)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    multiple = COMPILED_LENGTH_MULTIPLE if path == "project-compiled" else 1  # as stage 1 pads for compiled layers
    batches = [batch(model, processor, micro_batch, seed, varied, multiple) for seed in range(steps + 1)]

    # noqa F821 below: ruff sees the `del model, optimizer, params` further down (frees GPU memory); run is not
    # called after it.
    def run(b):
        if path == "plain":
            return plain_step(model, b, optimizer, device, compute)  # noqa: F821
        return optimizer_step(model, [b], params, optimizer, None, None, compute, 1.0, token_loss_sum)[0]  # noqa: F821

    with FlopCounterMode(display=False) as counter:  # also the first warm-up step, eager in every path
        first_loss = run(batches[0])
    flops = counter.get_total_flops()
    graphs = None
    if path == "project-compiled":
        # Compiled only now: dynamo does not trace under the counter's dispatch mode (torch 2.11 then runs
        # the layers eagerly for good, which an earlier version of this benchmark measured as "compiled").
        torch._dynamo.reset()  # a fresh compile per micro-batch
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compile_layers(model)  # what stage 1 does on CUDA (Stage1Settings.compile)
    for b in batches[1:]:  # warm-up over the timed batches: every padded width compiled before the clock
        run(b)
    if path == "project-compiled":
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the steady state's peak, not the compiler's
    t = time.perf_counter()
    for b in batches[1:]:
        run(b)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    if profile_rows:
        print_profile(path, lambda: run(batches[1]), profile_rows, cuda)
    del model, optimizer, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "path": path,
        "micro_batch": micro_batch,
        "samples_per_second": micro_batch / dt,
        "step_seconds": dt,
        "tflop_per_step": flops / 1e12,
        "tflops": flops / dt / 1e12,
        "peak_memory_gib": peak,
        "first_step_loss": first_loss,
        "compiled_graphs": graphs,
    }


def print_profile(path: str, step, rows: int, cuda: bool) -> None:
    """One more step under torch.profiler: the kernels that take the step's time, and what dynamo compiled."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(
        f"\nprofile of one {path} step (top {rows} by {key}); dynamo: {dict(counters['stats'])}, graph breaks: "
        f"{dict(counters['graph_break'])}"
    )
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=None, help="default: 16 (7b), 8 (tiny)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps after one warm-up step (default 5 on GPU, 3 on CPU)"
    )
    parser.add_argument(
        "--paths", nargs="+", choices=["plain", "project", "project-compiled"], default=["plain", "project"]
    )
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument(
        "--varied-captions",
        action="store_true",
        help="caption lengths 24..72 tokens, padded per batch (real data's shape)",
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the top N kernels of one profiled step per row"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.preset == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)  # as training does for the tiny preset: threads only add hand-off cost
    if args.preset == "7b" and device.type != "cuda":
        raise SystemExit("the 7b preset needs a GPU (about 60 GB); use --preset tiny on a CPU")
    device_name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    steps = args.steps or (5 if device.type == "cuda" else 3)
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    captions = (
        "24..72 caption tokens, padded per batch" if args.varied_captions else f"{CAPTION_TOKENS} caption tokens"
    )
    print(f"stage-1 step, preset {args.preset}, {captions}, device: {device_name}, {versions}")
    print("| path | micro-batch | samples/s | s/step | TFLOP/step | TFLOP/s | peak memory GiB | first-step loss |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for mb in args.micro_batch or ([16] if args.preset == "7b" else [8]):
        for path in args.paths:
            try:
                r = measure(path, args.preset, mb, steps, device, args.profile, args.varied_captions)
                print(
                    f"| {r['path']} | {r['micro_batch']} | {r['samples_per_second']:.2f} | {r['step_seconds']:.3f} | "
                    f"{r['tflop_per_step']:.4g} | "
                    f"{r['tflops']:.4g} | {r['peak_memory_gib']:.1f} | {r['first_step_loss']:.6f} |"
                    + (f" (dynamo graphs: {r['compiled_graphs']})" if r["compiled_graphs"] is not None else ""),
                    flush=True,
                )
            except torch.OutOfMemoryError:
                r = {"path": path, "micro_batch": mb, "samples_per_second": None, "note": "out of memory"}
                print(f"| {path} | {mb} | out of memory | | | | | |", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(r)
            if args.out:  # after every row: a run cut short keeps what it measured
                with open(args.out, "w") as f:
                    json.dump(
                        {
                            "device": device_name,
                            "preset": args.preset,
                            "versions": versions,
                            "captions": captions,
                            "rows": rows,
                        },
                        f,
                        indent=1,
                    )


if __name__ == "__main__":
    main()
