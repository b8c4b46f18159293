#!/usr/bin/env bash
# The GPU measurements (issues 3, 4, 6, 7) as ONE device run (the lent H100 has no internet and
# 15 minutes per session). Prepare the wheels it lacks here first (they go to the ignored .whl/):
#
#   for p in diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 importlib_metadata==8.7.0 transformers==5.23.0; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform any -d .whl "$p"; done
#
# ../shared does not travel: the judge reads COCO from $COCO_JSON (copy it into .whl/ too and set
# COCO_JSON=.whl/coco_captions_val2017.json). Then run it through the device tool with carry [".whl"] and a timeout of ~540 s:
#   bash benchmarks/gpu_run.sh [scoring] [sdxl] [judge] [training]     (default: all four; ~15 min)
# It writes <part>.log (and sdxl.json, judge.json, training.json) under $OUT. Timings on an H100 (warm machine):
# training ~3 min, judge ~1 min. (transformers 5.23.0, the project's pin, replaces the image's 5.17.)
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, open_clip; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'open_clip', open_clip.__version__)" | tee -a "$OUT/gpu.txt"
# Which measurements (default: all): scoring sdxl judge training. All four measured on an H100 on 2026-11-26
# (benchmarks/results/*-h100.*; the training table with transformers 5.23.0 carried as a wheel in .whl/).
# Open: the --varied-captions training run with the current code (static widths, no attention mask).
parts="${*:-scoring sdxl judge training}"
for part in $parts; do
  case "$part" in
    scoring)  timeout 150 python3 benchmarks/scoring_benchmark.py 2>&1 | grep -v "kept in float32" | tee "$OUT/scoring.log" ;;
    sdxl)     timeout 330 python3 benchmarks/sdxl_benchmark.py --validate --variant fuse_qkv=false --out "$OUT/sdxl.json" 2>&1 \
                | grep -v "kept in float32" | tee "$OUT/sdxl.log" ;;
    judge)    timeout 200 python3 benchmarks/judge_benchmark.py ${COCO_JSON:+--coco "$COCO_JSON"} --out "$OUT/judge.json" 2>&1 | tee "$OUT/judge.log" ;;
    training) timeout 420 python3 benchmarks/training_benchmark.py --micro-batch 16 24 --paths plain project project-compiled \
                --out "$OUT/training.json" 2>&1 | tee "$OUT/training.log"
              # real captions' shape: lengths 24..72, padded per batch (the compiled path to a multiple of 16)
              timeout 240 python3 benchmarks/training_benchmark.py --micro-batch 16 --varied-captions --paths plain project project-compiled \
                --out "$OUT/training-varied.json" 2>&1 | tee "$OUT/training-varied.log" ;;
    *) echo "unknown part: $part (scoring sdxl judge training)"; exit 2 ;;
  esac
done
