PY ?= python

.PHONY: install test quickstart lint

# torch 2.13.0 (CPU) is pinned so pip takes the local CPU wheel instead of a multi-GB CUDA build.
install:
	$(PY) -m pip install -q torch==2.13.0 -e '.[demo,dev]'

test: install
	$(PY) -m pytest -q

quickstart: install
	bidirlm run configs/recipes/quickstart.yaml

lint:
	ruff check bidirlm_pl moe callbacks tests benchmarks
