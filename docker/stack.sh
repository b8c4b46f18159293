#!/usr/bin/env bash
# The compose stack with what compose alone does not do:
#   docker/stack.sh [--gpu] up|down|build|ps|logs|<any compose command> [args...]
# - DOCKER_GID: the group of /var/run/docker.sock, given to the daemon and webserver (they run as uid 1000
#   and start/stop run containers through the socket);
# - `down` first removes the run containers the daemon started (label synthvlm.stack=synthvlm): a live one
#   would keep the network and volumes, and `down -v` would leave them behind;
# - `up` means `up -d`; --gpu adds docker/compose.gpu.yaml (GPU run containers, the vLLM judge).
# Compose v2 (`docker compose`) or v1 (`docker-compose`, 1.29: Debian's). Settings: docker/.env (or
# SYNTHVLM_ENV_FILE), project name: COMPOSE_PROJECT_NAME (default synthvlm).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
files=(-f "$here/compose.yaml")
if [ "${1:-}" = "--gpu" ]; then
  files+=(-f "$here/compose.gpu.yaml")
  shift
fi
env_file=${SYNTHVLM_ENV_FILE:-$here/.env}
[ -f "$env_file" ] || { echo "no $env_file: cp docker/.env.example docker/.env and set the secrets" >&2; exit 1; }
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-synthvlm}
socket=${DOCKER_HOST:-unix:///var/run/docker.sock}
socket=${socket#unix://}
if [ -z "${DOCKER_GID:-}" ]; then
  DOCKER_GID=$(stat -c %g "$socket" 2>/dev/null || true)
  [ -n "$DOCKER_GID" ] || { echo "cannot stat $socket: set DOCKER_GID" >&2; exit 1; }
  export DOCKER_GID
fi
if docker compose version > /dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose > /dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "neither \`docker compose\` (v2) nor docker-compose (v1) is installed" >&2
  exit 1
fi
run() { "${compose[@]}" "${files[@]}" --env-file "$env_file" "$@"; }
cmd=${1:-}
[ -n "$cmd" ] || { sed -n '2,11p' "$0" >&2; exit 2; }
shift
case $cmd in
  up) run up -d "$@" ;;
  build) run --profile build build "$@" ;;
  down)
    # Stop what launches runs (daemon, webserver), then remove the run containers (they hold the network and
    # the named volumes): removed before the daemon stopped, a run launched meanwhile kept the network alive.
    run stop daemon webserver > /dev/null 2>&1 || true
    ids=$(docker ps -aq --filter label=synthvlm.stack=synthvlm)
    if [ -n "$ids" ]; then
      # shellcheck disable=SC2086
      docker rm -f $ids > /dev/null
    fi
    run down --remove-orphans "$@"
    ;;
  *) run "$cmd" "$@" ;;
esac
