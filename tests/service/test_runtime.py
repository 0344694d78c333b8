"""OnnxModelRuntime: provider choice, and graphs that disagree with their manifest are refused."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.errors import ModelLoadError
from service.manifest import ModelManifest
from service.metrics import ServiceMetrics
from service.repository import ModelRepository, NoLoadableModel
from service.runtime import (
    CPU,
    CUDA,
    OnnxModelRuntime,
    check_provider,
    choose_providers,
    cuda_provider_options,
    warmup_batch_sizes,
)
from service.settings import Settings
from tests.service.support import CLF_FEATURES, write_model


def test_provider_choice_follows_what_onnxruntime_offers() -> None:
    assert choose_providers("cpu") == [CPU]
    if CUDA in ort.get_available_providers():
        assert choose_providers("auto") == choose_providers("cuda") == [CUDA, CPU]
    else:
        assert choose_providers("auto") == [CPU]
        with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
            choose_providers("cuda")


def test_runs_and_reports_its_provider(tmp_path: Path) -> None:
    directory = write_model(tmp_path, "clf", 1, "classification")
    runtime = OnnxModelRuntime(directory / "model.onnx", ModelManifest.load(directory), Settings())
    runtime.warm_up((1, 5))
    out = runtime.run(np.zeros((3, CLF_FEATURES), dtype=np.float32))
    assert out["log_probs"].shape == (3, 4, 3)
    assert runtime.provider in ort.get_available_providers()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input": {"name": "features", "shape": [-1, CLF_FEATURES]}}, "no input 'features'"),
        ({"input": {"name": "input", "shape": [-1, CLF_FEATURES + 1]}}, "graph input shape"),
        ({"outputs": {"log_probs": "logits"}}, "lacks outputs ['logits']"),
    ],
)
def test_graph_manifest_mismatch_is_refused(tmp_path: Path, change: dict[str, object], message: str) -> None:
    directory = write_model(tmp_path, "clf", 1, "classification")
    manifest = ModelManifest.model_validate(ModelManifest.load(directory).model_dump() | change)
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        OnnxModelRuntime(directory / "model.onnx", manifest, Settings())


def test_heads_mismatch_is_caught_by_the_warm_up(tmp_path: Path) -> None:
    directory = write_model(tmp_path, "clf", 1, "classification")
    manifest = ModelManifest.model_validate(ModelManifest.load(directory).model_dump() | {"heads": 7})
    runtime = OnnxModelRuntime(directory / "model.onnx", manifest, Settings())
    with pytest.raises(ModelLoadError, match=r"\(batch, heads, classes\) = \(1, 7, 3\)"):
        runtime.warm_up()


def test_unreadable_file_is_a_load_error(tmp_path: Path) -> None:
    directory = write_model(tmp_path, "clf", 1, "classification")
    onnx_path = directory / "model.onnx"
    onnx_path.write_bytes(onnx.load(onnx_path).SerializeToString()[:100])
    with pytest.raises(ModelLoadError, match=r"cannot load model\.onnx"):
        OnnxModelRuntime(onnx_path, ModelManifest.load(directory), Settings())


# ---- CUDA requested: the session's own provider decides --------------------------------------------
# The CPU wheel plays onnxruntime-gpu without its CUDA libraries: that wheel lists CUDA as available
# and builds the session on CPU, which is what a CPU wheel does when asked for CUDA it lacks.


@pytest.fixture
def ort_claims_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime really offers CUDA")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])


def test_cuda_options_follow_the_settings() -> None:
    assert cuda_provider_options(Settings()) == {
        "device_id": "0",
        "cudnn_conv_algo_search": "HEURISTIC",
        "use_tf32": "0",
    }
    options = cuda_provider_options(
        Settings(cuda_device_id=1, cuda_use_tf32=True, cuda_conv_algo_search="EXHAUSTIVE")
    )
    assert options == {"device_id": "1", "cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": "1"}
    assert choose_providers("cuda", [CUDA, CPU], options) == [(CUDA, options), CPU]
    assert choose_providers("auto", [CUDA, CPU], options) == [(CUDA, options), CPU]
    assert choose_providers("auto", [CPU], options) == [CPU]
    assert choose_providers("cpu", [CUDA, CPU], options) == [CPU]


def test_cuda_session_that_came_up_on_cpu_is_refused(tmp_path: Path) -> None:
    directory = write_model(tmp_path, "clf", 1, "classification")
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=[CPU])
    requested = choose_providers("cuda", [CUDA, CPU], cuda_provider_options(Settings()))
    with pytest.raises(ModelLoadError) as caught:
        check_provider("cuda", requested, session.get_providers())
    message = caught.value.message
    assert "session came up on CPUExecutionProvider although CUDA was requested" in message
    # what is missing: here the CPU wheel's missing provider library (the GPU wheel: a CUDA library)
    assert "onnxruntime-gpu" in message or "could not be loaded" in message
    assert check_provider("cpu", [CPU], session.get_providers()) == CPU


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cuda_runtime_refuses_and_auto_falls_back_with_a_warning(
    tmp_path: Path, ort_claims_cuda: None, caplog: pytest.LogCaptureFixture
) -> None:
    directory = write_model(tmp_path, "clf", 1, "classification")
    manifest = ModelManifest.load(directory)
    with pytest.raises(ModelLoadError, match="although CUDA was requested"):
        OnnxModelRuntime(directory / "model.onnx", manifest, Settings(execution_providers="cuda"))
    with caplog.at_level("WARNING", logger="service.runtime"):
        runtime = OnnxModelRuntime(directory / "model.onnx", manifest, Settings(execution_providers="auto"))
    assert runtime.provider == CPU
    assert "CUDA did not come up, serving on CPUExecutionProvider" in caplog.text


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cuda_model_is_not_loaded_and_the_failure_is_counted(tmp_path: Path, ort_claims_cuda: None) -> None:
    write_model(tmp_path, "clf", 1, "classification")

    async def load(preference: str) -> tuple[ServiceMetrics, str | None, str]:
        metrics = ServiceMetrics()
        repository = ModelRepository(
            Settings(model_repository=tmp_path, execution_providers=preference), metrics
        )
        try:
            await repository.start()
        except NoLoadableModel as exc:
            return metrics, None, str(exc)
        provider = repository.get("clf").provider
        await repository.stop()
        return metrics, provider, ""

    metrics, provider, error = asyncio.run(load("cuda"))
    assert provider is None and "although CUDA was requested" in error
    assert (
        metrics.registry.get_sample_value(
            "hydra_model_load_failures_total", {"model": "clf", "reason": "provider"}
        )
        == 1.0
    )
    metrics, provider, _ = asyncio.run(load("auto"))
    assert provider == CPU
    info = {"model": "clf", "version": "1", "heads": "4", "provider": CPU}
    assert metrics.registry.get_sample_value("hydra_model_info", info) == 1.0


def test_warm_up_covers_the_batch_sizes_the_batcher_forms() -> None:
    assert warmup_batch_sizes(1) == (1,)
    assert warmup_batch_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert warmup_batch_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert warmup_batch_sizes(65536) == tuple(1 << k for k in range(11))  # bounded at 1024 rows


@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="needs onnxruntime-gpu")
def test_options_reach_a_real_cuda_session(tmp_path: Path) -> None:
    directory = write_model(tmp_path, "clf", 1, "classification")
    try:
        runtime = OnnxModelRuntime(
            directory / "model.onnx", ModelManifest.load(directory), Settings(execution_providers="cuda")
        )
    except ModelLoadError as exc:
        pytest.skip(f"CUDA does not come up here: {exc.message}")
    options = runtime.provider_options[CUDA]
    assert options["cudnn_conv_algo_search"] == "HEURISTIC" and options["use_tf32"] == "0"
    assert options["device_id"] == "0"
