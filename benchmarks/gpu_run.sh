#!/usr/bin/env bash
# The GPU measurements of issues 3 and 4 as ONE device run (the lent H100 has no internet and
# 15 minutes per session). Prepare the wheels it lacks here first (they go to the ignored .whl/):
#
#   for p in diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 importlib_metadata==8.7.0; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform any -d .whl "$p"; done
#
# then run it through the device tool with carry [".whl"] and a timeout of ~540 s:
#   bash benchmarks/gpu_run.sh
# It writes sdxl.json / sdxl.log / scoring.log under $OUT.
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
# Scoring first (short); then SDXL: (a), (b) with the defaults, and (b1) = (b) + fused QKV projections.
timeout 150 python3 benchmarks/scoring_benchmark.py 2>&1 | grep -v "kept in float32" | tee "$OUT/scoring.log"
timeout 330 python3 benchmarks/sdxl_benchmark.py --validate --variant fuse_qkv=true --out "$OUT/sdxl.json" 2>&1 \
  | grep -v "kept in float32" | tee "$OUT/sdxl.log"
# Issue 6: the judge's transformers backend on Llama-3-8B's architecture, with and without the prefix cache.
timeout 200 python3 benchmarks/judge_benchmark.py --out "$OUT/judge.json" 2>&1 | tee "$OUT/judge.log"
