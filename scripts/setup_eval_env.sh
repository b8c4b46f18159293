#!/usr/bin/env bash
# .venv-eval: lmms-eval (pyproject's `eval` extra) in an environment of its own, layered over .venv: a .pth
# file puts .venv's site-packages after its own, so torch, transformers and datasets are .venv's and only
# lmms-eval and what it adds live here (~0.8 GB, ~25 s). Not in .venv: lmms-eval's latex2sympy2 pins
# antlr4-python3-runtime 4.7.2, which breaks Dagster's asset-selection parser, and lmms-eval needs filelock < 4.
# llava_benchmark_eval finds it beside .venv; elsewhere set SYNTHVLM_LMMS_EVAL_PYTHON. Re-installs when
# pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
base="${BASE_VENV:-.venv}"     # the GPU image: BASE_VENV=/opt/venv EVAL_VENV=/opt/eval
env="${EVAL_VENV:-.venv-eval}"
stamp="$env/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
[ -f "$stamp" ] && exit 0
[ -x "$env/bin/python" ] || "$base/bin/python" -m venv "$env"
"$env/bin/python" - "$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" <<'PY'
import os, sys, sysconfig
# addsitedir (not a bare path): .venv's own .pth files (the editable install) are read too.
with open(os.path.join(sysconfig.get_paths()["purelib"], "_synthvlm_base_venv.pth"), "w") as f:
    f.write(f"import site; site.addsitedir({os.path.abspath(sys.argv[1])!r})\n")
PY
mapfile -t reqs < <("$base/bin/python" -c '
import tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["eval"]
print("\n".join(r for r in extra if not r.startswith("synthvlm-assets")))')
"$env/bin/python" -m pip install -q --upgrade pip
"$env/bin/python" -m pip install -q "${reqs[@]}"
rm -f "$env"/.installed-* && touch "$stamp"
