# Evaluation (llava_benchmark_eval): the worker image plus lmms-eval in /opt/eval, layered over /opt/venv
# (its own packages only; torch and transformers are /opt/venv's): lmms-eval's antlr4 pin breaks Dagster's
# selection parser, so it never shares /opt/venv. Runs of llava_benchmark_job use it when the stack runs
# with SYNTHVLM_WORKER_IMAGE=synthvlm-eval:0.1.0 (docs/deployment.md).
#   docker build -f docker/eval.Dockerfile --build-arg WORKER_IMAGE=synthvlm-worker:0.1.0 \
#     -t synthvlm-eval:0.1.0 .
ARG WORKER_IMAGE=synthvlm-worker:0.1.0
FROM ${WORKER_IMAGE}

ENV SYNTHVLM_LMMS_EVAL_PYTHON=/opt/eval/bin/python
USER 0
WORKDIR /opt/synthvlm
# pip's settings for the build only (a mirror, or docker/build.sh's local wheelhouse); unset: PyPI.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_TRUSTED_HOST
COPY scripts/setup_eval_env.sh ./scripts/
RUN BASE_VENV=/opt/venv EVAL_VENV=/opt/eval bash scripts/setup_eval_env.sh \
    && /opt/eval/bin/python -c "import lmms_eval, decord"
USER 1000
WORKDIR /opt/dagster/app
