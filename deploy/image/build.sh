#!/usr/bin/env bash
# Build a hydra-serve image with podman (what `make image` runs; tests/deploy/test_image_build.py too).
#
#   deploy/image/build.sh [TARGET [TAG]]      # default: cpu hydra-serve:<version>
#
# The base is the Dockerfile's default, python:3.11-slim-bookworm, when it is in podman's store or
# can be pulled. Otherwise (no registry: an air-gapped machine, this build machine) the stand-in that
# deploy/image/debian-base.sh makes from Debian's packages is built (once, cached) and selected with
# the Dockerfile's PYTHON_IMAGE build argument. PYTHON_IMAGE=... in the environment forces a base.
#
# `--isolation chroot`: podman's default runtime cannot start containers here (cgroups, rlimits); the
# host's CA bundle is mounted for pip (a TLS-intercepting proxy's CA lives only there); `--format
# docker` keeps the HEALTHCHECK (the OCI format has none).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml" | head -1)
TARGET=${1:-cpu}
TAG=${2:-hydra-serve:$version$([ "$TARGET" = cpu ] || echo "-$TARGET")}
UPSTREAM=python:3.11-slim-bookworm
STANDIN=localhost/hydra-serve-base:bookworm-py3.11

command -v podman >/dev/null || { echo "$0: needs podman (as root: apt-get install -y podman debootstrap)" >&2; exit 1; }

base=${PYTHON_IMAGE:-}
if [ -z "$base" ]; then
  if podman image exists "docker.io/library/$UPSTREAM" || podman pull -q "docker.io/library/$UPSTREAM" >/dev/null 2>&1; then
    base=docker.io/library/$UPSTREAM
  else
    echo "image: $UPSTREAM cannot be pulled; using the Debian stand-in $STANDIN (deploy/image/debian-base.sh)"
    "$here/debian-base.sh" "$STANDIN"
    base=$STANDIN
  fi
fi

certs=()
[ -d /etc/ssl/certs ] && certs=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
echo "image: podman build --target $TARGET -t $TAG (base $base)"
podman build --isolation chroot --format docker "${certs[@]}" \
  --build-arg "PYTHON_IMAGE=$base" \
  --target "$TARGET" -t "$TAG" -f "$repo/Dockerfile" "$repo"
