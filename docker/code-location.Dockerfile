# The code location (CPU): `dagster code-server`, the webserver and the daemon. The project with its deploy
# extra (PostgreSQL storage, the Docker and Kubernetes launchers) in /opt/venv; no PyTorch: loading the
# definitions never imports it.
# Build from the repository root (or with docker/build.sh, which also serves a local wheelhouse):
#   docker build -f docker/code-location.Dockerfile -t synthvlm-code:0.1.0 .
# The base image is a build argument: any Debian/Ubuntu image with python3.11 and its venv module.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    DAGSTER_HOME=/opt/dagster/dagster_home

RUN useradd --create-home --uid 1000 dagster \
    && mkdir -p "$DAGSTER_HOME/storage" /opt/dagster/app \
    && chown -R dagster "$DAGSTER_HOME"

WORKDIR /opt/synthvlm
# pip's settings for the build only (a mirror, or docker/build.sh's local wheelhouse); unset: PyPI.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_TRUSTED_HOST
# Dependencies first (a layer that only pyproject.toml changes), then the code.
# (A stub package and README: the layer's cache key is pyproject.toml alone.)
COPY pyproject.toml ./
RUN mkdir synthvlm_assets && touch synthvlm_assets/__init__.py README.md \
    && python3 -m venv /opt/venv \
    && pip install ".[deploy]" \
    && rm -rf synthvlm_assets build README.md
COPY README.md ./
COPY synthvlm_assets ./synthvlm_assets
RUN pip install --no-deps . \
    && rm -rf build \
    && python -c "import synthvlm_assets.definitions"

USER 1000
WORKDIR /opt/dagster/app
EXPOSE 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "synthvlm_assets.definitions", \
     "--location-name", "synthvlm_assets"]
