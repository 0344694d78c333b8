"""The real onnxruntime-gpu wheel on a machine without CUDA libraries: `cuda` refuses, `auto` says CPU.

onnxruntime-gpu replaces onnxruntime (both are the `onnxruntime` module), so it lives in its own
interpreter: HYDRA_ORT_GPU_PYTHON (default /tmp/ortgpu/bin/python, a venv with onnxruntime-gpu and the
service's other dependencies, see docs/SERVING.md "GPU"). Skipped when there is none.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.service.support import REPO_ROOT, write_model

GPU_PYTHON = Path(os.environ.get("HYDRA_ORT_GPU_PYTHON", "/tmp/ortgpu/bin/python"))

PROBE = """
import asyncio, json, sys
from pathlib import Path
from service.metrics import ServiceMetrics
from service.repository import ModelRepository, NoLoadableModel
from service.settings import Settings

async def load(preference):
    metrics = ServiceMetrics()
    settings = Settings(model_repository=Path(sys.argv[1]), execution_providers=preference)
    repo = ModelRepository(settings, metrics)
    try:
        await repo.start()
    except NoLoadableModel as exc:
        failures = metrics.registry.get_sample_value(
            "hydra_model_load_failures_total", {"model": "clf", "reason": "provider"})
        return {"error": str(exc), "failures": failures}
    provider = repo.get("clf").provider
    await repo.stop()
    return {"provider": provider}

print(json.dumps({p: asyncio.run(load(p)) for p in ("cuda", "auto")}))
"""


def _gpu_wheel_ready() -> str | None:
    if not GPU_PYTHON.is_file():
        return f"no onnxruntime-gpu interpreter at {GPU_PYTHON}"
    check = subprocess.run(
        [
            str(GPU_PYTHON),
            "-c",
            "import importlib.metadata as m, pydantic_settings, prometheus_client; "
            "print(m.version('onnxruntime-gpu'))",
        ],
        capture_output=True,
        text=True,
    )
    return None if check.returncode == 0 else f"{GPU_PYTHON} lacks onnxruntime-gpu or the service deps"


def test_gpu_wheel_without_cuda_libraries(tmp_path: Path) -> None:
    if (why := _gpu_wheel_ready()) is not None:
        pytest.skip(why)
    write_model(tmp_path, "clf", 1, "classification")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_")} | {"PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(
        [str(GPU_PYTHON), "-c", PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if "provider" in result["cuda"]:  # a machine where CUDA really works
        assert result["cuda"]["provider"] == result["auto"]["provider"] == "CUDAExecutionProvider"
        return
    error = result["cuda"]["error"]
    assert "session came up on CPUExecutionProvider although CUDA was requested" in error
    assert "CUDA/cuDNN libraries could not be loaded" in error or "driver" in error, error
    assert result["cuda"]["failures"] == 1.0
    assert result["auto"]["provider"] == "CPUExecutionProvider"
