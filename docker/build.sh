#!/usr/bin/env bash
# Build the stack's images from this checkout (host network; the classic builder and BuildKit both do):
#   docker/build.sh [code] [worker] [eval]          (default: code worker)
# Environment:
#   SYNTHVLM_CODE_IMAGE / SYNTHVLM_WORKER_IMAGE / SYNTHVLM_EVAL_IMAGE   tags (defaults: synthvlm-*:0.1.0)
#   SYNTHVLM_PYTHON_IMAGE   base of both images (default python:3.11.11-slim-bookworm)
#   SYNTHVLM_WHEELHOUSE=DIR  install from a local wheelhouse instead of PyPI: this host's pip (its own index,
#       find-links and CA settings) fills DIR with the wheels the extras need, and the build installs them
#       offline from a throwaway HTTP server on 127.0.0.1 (build args PIP_NO_INDEX, PIP_FIND_LINKS).
#   SYNTHVLM_BUILD_REF=REF   build a commit (git archive REF) instead of the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
CODE_IMAGE=${SYNTHVLM_CODE_IMAGE:-synthvlm-code:0.1.0}
WORKER_IMAGE=${SYNTHVLM_WORKER_IMAGE:-synthvlm-worker:0.1.0}
EVAL_IMAGE=${SYNTHVLM_EVAL_IMAGE:-synthvlm-eval:0.1.0}
PYTHON_IMAGE=${SYNTHVLM_PYTHON_IMAGE:-python:3.11.11-slim-bookworm}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(code worker)
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python

pip_args=()
server_pid=""
ctx=.
cleanup() {
  [ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
  [ "$ctx" = . ] || rm -rf "$ctx"
}
trap cleanup EXIT
if [ -n "${SYNTHVLM_BUILD_REF:-}" ]; then
  ctx=$(mktemp -d /tmp/synthvlm-build-context.XXXXXX)
  git archive "$SYNTHVLM_BUILD_REF" | tar -x -C "$ctx"
  echo "building $(git rev-parse --short "$SYNTHVLM_BUILD_REF")"
fi
if [ -n "${SYNTHVLM_WHEELHOUSE:-}" ]; then
  wh=$SYNTHVLM_WHEELHOUSE
  mkdir -p "$wh"
  stamp="$wh/.filled-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    t0=$(date +%s)
    # The extras' requirements (not the project: it is built in the image) and its build-system requirements.
    "$PYTHON" -c '
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
extras = p["project"]["optional-dependencies"]
reqs = list(p["project"]["dependencies"]) + list(p["build-system"]["requires"])
for name in ("deploy", "gpu"):
    reqs += [r for r in extras[name] if not r.startswith("synthvlm-assets")]
print("\n".join(reqs))' > "$wh/requirements.txt"
    "$PYTHON" -m pip download -q -d "$wh" -r "$wh/requirements.txt" 2>&1 | { grep -v "is ignored: it is neither" || true; }
    rm -f "$wh"/.filled-* && touch "$stamp"
    echo "wheelhouse filled in $(($(date +%s) - t0)) s: $(du -sh "$wh" | cut -f1)"
  fi
  # A fixed port: build arguments are part of the layer cache key.
  port=${SYNTHVLM_WHEELHOUSE_PORT:-38111}
  "$PYTHON" -m http.server -b 127.0.0.1 -d "$wh" "$port" > /tmp/synthvlm-wheelhouse-http.log 2>&1 &
  server_pid=$!
  for _ in $(seq 50); do
    "$PYTHON" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { echo "port $port is taken (set SYNTHVLM_WHEELHOUSE_PORT)" >&2; exit 1; }
    sleep 0.2
  done
  pip_args=(--build-arg PIP_NO_INDEX=1 --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
fi

build() { # tag dockerfile [build args...]
  local tag=$1 file=$2 t0 log
  shift 2
  t0=$(date +%s)
  log="/tmp/synthvlm-build-${file##*/}.log"
  # --force-rm: a failed step's container (several GB for the worker's dependencies) does not stay behind.
  if ! docker build --force-rm --network host "${pip_args[@]}" -f "$ctx/$file" -t "$tag" "$@" "$ctx" > "$log" 2>&1; then
    tail -40 "$log" >&2
    echo "build of $tag failed (log: $log)" >&2
    exit 1
  fi
  echo "built $tag in $(($(date +%s) - t0)) s: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1/1e9}')"
}
for target in "${targets[@]}"; do
  case $target in
    code) build "$CODE_IMAGE" docker/code-location.Dockerfile --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" ;;
    worker) build "$WORKER_IMAGE" docker/worker.Dockerfile --build-arg "BASE_IMAGE=$PYTHON_IMAGE" ;;
    eval) build "$EVAL_IMAGE" docker/eval.Dockerfile --build-arg "WORKER_IMAGE=$WORKER_IMAGE" ;;
    *) echo "unknown target $target (code, worker, eval)" >&2; exit 2 ;;
  esac
done
