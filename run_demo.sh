#!/usr/bin/env bash
# The main job on the embedded default: set up .venv (the `gpu` extra only), register the caption files,
# curate every shard, judge, synthesize and score the first shard(s) with the tiny preset, select, train.
#   ./run_demo.sh [caption files...]   (default: data/coco_captions_val2017_sample.json, 5,000 COCO captions)
# e.g. ./run_demo.sh path/to/captions_val2017.json more.jsonl
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh demo
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}"
mkdir -p "$DAGSTER_HOME" && cp -n dagster.yaml "$DAGSTER_HOME/dagster.yaml" 2>/dev/null || true
inputs=("$@")
[ ${#inputs[@]} -gt 0 ] || inputs=(data/coco_captions_val2017_sample.json)
# Unless SYNTHVLM_PRESET says otherwise, `synthvlm demo` runs every model not set by its own variable on the tiny
# preset: the real architectures with random weights, offline on a CPU (labelled as meaningless).
.venv/bin/synthvlm demo --input "${inputs[@]}" --image-shards "${SYNTHVLM_IMAGE_SHARDS:-1}"
