"""The image's install steps without a Docker engine: the build stage's files → wheel → a fresh venv
with the base dependencies only (no torch) → `hydra-serve` started outside the source tree → a
prediction, with metrics. The pip commands are the Dockerfile's (asserted below, so they cannot drift).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc

from tests.deploy.support import REPO_ROOT
from tests.deploy.test_packaging import DOCKERFILE, INSTALL_SCRIPT, stages
from tests.service.support import (
    Server,
    build_test_repository,
    calibration_inputs,
    free_port,
    stop,
    wait_ready,
)

pytestmark = pytest.mark.timeout(240)

WHEEL_STEP = "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ."
# deploy/image/install-service.sh's, which runtime-cpu runs without arguments (no extra pip flags)
INSTALL_STEP = 'pip install --no-cache-dir "$@" /wheels/hydra_serve-*.whl'


def _run(*args: str | Path, cwd: Path, timeout: float) -> str:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    }
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _copy_build_context(context: Path) -> None:
    """Exactly what the Dockerfile's build stage COPYs into /src (relative destinations: its WORKDIR)."""
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", stages(DOCKERFILE.read_text())["build"], re.MULTILINE):
        *sources, dest = line.split()
        if dest.startswith("/"):
            continue  # not the wheel's sources (the install script, copied to /wheels)
        for source in sources:
            origin = REPO_ROOT / source
            if origin.is_dir():
                shutil.copytree(
                    origin, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            else:
                shutil.copy2(origin, context / source)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv holding the wheel and its base dependencies; yields its bin/ directory."""
    text = DOCKERFILE.read_text()
    assert WHEEL_STEP in stages(text)["build"] and INSTALL_STEP in INSTALL_SCRIPT.read_text()
    assert re.search(r"^RUN sh /wheels/install-service\.sh$", stages(text)["runtime-cpu"], re.MULTILINE)
    work = tmp_path_factory.mktemp("image")
    context, wheels = work / "src", work / "wheels"
    context.mkdir()
    _copy_build_context(context)
    python = Path(getattr(sys, "_base_executable", sys.executable))  # the interpreter, not this venv
    _run(python, "-m", "venv", "--without-pip", work / "venv", cwd=work, timeout=60)
    bin_dir = work / "venv" / "bin"
    # the Dockerfile's two pip steps, with /wheels → wheels, for the venv's interpreter. Speed only:
    # the pip running these tests drives it (`pip --python`) instead of a copy installed into the
    # venv by ensurepip, pip's download cache stays on, and --no-compile leaves the .pyc files to the
    # first import. Measured at load 2.4: venv 3.4 s -> 0.1 s; install 11.0 s (9.1 s CPU) with the
    # venv's bundled pip 23.2 -> 5.4 s (3.9 s CPU) with pip 26.3; compiling was 2.6 s of an install
    _run(*venv_pip(bin_dir), *WHEEL_STEP.replace("/wheels", str(wheels)).split()[1:-1], context,
         cwd=work, timeout=180)  # fmt: skip
    (wheel,) = wheels.glob("hydra_serve-*.whl")
    _run(*venv_pip(bin_dir), "install", "-q", "--no-compile", wheel, cwd=work, timeout=300)
    yield bin_dir


def venv_pip(bin_dir: Path) -> list[str | Path]:
    """pip (this interpreter's) acting on the venv of `bin_dir`, which has no pip of its own."""
    return [sys.executable, "-m", "pip", "--python", bin_dir / "python"]


def test_installed_package_has_base_dependencies_only(installed: Path) -> None:
    freeze = _run(*venv_pip(installed), "freeze", cwd=installed, timeout=60).lower()
    names = {re.split(r"[=@ ]", line)[0].replace("_", "-") for line in freeze.splitlines()}
    assert "torch" not in names and "onnxruntime-gpu" not in names
    assert {"hydra-serve", "onnxruntime", "fastapi", "prometheus-client", "numpy"} <= names
    where = _run(
        installed / "python", "-c", "import service; print(service.__file__)", cwd=installed, timeout=60
    )
    assert str(installed.parent) in where and str(REPO_ROOT) not in where


def test_installed_server_answers_a_prediction(installed: Path, tmp_path: Path) -> None:
    repository = build_test_repository(tmp_path / "models")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_") and k != "PYTHONPATH"}
    # the image's configuration: HYDRA_* variables and the `hydra-serve` entrypoint, run elsewhere
    env.update(HYDRA_HOST="127.0.0.1", HYDRA_PORT=str(port), HYDRA_MODEL_REPOSITORY=str(repository))
    env["HYDRA_GRPC_PORT"] = str(free_port())  # not the default 8081: concurrent test runs share it
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [installed / "hydra-serve"], cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(Server(url, process, log), timeout=60)
        rows = calibration_inputs("classification", 3, seed=5)
        response = httpx.post(
            f"{url}/v2/models/clf/infer",
            json={
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(rows.shape),
                        "datatype": "FP32",
                        "data": rows.ravel().tolist(),
                    }
                ]
            },
            timeout=10,
        )
        assert response.status_code == 200, response.text
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        assert {"probabilities", "label", "ood_p_value", "ood_flag", "mutual_information"} <= set(outputs)
        probabilities = np.asarray(outputs["probabilities"]["data"], dtype=np.float64).reshape(3, -1)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        metrics = httpx.get(f"{url}/metrics", timeout=5, follow_redirects=True).text
        assert 'hydra_predictions_total{model="clf",version="1"} 3.0' in metrics
        # gRPC from the installed wheel (its checked-in protobuf module and grpcio deps), stock client
        grpc_client = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{env['HYDRA_GRPC_PORT']}")
        try:
            tensor = tritonclient.grpc.InferInput("input", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows.astype(np.float32))
            answer = grpc_client.infer("clf", [tensor]).as_numpy("probabilities")
            np.testing.assert_allclose(answer, probabilities, rtol=1e-5, atol=1e-6)
        finally:
            grpc_client.close()
        # the image's HEALTHCHECK command, run as Docker would (exec form, the image's environment)
        assert _healthcheck(installed, env).returncode == 0
    finally:
        assert stop(process) == 0, log.read_text()
    assert _healthcheck(installed, env).returncode != 0  # and it reports a stopped server unhealthy


def _healthcheck(bin_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    line = re.search(r"^\s*CMD (\[.*\])$", stages(DOCKERFILE.read_text())["runtime-cpu"], re.MULTILINE)
    assert line, "runtime-cpu has no exec-form HEALTHCHECK CMD"
    command = json.loads(line.group(1))
    assert command[0] == "python"
    return subprocess.run([str(bin_dir / "python"), *command[1:]], env=env, capture_output=True, timeout=10)
