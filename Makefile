# Two commands set everything up on a fresh machine:
#   make serve   build the embedded default models if missing, then serve them on :8000
#   make test    run the test suite
# Both create .venv on first use. CPU machines get the pinned CPU wheel of torch;
# GPU users: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make serve
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: serve test zoo venv clean-venv

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC) -c constraints.txt
	$(PY) -m pip install -e ".[training,dev]" -c constraints.txt
	touch $@

venv: $(VENV)/.installed

# The embedded zoo trains once, with progress bars: the image models and their ILF modules, then
# zoo-lm and its domain stacks. Entries still missing after that get untrained placeholders.
zoo: venv
	$(PY) -m training zoo images --if-missing
	$(PY) -m training ilf --model digits-dit --if-missing
	$(PY) -m training ilf --model digits-pixart --if-missing
	$(PY) -m training zoo chat --if-missing
	$(PY) -m training zoo placeholder --if-missing

serve: zoo
	$(PY) -m server --host $(HOST) --port $(PORT)

test: venv
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
