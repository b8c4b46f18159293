# The run worker: every run (and, on Kubernetes, every step) executes in this image. Only what runs need:
# the project with its gpu and deploy extras in /opt/venv (CUDA PyTorch: its wheels bring their own CUDA
# libraries; the host's NVIDIA driver comes in through the NVIDIA container toolkit, asked for by the
# NVIDIA_* variables below). Not in it: vLLM (the judge's server is its own service: compose.gpu.yaml,
# judge backend `http`), lmms-eval (docker/eval.Dockerfile) and KenLM (the perplexity filter is off unless
# a KenLM model is configured, and then says the package is missing).
# Build from the repository root (or with docker/build.sh, which also serves a local wheelhouse):
#   docker build -f docker/worker.Dockerfile -t synthvlm-worker:0.1.0 .
# The base image is a build argument: any Debian/Ubuntu image with python3.11 and its venv module.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    HF_HOME=/cache/huggingface \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    OMP_WAIT_POLICY=PASSIVE
# OMP_WAIT_POLICY: run containers share the host's cores; spinning OpenMP threads starve each other (two
# tiny-model runs on 2 cores: 16 s instead of 3 s each). Override it per run if a CPU-bound step wants spinning.

# The same uid as the code-location image: both write the shared Dagster storage volume (step logs).
RUN useradd --create-home --uid 1000 dagster \
    && mkdir -p /cache "$DAGSTER_HOME/storage" /opt/dagster/app \
    && chown -R dagster /cache "$DAGSTER_HOME"

WORKDIR /opt/synthvlm
# pip's settings for the build only (a mirror, or docker/build.sh's local wheelhouse); unset: PyPI.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_TRUSTED_HOST
# Dependencies first (~6 GB, a layer that only pyproject.toml changes), then the code (a small layer).
# (A stub package and README: the layer's cache key is pyproject.toml alone.)
COPY pyproject.toml ./
RUN mkdir synthvlm_assets && touch synthvlm_assets/__init__.py README.md \
    && python3 -m venv /opt/venv \
    && pip install ".[gpu,deploy]" \
    && rm -rf synthvlm_assets build README.md
COPY README.md ./
COPY synthvlm_assets ./synthvlm_assets
RUN pip install --no-deps . \
    && rm -rf build \
    && python -c "import synthvlm_assets.definitions, torch, torchvision, diffusers, open_clip, skimage, dagster_docker"

USER 1000
WORKDIR /opt/dagster/app
# The launchers give the command (`dagster api execute_run` / `execute_step`); this is for a shell.
CMD ["python", "-c", "import synthvlm_assets.definitions"]
