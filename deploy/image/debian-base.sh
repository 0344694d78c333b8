#!/usr/bin/env bash
# A stand-in for python:3.11-slim-bookworm made from Debian's own packages, for machines that cannot
# pull from a registry: debootstrap (minbase) bookworm + python3.11 + python3.11-venv + ca-certificates,
# a venv at /opt/venv first on PATH (so `python` and `pip` mean what they mean in the upstream image,
# and pip installs into a venv instead of Debian's externally managed system Python), imported with
# `podman import`.
#
#   deploy/image/debian-base.sh [IMAGE]        # default localhost/hydra-serve-base:bookworm-py3.11
#
# Built once: an existing image is reused, and the root file system is kept as a tarball in
# $HYDRA_IMAGE_CACHE (default /var/cache/hydra-serve, outside any checkout) so a fresh clone or a
# wiped podman store re-imports it in seconds instead of running debootstrap again (~1 min).
# Needs root, debootstrap and podman. DEBIAN_MIRROR overrides the mirror.
set -euo pipefail

IMAGE=${1:-localhost/hydra-serve-base:bookworm-py3.11}
CACHE_DIR=${HYDRA_IMAGE_CACHE:-/var/cache/hydra-serve}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# python3-distutils: python3.11-venv needs it, and debootstrap's resolver does not pick it itself
PACKAGES=python3.11,python3.11-venv,python3-distutils,ca-certificates
# bump when the recipe below changes, so a stale cached tarball is not reused
RECIPE=1
TARBALL=$CACHE_DIR/debian-base-$SUITE-py3.11-r$RECIPE.tar

if podman image exists "$IMAGE"; then
  exit 0
fi
for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "$0: needs $tool (as root: apt-get install -y podman debootstrap)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "$0: debootstrap needs root" >&2; exit 1; }

if [ ! -s "$TARBALL" ]; then
  mkdir -p "$CACHE_DIR"
  root=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT  # the log ($root.log) stays on failure
  echo "debian-base: debootstrap $SUITE ($PACKAGES) into $root"
  log=$root.log
  if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$log" 2>&1; then
    cat "$root/debootstrap/debootstrap.log" >>"$log" 2>/dev/null || true
    grep -E -i -A3 'error|depends on' "$log" | tail -30 >&2
    echo "$0: debootstrap failed (log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
  chroot "$root" /usr/bin/python3.11 -m venv /opt/venv
  chroot "$root" /opt/venv/bin/python -c "import ssl, sqlite3, venv, ensurepip, tomllib"
  # what the upstream slim image also leaves out: package caches, indexes, docs
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
  tar --numeric-owner -C "$root" -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
fi

echo "debian-base: podman import $TARBALL as $IMAGE"
podman import --quiet \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "stand-in for python:3.11-slim-bookworm (deploy/image/debian-base.sh r$RECIPE)" \
  "$TARBALL" "$IMAGE" >/dev/null
