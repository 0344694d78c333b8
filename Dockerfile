# hydra-serve images. No torch in any of them: only the base dependencies of pyproject.toml.
#
# Targets:
#   cpu      (default, the last stage) slim CPU image without models; mount a model repository
#            read-only at /models:  docker run -v "$PWD/models:/models:ro" -p 8000:8000 -p 8081:8081 hydra-serve:0.1.0
#   bundled  cpu + this repository's models/ copied to /models (what docker-compose.yml runs)
#   gpu      CUDA runtime base with onnxruntime-gpu instead of onnxruntime (run with --gpus all)
#
#   docker build -t hydra-serve:0.1.0 .
#   docker build --target gpu -t hydra-serve:0.1.0-gpu .
#
# Configuration is HYDRA_* environment variables (service/settings.py). The install steps below are
# exercised without a Docker engine by tests/deploy/test_image_install.py; hadolint lints this file.
# The steps both server stages share (user, /models, the wheel, the no-torch check) are one script,
# deploy/image/install-service.sh.

ARG PYTHON_VERSION=3.11
# The base of the build and CPU stages. Where no registry can be reached, `make image`
# (deploy/image/build.sh) sets it to a stand-in made from Debian's packages by
# deploy/image/debian-base.sh (bookworm, python3.11, a venv at /opt/venv first on PATH).
ARG PYTHON_IMAGE=python:${PYTHON_VERSION}-slim-bookworm
# The CUDA major of this base must be the one the pinned onnxruntime-gpu (pyproject.toml, `gpu` extra)
# is built for (table in service/gpu.py; tests/deploy/test_gpu_image.py checks): with another one the
# wheel cannot load its CUDA provider and sessions come up on CPU. CUDA 13 needs host driver >= 580.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- build: the wheel, and the requirement lists of the CPU and GPU variants -----------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
# The requirement lists come from pyproject.toml alone, before the code is copied: the runtime stages
# install them in a layer of their own, which stays cached while only the code changes. The GPU
# image installs the base dependencies with onnxruntime swapped for the `gpu` extra (both provide
# the `onnxruntime` module, so they must never be installed side by side).
RUN mkdir /requirements \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
cpu = p['dependencies']; gpu = [d for d in cpu if not d.startswith('onnxruntime')] + p['optional-dependencies']['gpu']; \
open('/requirements/requirements-cpu.txt', 'w').write('\n'.join(cpu) + '\n'); \
open('/requirements/requirements-gpu.txt', 'w').write('\n'.join(gpu) + '\n')"
COPY service/ service/
COPY training/ training/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .
# Beside the wheel, so the runtime stages get it with the wheel and drop it with /wheels.
COPY deploy/image/install-service.sh /wheels/

# ---- runtime-cpu: slim image, base dependencies only --------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HYDRA_HOST=0.0.0.0 \
    HYDRA_PORT=8000 \
    HYDRA_GRPC_PORT=8081 \
    HYDRA_MODEL_REPOSITORY=/models
# The base dependencies first (cached until pyproject.toml changes), then the user, /models and the
# wheel, which pulls exactly those; the script fails the build if torch sneaks in.
COPY --from=build /requirements/requirements-cpu.txt /requirements/
RUN pip install --no-cache-dir -r /requirements/requirements-cpu.txt
COPY --from=build /wheels/ /wheels/
RUN sh /wheels/install-service.sh
USER 10001:10001
WORKDIR /home/hydra
# 8000 HTTP (KServe V1, Open Inference V2, /metrics); 8081 Open Inference Protocol over gRPC
EXPOSE 8000 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HYDRA_PORT', '8000') + '/v2/health/ready', timeout=2)"]
ENTRYPOINT ["hydra-serve"]

# ---- bundled: the CPU image with models/ inside (read-only: owned by root, run as 10001) -------------
FROM runtime-cpu AS bundled
COPY models/ /models/

# ---- gpu: CUDA + cuDNN runtime, onnxruntime-gpu -------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HYDRA_HOST=0.0.0.0 \
    HYDRA_PORT=8000 \
    HYDRA_GRPC_PORT=8081 \
    HYDRA_MODEL_REPOSITORY=/models \
    HYDRA_EXECUTION_PROVIDERS=cuda
# Ubuntu's python3 (3.12 on 24.04) in a venv: the system interpreter is externally managed (PEP 668).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
COPY --from=build /requirements/requirements-gpu.txt /requirements/
RUN pip install --no-cache-dir -r /requirements/requirements-gpu.txt
COPY --from=build /wheels/ /wheels/
# --no-deps: the requirements above carry onnxruntime-gpu; the wheel's onnxruntime must not come in
RUN sh /wheels/install-service.sh --no-deps
USER 10001:10001
WORKDIR /home/hydra
# 8000 HTTP (KServe V1, Open Inference V2, /metrics); 8081 Open Inference Protocol over gRPC
EXPOSE 8000 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HYDRA_PORT', '8000') + '/v2/health/ready', timeout=2)"]
ENTRYPOINT ["hydra-serve"]

# ---- cpu: the default target (last stage) -------------------------------------------------------------
FROM runtime-cpu AS cpu
