#!/usr/bin/env bash
# The main job on the embedded default: set up, register the COCO val2017 captions, curate every shard.
#   ./run_demo.sh [caption files...]     (default: ../shared/data/coco_captions_val2017.json)
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}"
mkdir -p "$DAGSTER_HOME" && cp -n dagster.yaml "$DAGSTER_HOME/dagster.yaml" 2>/dev/null || true
inputs=("$@")
[ ${#inputs[@]} -gt 0 ] || inputs=(../shared/data/coco_captions_val2017.json)
# The tiny preset: SDXL of the real architecture with random weights, offline on a CPU (labelled images).
export SYNTHVLM_JUDGE_MODEL="${SYNTHVLM_JUDGE_MODEL:-tiny}" SYNTHVLM_SDXL_MODEL="${SYNTHVLM_SDXL_MODEL:-tiny}" SYNTHVLM_CLIP_MODEL="${SYNTHVLM_CLIP_MODEL:-tiny}"
.venv/bin/synthvlm demo --input "${inputs[@]}" --image-shards "${SYNTHVLM_IMAGE_SHARDS:-1}"
