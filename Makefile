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

.PHONY: install install-serve system-deps serve image image-deps kserve-venv test test-fast test-long lint typecheck model bench clean

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

# Debian packages the tests need: `prometheus` (brings `promtool`) for tests/deploy, `chromium` for
# tests/service/test_docs.py (the API pages rendered offline; skipped without it). Installed only
# when missing (as root with apt-get, e.g. CI on a fresh Debian machine); otherwise a clear failure.
system-deps:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's prometheus and chromium packages (tests/deploy need prometheus and promtool; test_docs, chromium)"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus chromium; } \
	    || { echo "make system-deps: could not install Debian's 'prometheus' and 'chromium' packages, which the tests need" >&2; exit 1; }; \
	else \
	  echo "make system-deps: prometheus/promtool or chromium missing; install Debian's 'prometheus' and 'chromium' packages (apt-get install prometheus chromium, as root)" >&2; \
	  exit 1; \
	fi

# The CPU image with podman (deploy/image/build.sh): python:3.11-slim-bookworm when it can be pulled,
# else a stand-in base from Debian's packages (deploy/image/debian-base.sh; built once, its root file
# system cached in /var/cache/hydra-serve). make image IMAGE_TARGET=bundled for models/ inside.
IMAGE_TARGET ?= cpu
IMAGE_TAG ?=
image: image-deps
	deploy/image/build.sh $(IMAGE_TARGET) $(IMAGE_TAG)

image-deps:
	@if command -v podman >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's podman and debootstrap packages (make image)"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman debootstrap; } \
	    || { echo "make image-deps: could not install Debian's 'podman' and 'debootstrap'" >&2; exit 1; }; \
	else \
	  echo "make image-deps: install Debian's 'podman' and 'debootstrap' (apt-get install podman debootstrap, as root)" >&2; \
	  exit 1; \
	fi

# A python3.11 venv of its own for one pinned requirement that must never go into .venv: $(call
# side-venv,VENV,REQUIREMENT), as the recipe of VENV/.installed (rebuilt from scratch when missing).
PYTHON311 ?= python3.11
define side-venv
rm -rf $(1)
$(PYTHON311) -m venv $(1)
$(1)/bin/pip install -q "$(2)"
touch $(1)/.installed
endef

# KServe's Python SDK for tests/reliability/test_kserve_sdk.py, in its own venv: it pins numpy and others,
# so it never goes into .venv. About 30 s from PyPI here, so `make test` builds it.
KSERVE_VENV ?= .venv-kserve
$(KSERVE_VENV)/.installed:
	$(call side-venv,$(KSERVE_VENV),kserve==0.21.*)

kserve-venv: $(KSERVE_VENV)/.installed

# Bytecode written for the test run even where the environment sets PYTHONDONTWRITEBYTECODE (ours does):
# else every process compiles our modules again (four collecting workers, ~50 server starts,
# training runs) and pytest rewrites the test modules' asserts again in each worker. Into __pycache__
# beside the sources (ignored by git and .dockerignore), not a PYTHONPYCACHEPREFIX: with a prefix
# Python also ignores the site-packages' own .pyc files and compiles torch, numpy and the rest anew
# (measured: a fresh clone's first run 137 s against 113 s for the second).
TEST_ENV := env -u PYTHONDONTWRITEBYTECODE

# Four workers on two cores: a quarter of the suite's test time is tests waiting (timers, drains,
# scrapes), which the extra workers fill (the same tree here, 2026-12-04: -n 3 116-121 s, -n 4
# 114-117 s); serial tests still run alone (tests/conftest.py).
test: install system-deps image-deps kserve-venv
	$(PY) -m ruff check service training tests bench
	$(PY) -m mypy
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow" -n 4

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

# ---- Benchmarks (bench/, written to docs/BENCHMARKS.md) -----------------------------------------
# make bench [BENCH_PRESET=reduced|full|smoke]; each part alone: bench-quality (built-in datasets, then the
# tuning and confirmation suites), bench-suites (the suites alone), bench-ood (MI, density and the combined
# OOD flag on all of them; reuses their checkpoints), bench-external (the user's own ONNX teachers),
# bench-cost, bench-server, bench-grpc (§3c: gRPC vs V2 JSON vs V2 binary), bench-drift (part 5,
# alibi-detect in .venv-alibi), bench-shadow (part 6).
# Part 4 (GPU) is bench/gpu.sh, on a machine with an NVIDIA GPU.
BENCH_PRESET ?= reduced
TRITON_VENV ?= .venv-triton
.PHONY: bench-deps bench-grpc-deps bench-triton-venv alibi-venv bench-drift bench-shadow bench-quality bench-suites bench-ood bench-external bench-cost bench-server bench-grpc bench-report bench-gpu

# wrk (Debian) drives the load; py-spy profiles the server where a target is missed.
bench-deps: $(VENV)/.dev-installed
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk; }; } || \
	  { echo "make bench-deps: install Debian's 'wrk' package (apt-get install wrk, as root)" >&2; exit 1; }
	@$(VENV)/bin/py-spy --version >/dev/null 2>&1 || $(PY) -m pip install -q py-spy

# h2load (Debian's nghttp2-client) drives the gRPC load of `bench grpc`.
bench-grpc-deps: bench-deps
	@command -v h2load >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nghttp2-client; }; } || \
	  { echo "make bench-grpc-deps: install Debian's 'nghttp2-client' package (h2load)" >&2; exit 1; }

# Triton through PyTriton needs Debian's python3.11 (the pyenv Python lacks the libpython it loads).
$(TRITON_VENV)/bin/python:
	@[ -x /usr/bin/python3.11 ] || { echo "make bench-triton-venv: needs Debian's python3.11 and python3.11-venv" >&2; exit 1; }
	/usr/bin/python3.11 -m venv $(TRITON_VENV) || { rm -rf $(TRITON_VENV); \
	  echo "make bench-triton-venv: apt-get install python3.11-venv" >&2; exit 1; }
	$(TRITON_VENV)/bin/pip install -q nvidia-pytriton==0.7.0 onnxruntime numpy pydantic

bench-triton-venv: $(TRITON_VENV)/bin/python

# alibi-detect (the drift bench's anchor, CVMDriftOnline) pins numpy 1.x: its own venv, never .venv.
# bench/drift.py runs it as a subprocess on score streams saved as .npy files.
ALIBI_VENV ?= .venv-alibi
$(ALIBI_VENV)/.installed:
	$(call side-venv,$(ALIBI_VENV),alibi-detect==0.13.*)

alibi-venv: $(ALIBI_VENV)/.installed

bench-drift: install alibi-venv
	$(PY) -m bench drift --preset $(BENCH_PRESET)

bench-shadow: install bench-deps
	$(PY) -m bench shadow --preset $(BENCH_PRESET)

bench: install bench-deps bench-triton-venv
	$(PY) -m bench all --preset $(BENCH_PRESET)

bench-quality: install
	$(PY) -m bench quality --preset $(BENCH_PRESET)
	$(MAKE) bench-suites
	$(PY) -m bench ood --preset $(BENCH_PRESET)

# §1b: the first four suites, then the later ones (fresh3 … fresh6: each defined before the recipe it checks)
bench-suites: install
	$(PY) -m bench suites --preset $(BENCH_PRESET)
	$(PY) -m bench suites --preset $(BENCH_PRESET) --only fresh3,fresh4,fresh5,fresh6 --output suites_fresh3

bench-ood: install
	$(PY) -m bench ood --preset $(BENCH_PRESET)

bench-external: install
	$(PY) -m bench external --preset $(BENCH_PRESET)

bench-cost: install
	$(PY) -m bench cost --preset $(BENCH_PRESET)
	$(PY) -m bench cost --preset $(BENCH_PRESET) --threads 1 --output cost_1thread

bench-server: install bench-deps bench-triton-venv
	$(PY) -m bench server --preset $(BENCH_PRESET)

# §3c: gRPC vs V2 JSON vs V2 binary in one run, with the transports' ceilings and a py-spy profile.
bench-grpc: install bench-grpc-deps
	$(PY) -m bench grpc

bench-report: install
	$(PY) -m bench report

bench-gpu:
	bash bench/gpu.sh
