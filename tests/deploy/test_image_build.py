"""The CPU image really built and started: `deploy/image/build.sh` (what `make image` runs) builds the
Dockerfile's `cpu` target with podman, on the Debian stand-in base where python:3.11-slim-bookworm
cannot be pulled. Containers cannot be *run* on the build machines (crun fails on cgroups and
rlimits), so the image's file system is mounted (`podman create` + `podman mount`, a writable
container layer) and its entry point started under `chroot` as uid 10001, with the image's
environment and working directory, /proc and /dev bind-mounted in a private mount namespace (gone
with the process), and this repository's models/ copied to /models. Then health, a V1 predict, a V2
infer and the image's HEALTHCHECK command, against it on loopback.

Needs root, podman and debootstrap (as root: apt-get install -y podman debootstrap); skipped otherwise.
On the 2-core build machine: ~3 s warm (base and layers cached), ~8 s after a code change (the
dependency layers stay cached: only the wheel is rebuilt), ~70 s cold (debootstrap, pip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.deploy.support import REPO_ROOT
from tests.service.support import Server, free_port, stop, wait_ready

pytestmark = pytest.mark.timeout(480)

BUILD = REPO_ROOT / "deploy" / "image" / "build.sh"
TAG = "localhost/hydra-serve:test-image-build"  # a fixed tag: its layers stay cached between runs
UID = 10001
MODEL = "digits"  # models/digits/1, copied into the image's /models


def _missing_requirement() -> str | None:
    if os.geteuid() != 0:
        return "needs root (podman's rootful store, chroot, mount)"
    for tool in ("podman", "debootstrap", "chroot", "unshare"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (as root: apt-get install -y podman debootstrap)"
    return None


def _run(*args: str | Path, timeout: float = 60) -> str:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@dataclass(frozen=True)
class Mounted:
    root: Path  # the container's file system, writable (its own layer)
    config: dict[str, Any]  # the image's Config: Env, Entrypoint, WorkingDir, User
    healthcheck: list[str]  # the HEALTHCHECK's exec form: ["CMD", program, args...]


@pytest.fixture(scope="module")
def image() -> str:
    reason = _missing_requirement()
    if reason is not None:
        pytest.skip(f"image build: {reason}")
    _run(BUILD, "cpu", TAG, timeout=420)
    return TAG


@pytest.fixture(scope="module")
def mounted(image: str) -> Iterator[Mounted]:
    (inspected,) = json.loads(_run("podman", "image", "inspect", image))
    # no healthcheck timer: podman would try to register one with systemd, absent here
    container = _run("podman", "create", "--no-healthcheck", image).strip()
    try:
        root = Path(_run("podman", "mount", container).strip())
        try:
            # podman's inspect lists the (docker-format) HEALTHCHECK beside Config, not in it
            yield Mounted(root, inspected["Config"], inspected["Healthcheck"]["Test"])
        finally:
            _run("podman", "unmount", container)
    finally:
        _run("podman", "rm", "--force", container)


def test_image_has_the_service_and_no_torch(mounted: Mounted) -> None:
    site = sorted(mounted.root.glob("**/site-packages"))
    assert site, "no site-packages in the image"
    found = {entry.name.lower() for directory in site for entry in directory.iterdir()}
    assert not {name for name in found if name.startswith(("torch", "nvidia", "onnxruntime_gpu"))}, found
    assert {"service", "onnxruntime", "fastapi"} <= found
    # the image's own interpreter agrees (its config's PATH, not this machine's)
    env = _image_env(mounted.config)
    check = "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
    subprocess.run(["chroot", mounted.root, "python", "-c", check], env=env, check=True, timeout=60)


def test_image_runs_as_10001_with_the_hydra_serve_entrypoint(mounted: Mounted) -> None:
    assert mounted.config["User"] == f"{UID}:{UID}"
    assert mounted.config["Entrypoint"] == ["hydra-serve"]
    assert mounted.healthcheck[:2] == ["CMD", "python"]
    passwd = (mounted.root / "etc" / "passwd").read_text()
    assert any(line.split(":")[2] == str(UID) for line in passwd.splitlines())


def test_started_image_answers_health_v1_and_v2_as_10001(mounted: Mounted, tmp_path: Path) -> None:
    models = mounted.root / "models"
    shutil.copytree(REPO_ROOT / "models", models, dirs_exist_ok=True)  # root-owned, as `bundled` does
    port = free_port()
    env = _image_env(mounted.config) | {"HYDRA_HOST": "127.0.0.1", "HYDRA_PORT": str(port)}
    env["HYDRA_GRPC_PORT"] = str(free_port())  # not the default 8081: concurrent test runs share it
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        process = _start_in_chroot(mounted, mounted.config["Entrypoint"], env, sink)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(Server(url, process, log), timeout=90)
        assert _uids(process.pid) == {UID}, "the server does not run as uid 10001"
        rows = np.random.default_rng(3).uniform(0, 16, (2, 64)).round()  # (batch, 8x8 pixels)
        v1 = httpx.post(f"{url}/v1/models/{MODEL}:predict", json={"instances": rows.tolist()}, timeout=30)
        assert v1.status_code == 200, v1.text
        assert len(v1.json()["predictions"]) == 2
        v2 = httpx.post(
            f"{url}/v2/models/{MODEL}/infer",
            json={
                "inputs": [
                    {"name": "input", "shape": [2, 64], "datatype": "FP32", "data": rows.ravel().tolist()}
                ]
            },
            timeout=30,
        )
        assert v2.status_code == 200, v2.text
        outputs = {o["name"]: o for o in v2.json()["outputs"]}
        probabilities = np.asarray(outputs["probabilities"]["data"], dtype=np.float64).reshape(2, -1)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        # the image's HEALTHCHECK command, in the image, as the image's user
        with (tmp_path / "healthcheck.log").open("wb") as sink:
            check = _start_in_chroot(mounted, mounted.healthcheck[1:], env, sink)
        assert check.wait(timeout=30) == 0, (tmp_path / "healthcheck.log").read_text()
    finally:
        assert stop(process) == 0, log.read_text()


def _image_env(config: dict[str, Any]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config["Env"])


def _start_in_chroot(
    mounted: Mounted, command: list[str], env: dict[str, str], sink: Any
) -> subprocess.Popen[bytes]:
    """`command` in the image as uid:gid 10001, in its working directory. `unshare` and `chroot`
    exec (no fork): the returned process is the command itself, so SIGTERM reaches it."""
    script = (
        'root=$1; shift; mount -t proc proc "$root/proc" && mount --bind /dev "$root/dev" && '
        f'exec chroot --userspec={UID}:{UID} --groups= "$root" env --chdir="$WORKDIR" "$@"'
    )
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh",
         str(mounted.root), *command],
        env=env | {"WORKDIR": mounted.config["WorkingDir"]},
        stdout=sink,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def _uids(pid: int) -> set[int]:
    """Real, effective, saved and file-system uid of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return {int(field) for field in line.split()[1:]}
    raise AssertionError(f"no Uid line for pid {pid}")
