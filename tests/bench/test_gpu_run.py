"""bench/gpu_run.py: the GPU host's run step, tried here on CPU (--allow-cpu), its CUDA refusal, and §4."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from bench.gpu_run import (
    BATCHES,
    CPU_ALLOWED,
    nvidia_library_dirs,
    pip_install_command,
    wheelhouse_dirs,
)
from bench.report import GPU_NOT_RUN, gpu_section

REPO = Path(__file__).resolve().parents[2]
# The run fits its cells to what is left of the budget, so it must finish within it even while other
# tests take the CPU: not `serial` (measured with four busy loops beside it: 9.9 s of this 12 s budget).
BUDGET_S = 12
NO_CUDA = "CUDAExecutionProvider" not in ort.get_available_providers()


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "bench.gpu_run", "--out", str(out), "--budget-s", str(BUDGET_S), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=BUDGET_S + 30)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu-out")
    done = _run(out, "--allow-cpu")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_allow_cpu_run_writes_labelled_results(cpu_run: Path) -> None:
    files = sorted(p.name for p in cpu_run.iterdir())
    assert len(files) <= 8 and all((cpu_run / f).is_file() for f in files)
    assert {"gpu_env.json", "gpu_cost.json", "gpu_server.json", "gpu_run.log"} <= set(files)
    data = {f: json.loads((cpu_run / f).read_text()) for f in files if f.endswith(".json")}
    env, cost, server = data["gpu_env.json"], data["gpu_cost.json"], data["gpu_server.json"]
    assert env["elapsed_s"] <= BUDGET_S
    if NO_CUDA:
        assert env["label"] == cost["provider"] == server["provider"] == CPU_ALLOWED
        assert env["cuda"] is False and "CUDA is not in use" in env["reason"]
        assert server["configs"]["cuda"] == {"skipped": "CUDA is not in use (CPU allowed)"}
    assert [c["batch"] for c in cost["cells"]] == list(BATCHES)
    for cell in cost["cells"]:
        for graph in ("hydra", "ensemble"):
            assert cell["timings"][graph]["median_ms"] > 0 and cell["timings"][graph]["runs"] >= 1
    cpu = server["configs"]["cpu"]
    assert cpu["provider_reported"] == "CPUExecutionProvider"
    assert [c["concurrency"] for c in cpu["cells"]] == [1, 8, 32]
    assert all(c["requests"] > 0 and c["errors"] == 0 for c in cpu["cells"])
    assert all(c["requests"] > 0 for c in server["ceiling"]["cells"])


@pytest.mark.skipif(not NO_CUDA, reason="this onnxruntime has CUDA: the refusal cannot be seen here")
def test_without_allow_cpu_a_cpu_onnxruntime_stops_with_the_cuda_reason(tmp_path: Path) -> None:
    done = _run(tmp_path)
    assert done.returncode == 2
    assert "CUDA is not in use" in done.stderr and "no CUDA provider library" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_env.json", "gpu_run.log"]
    assert json.loads((tmp_path / "gpu_env.json").read_text())["cuda"] is False


def test_module_imports_only_the_standard_library() -> None:
    code = "import sys, bench.gpu_run; sys.exit(bool({'numpy', 'onnxruntime'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_report_renders_the_gpu_section_from_the_run(cpu_run: Path, tmp_path: Path) -> None:
    text = gpu_section(cpu_run)
    assert text.startswith("## 4. GPU") and GPU_NOT_RUN not in text
    for batch in BATCHES:
        assert f"\n| {batch} | " in text
    assert "| cpu | 32 |" in text and "client ceiling" in text
    if NO_CUDA:
        assert "**CPU (allowed)**" in text and "CUDA is not in use (CPU allowed)" in text
    assert gpu_section(tmp_path).startswith(f"## 4. GPU\n\n{GPU_NOT_RUN}")
    assert "bench.offline_prep" in gpu_section(tmp_path)


def test_report_says_when_the_server_was_not_measured(cpu_run: Path, tmp_path: Path) -> None:
    for name in ("gpu_env.json", "gpu_cost.json"):
        (tmp_path / name).write_text((cpu_run / name).read_text())
    skipped = {
        "provider": "CUDA",
        "skipped": "the service's dependencies are not importable here: No module named 'fastapi'",
    }
    (tmp_path / "gpu_server.json").write_text(json.dumps(skipped))
    assert "**Not measured**: the service's dependencies are not importable here" in gpu_section(tmp_path)


def test_install_helpers(tmp_path: Path) -> None:
    (tmp_path / "wheelhouse").mkdir()
    assert wheelhouse_dirs(tmp_path) == (None, tmp_path / "wheelhouse")
    (tmp_path / "parts.json").write_text(json.dumps({"wheelhouse": "wheelhouse", "files": []}))
    assert wheelhouse_dirs(tmp_path) == (tmp_path, tmp_path / "wheelhouse")
    assert wheelhouse_dirs(tmp_path / "wheelhouse") == (tmp_path, tmp_path / "wheelhouse")
    cmd = pip_install_command(tmp_path / "wheelhouse", tmp_path / "site", ["onnxruntime-gpu"])
    assert "--no-index" in cmd and cmd[cmd.index("--target") + 1] == str(tmp_path / "site")
    lib = tmp_path / "site-packages" / "nvidia" / "cudnn" / "lib"
    lib.mkdir(parents=True)
    assert nvidia_library_dirs([str(tmp_path / "site-packages"), str(tmp_path)]) == [str(lib)]
