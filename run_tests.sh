#!/usr/bin/env bash
# Set up .venv and run the test suite (starts its own SeaweedFS S3 server on 127.0.0.1).
#   ./run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh test
# lmms-eval, for the benchmark asset's tests, in .venv-eval (an environment of its own: see the script).
bash scripts/setup_eval_env.sh
# Lint first (seconds): the settings are pyproject.toml's.
.venv/bin/ruff check --quiet . && .venv/bin/ruff format --check --quiet .
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
