# The GPU run worker: every run (and, on Kubernetes, every step) executes in this image. CUDA base
# (the host's NVIDIA driver comes in through the NVIDIA container toolkit; PyTorch's wheels bring their
# own CUDA libraries), the project with its gpu, perplexity and deploy extras in /opt/venv, and vLLM
# (the judge's engine) in its own environment /opt/vllm, installed from the project's vllm extra:
# vLLM pins a different torch/transformers than the gpu extra, so the two cannot share one environment.
# lmms-eval (the benchmark asset) also lives apart, in /opt/eval layered over /opt/venv (its own packages
# only; torch and transformers are /opt/venv's): its antlr4 pin breaks Dagster's selection parser.
# Build from the repository root:  docker build -f docker/gpu-worker.Dockerfile -t synthvlm-gpu-worker:0.1.0 .
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS build

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A compiler for KenLM (the perplexity extra builds it from source).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev build-essential cmake \
       zlib1g-dev libbz2-dev liblzma-dev libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY synthvlm_assets ./synthvlm_assets
COPY scripts/setup_eval_env.sh ./scripts/
RUN python3.12 -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[gpu,perplexity,deploy]" \
    && python3.12 -m venv /opt/vllm \
    && /opt/vllm/bin/pip install ".[vllm]" \
    && BASE_VENV=/opt/venv EVAL_VENV=/opt/eval bash scripts/setup_eval_env.sh

FROM nvidia/cuda:12.8.1-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    HF_HOME=/cache/huggingface \
    SYNTHVLM_LMMS_EVAL_PYTHON=/opt/eval/bin/python
# libgomp1: PyTorch's CPU threads; libgl1/libglib2.0-0: image codecs some wheels link. The same uid
# as the code-location image: both write the shared Dagster storage volume (step logs).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 libgomp1 libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 dagster \
    && mkdir -p /cache "$DAGSTER_HOME/storage" \
    && chown -R dagster /cache "$DAGSTER_HOME"
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/vllm /opt/vllm
COPY --from=build /opt/eval /opt/eval
RUN python -c "import synthvlm_assets.definitions, torch, diffusers, open_clip, kenlm, dagster_docker, dagster_k8s" \
    && /opt/vllm/bin/python -c "import vllm" \
    && /opt/eval/bin/python -c "import lmms_eval, decord"

USER 1000
WORKDIR /opt/dagster/app
# The launchers give the command (`dagster api execute_run` / `execute_step`); this is for a shell.
CMD ["python", "-c", "import synthvlm_assets.definitions"]
