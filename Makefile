# schane: `make demo` runs the main job, `make test` runs ruff, mypy and the test suite.
# Both create .venv on first use (and refresh it when pyproject.toml changes).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo ablation test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	# torchscale (BEiT-3) pins timm==0.6.13 in its metadata but runs with timm 1.x: install it without its pins.
	$(PY) -m pip install -q --no-deps --no-build-isolation torchscale==0.3.0 fairscale==0.4.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/schane demo

# CE, SupCon, SCHaNe with beta = 0 and SCHaNe (each + CE) on the demo's data, budget and seeds
ablation: $(STAMP)
	$(VENV)/bin/schane demo --ablation

# lint and types first (seconds), then the tests
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/loss_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
