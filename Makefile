# One venv for everything on a dev machine. The service image installs only the base
# dependencies (see Dockerfile); torch is for training and tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build on our machines; GPU users: make install TORCH_SPEC="torch==2.13.0" PIP_EXTRA="--index-url ..."
TORCH_SPEC ?= torch==2.13.0
HOST ?= 0.0.0.0
PORT ?= 8000
MODELS ?= models

.PHONY: install install-serve serve test test-fast test-long lint typecheck model bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Service only: what the container ships (no torch).
$(VENV)/.serve-installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

# Training + dev tools. torch is installed first, pinned, so the extras never pull a CUDA build.
$(VENV)/.dev-installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[train,dev]" "$(TORCH_SPEC)"
	touch $(VENV)/.serve-installed $@

install: $(VENV)/.dev-installed

install-serve: $(VENV)/.serve-installed

serve: $(VENV)/.serve-installed
	$(PY) -m service --host $(HOST) --port $(PORT) --model-repository $(MODELS)

test: install
	$(PY) -m ruff check service training tests bench
	$(PY) -m mypy
	$(PY) -m pytest -q -m "not slow"

test-long: install
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m ruff check service training tests bench

typecheck: install
	$(PY) -m mypy

# Rebuild the shipped default model (deterministic for the seed).
model: install
	$(PY) -m training run --dataset digits --out models/digits/1 --seed 0

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
