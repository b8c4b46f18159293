#!/usr/bin/env bash
# The GPU measurements of issue 20 (and the earlier 3, 4, 6, 7) for the lent H100/H200, which has no internet and
# 15 minutes per session (start included) and 10 minutes a command. Prepare the wheels it lacks here first (they go
# to the ignored .whl/):
#
#   for p in diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 importlib_metadata==8.7.0 transformers==5.23.0; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform any -d .whl "$p"; done
#
# ../shared does not travel: the judge reads COCO from $COCO_JSON (copy it into .whl/ too and set
# COCO_JSON=.whl/coco_captions_val2017.json). Then, through the device tool with carry [".whl"], two calls:
#   bash benchmarks/gpu_run.sh scoring judge sdxl     (~100 + ~90 + ~250 s: timeout_s 540)
#   bash benchmarks/gpu_run.sh training               (the varied-caption stage 1 at 7B, ~240 s: timeout_s 300)
# Estimates from CPU runs of the same scripts, not measurements. Each part writes <part>.log (and a .json) under
# $OUT, with the device, versions and date; copy them to benchmarks/results/<part>-<device>.* and update
# docs/benchmarks.md. `training-static` re-measures the fixed-length table (training-h100.*, 2026-11-26).
# What each part measures (issue 20's targets, ratios within the same run):
#   scoring   images/s from JPEG bytes to scores, ViT-B-32 and ViT-L-14-336 + SSIM: decode=workers (the baseline),
#             device-resize and device (nvjpeg), beside the scikit-image reference; max |diff| (<= 1e-4 SSIM)
#             and nvjpeg's pixels against PIL's. Target: >= 300 images/s with decode=device.
#   judge     prompts/s at the Llama-3-8B shape (random bf16 weights, 2,048 COCO captions): plain, repeat-prefix
#             (the 407/s path) and shared-prefix at 8,192 and 16,384 batch tokens; verdict agreement. Target 1,500.
#   sdxl      s/image of the SynthVLM call, the default path and the fast paths (deepcache_interval 2 and 3,
#             fp8_linear, both) at 1024², 60 steps, cfg 20, with PSNR/SSIM of each against bf16. Target 3.5x.
#   training  stage-1 samples/s at 7B with captions of 24..72 tokens padded per batch. Target >= 35.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
{ date -u +%Y-%m-%dT%H:%MZ; git rev-parse --short HEAD 2>/dev/null; } | tee "$OUT/gpu.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"
python3 -c "import torch, diffusers, open_clip; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'open_clip', open_clip.__version__)" | tee -a "$OUT/gpu.txt"
parts="${*:-scoring judge sdxl training}"
for part in $parts; do
  case "$part" in
    scoring)  timeout 150 python3 benchmarks/scoring_benchmark.py 2>&1 | grep -v "kept in float32" | tee "$OUT/scoring.log" ;;
    sdxl)     timeout 300 python3 benchmarks/sdxl_benchmark.py --budget-s 150 --out "$OUT/sdxl.json" 2>&1 \
                | grep -v "kept in float32" | tee "$OUT/sdxl.log" ;;
    judge)    timeout 200 python3 benchmarks/judge_benchmark.py ${COCO_JSON:+--coco "$COCO_JSON"} --out "$OUT/judge.json" 2>&1 | tee "$OUT/judge.log" ;;
    # real captions' shape: lengths 24..72, padded per batch (the compiled path to a multiple of 16)
    training) timeout 280 python3 benchmarks/training_benchmark.py --micro-batch 16 --varied-captions --paths plain project project-compiled \
                --out "$OUT/training-varied.json" 2>&1 | tee "$OUT/training-varied.log" ;;
    training-static) timeout 420 python3 benchmarks/training_benchmark.py --micro-batch 16 24 --paths plain project project-compiled \
                --out "$OUT/training.json" 2>&1 | tee "$OUT/training.log" ;;
    *) echo "unknown part: $part (scoring judge sdxl training training-static)"; exit 2 ;;
  esac
done
