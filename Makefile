# Two commands matter on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
OUT    ?= $(CURDIR)/outputs/demo
PYTEST_ARGS ?=
export DS_ACCELERATOR ?= cpu

.PHONY: install demo test test-fast ray-up ray-down lock clean

# Installs in the one order that works: torch (CPU build here) before deepspeed,
# which imports torch in its setup and so must build without isolation.
$(VENV)/.installed: pyproject.toml cluster/constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -c cluster/constraints.txt setuptools
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -c cluster/constraints.txt --no-build-isolation -e .
	$(PY) -c "import torch, ray, deepspeed, bpy, mlflow, webdataset, av, trimesh, einops; print('installed: torch', torch.__version__, '| ray', ray.__version__, '| bpy', bpy.app.version_string)"
	touch $@

install: $(VENV)/.installed

# Starts a loopback Ray head, runs the pipeline through `ray job submit`, prints where things are.
# Quiet: one status line per stage, full logs in $(OUT)/logs/; `make demo VERBOSE=1` streams everything.
demo: install
	$(PY) -m pipelines.demo --output $(OUT)$(if $(filter 1 yes true,$(VERBOSE)), --verbose)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

ray-up: install
	source $(VENV)/bin/activate && cluster/start_local.sh

ray-down:
	source $(VENV)/bin/activate && cluster/stop_local.sh

# Re-pin after changing dependencies in pyproject.toml.
lock: install
	{ head -2 cluster/constraints.txt; echo "torch==2.13.0"; $(PIP) freeze --exclude-editable | grep -v -i -E '^(torch)=='; } > cluster/constraints.txt.new
	mv cluster/constraints.txt.new cluster/constraints.txt

clean:
	rm -rf outputs .pytest_cache
