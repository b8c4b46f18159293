#!/usr/bin/env bash
# Create .venv and install the project with one extra; re-installs when pyproject.toml changes.
#   scripts/setup.sh demo   the project + the `gpu` extra (PyTorch, diffusers, transformers, open_clip):
#                           what ./run_demo.sh runs; no compiler, no lmms-eval
#   scripts/setup.sh test   the `test` extra (gpu + perplexity (KenLM, built from source) + deploy + pytest):
#                           what ./run_tests.sh runs (the default)
#   scripts/setup.sh EXTRA  any other extra of pyproject.toml
# (pip, not uv/poetry: pip takes torch from the local wheel cache of these machines.)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-test}"
[ "$extra" = demo ] && extra=gpu
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
hash="$(sha256sum pyproject.toml | cut -c1-16)"
# The test extra includes gpu: a venv set up for the tests serves the demo too.
# (.installed-$hash without an extra: the stamp of an older setup.sh, which installed test.)
[ -f ".venv/.installed-$hash" ] && mv ".venv/.installed-$hash" ".venv/.installed-$hash-test"
if [ -f ".venv/.installed-$hash-$extra" ] || { [ "$extra" = gpu ] && [ -f ".venv/.installed-$hash-test" ]; }; then
  exit 0
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[$extra]"
find .venv -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash-*" -delete
touch ".venv/.installed-$hash-$extra"
# The browser test (test_ui_browser.py) uses Debian's Chromium, not a Playwright download; it skips without
# it (.ci/run installs it and makes it required).
if [ "$extra" = test ] && ! command -v chromium >/dev/null 2>&1; then
  echo "note: no chromium on PATH: the browser test will skip (apt-get install chromium)" >&2
fi
