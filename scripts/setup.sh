#!/usr/bin/env bash
# Create .venv and install the project with its test extras (idempotent; pip, not uv: see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import synthvlm_assets, dagster, pytest" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
fi
