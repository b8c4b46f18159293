# The code location (CPU): `dagster code-server`, the webserver and the daemon. Installs the project
# from its own pyproject.toml (base dependencies + the deploy extra: PostgreSQL storage, the Docker and
# Kubernetes launchers); no PyTorch: loading the definitions never imports it.
# Build from the repository root:  docker build -f docker/code-location.Dockerfile -t synthvlm-code:0.1.0 .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home

WORKDIR /opt/synthvlm
COPY pyproject.toml README.md ./
COPY synthvlm_assets ./synthvlm_assets
RUN pip install ".[deploy]" \
    && python -c "import synthvlm_assets.definitions" \
    && useradd --create-home --uid 1000 dagster \
    && mkdir -p "$DAGSTER_HOME/storage" \
    && chown -R dagster "$DAGSTER_HOME"

USER 1000
WORKDIR /opt/dagster/app
EXPOSE 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "synthvlm_assets.definitions", "--location-name", "synthvlm_assets"]
