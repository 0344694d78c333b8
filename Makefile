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

.PHONY: install install-serve system-deps serve test test-fast test-long lint typecheck model bench clean

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

# Debian packages the tests need: `prometheus` (brings `promtool`) for tests/deploy. Installed only
# when missing (as root with apt-get, e.g. CI on a fresh Debian machine); otherwise a clear failure.
system-deps:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's prometheus package (tests/deploy need prometheus and promtool)"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; } \
	    || { echo "make system-deps: could not install Debian's 'prometheus' package, which tests/deploy need" >&2; exit 1; }; \
	else \
	  echo "make system-deps: prometheus/promtool missing; install Debian's 'prometheus' package (apt-get install prometheus, as root)" >&2; \
	  exit 1; \
	fi

test: install system-deps
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
