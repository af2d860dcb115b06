# capyft: `make help` lists the targets. Every target sets itself up (virtualenv, CPU torch, project, offline assets).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch, pinned: unpinned, pip picks a CUDA build with ~15 nvidia wheels (several GB).
# On a machine with a GPU, install the torch you want into the venv first; a torch already there is kept.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup assets test test-all lint format demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed  ## create the virtualenv and install torch (CPU), capyft and the test extras

assets: setup  ## fetch the offline assets: SmolLM2-135M-Instruct (as a HF folder), MiniLM, the Llama-3 tokenizer
	$(PY) -m capyft.assets all

test: assets  ## run the test suite (offline, CPU; the slow real-model tests included)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-fast: assets  ## the suite without the slow-marked tests
	$(PY) -m pytest -q -x -m "not slow" $(PYTEST_ARGS)

lint: setup  ## ruff lint and format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup  ## ruff format and autofix
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

demo: assets  ## fine-tune SmolLM2-135M-Instruct on the bundled Capybara rows, then score base vs fine-tuned
	bash scripts/demo.sh

clean:  ## remove runs and caches (keeps the virtualenv)
	rm -rf runs lightning_logs .pytest_cache .ruff_cache
