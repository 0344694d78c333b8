"""OnnxModelRuntime: provider choice, and graphs that disagree with their manifest are refused."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.errors import ModelLoadError
from service.manifest import ModelManifest
from service.runtime import CPU, CUDA, OnnxModelRuntime, choose_providers
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
