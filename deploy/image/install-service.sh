#!/bin/sh
# The install steps the Dockerfile's two server stages (runtime-cpu, gpu) share: their bases differ
# (python slim, CUDA), so they cannot share a stage, but they run this one script. The build stage
# puts it in /wheels beside the wheel; each stage, as root, after installing the wheel's dependencies:
#
#   RUN sh /wheels/install-service.sh [PIP_FLAG...]
#
# PIP_FLAG...: passed to the wheel's `pip install`. The gpu stage passes --no-deps: its requirements
# swap onnxruntime for onnxruntime-gpu, and the wheel's own onnxruntime dependency must not come back.
set -eu

# The service's user, uid and gid 10001 (the USER of both stages; the Kubernetes manifests' runAsUser),
# and the model repository's mount point: created by root and left root's, so 10001 cannot write it.
groupadd --system --gid 10001 hydra
useradd --system --uid 10001 --gid hydra --home-dir /home/hydra --create-home --shell /usr/sbin/nologin hydra
mkdir -p /models

# The wheel (its dependencies are in the layer before), then /wheels goes, this script with it; the
# last check fails the build if torch sneaks in.
pip install --no-cache-dir "$@" /wheels/hydra_serve-*.whl
rm -rf /wheels
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
