# Every target runs inside the project's own virtual environment (.venv, git-ignored), created from
# pyproject.toml when missing, so a fresh clone proves that every dependency is declared.
# torch 2.13.0 (CPU) is pinned so pip takes the local CPU wheel instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install test quickstart lint

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 -e '.[demo,dev,tasks,serving]'
	touch $@

install: $(VENV)/.installed

test: lint
	$(PY) -m pytest -q

quickstart: install
	$(VENV)/bin/bidirlm run configs/recipes/quickstart.yaml

# the import layers of pyproject.toml (docs/architecture.md), then ruff
lint: install
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check bidirlm_pl moe callbacks tests benchmarks
