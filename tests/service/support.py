"""Test support: real small Hydra ONNX models with valid manifests, and a real server subprocess.

`build_test_repository(root)` writes `clf/1` (classification: 8 features, 3 classes, 4 heads) and
`reg/1` (regression: 5 features, 4 heads), each an MLP body + M heads built with `onnx.helper`, and a
manifest whose conformal calibration scores come from running the model on calibration inputs.

`running_server(repo_dir, **env)` starts `python -m service` as a uvicorn subprocess on a free
127.0.0.1 port, waits for `/v2/health/ready`, yields a `Server` (base URL, process, log), and stops
it with SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service import inference
from service.manifest import ModelManifest
from service.uncertainty import ConformalOODCalibrator, classification_uncertainty, regression_uncertainty

REPO_ROOT = Path(__file__).resolve().parents[2]
OPSET = 17
HIDDEN = 16
HEADS = 4
CLF_FEATURES, CLF_CLASSES = 8, 3
REG_FEATURES = 5
REG_FEATURE_NAMES = ("age", "bmi", "bp", "s1", "s2")


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _body(rng: np.random.Generator, features: int, scale: float) -> tuple[list[onnx.NodeProto], list[Any]]:
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["body"]),
    ]
    inits = [
        _init("w1", rng.normal(0, scale / np.sqrt(features), (features, HIDDEN))),
        _init("b1", rng.normal(0, 0.1, HIDDEN)),
    ]
    return nodes, inits


def make_classifier(seed: int = 0, heads: int = HEADS, *, poisoned: bool = False) -> onnx.ModelProto:
    """input [-1, 8] → MLP body → heads×classes logits → reshape → log_softmax: log_probs [-1, heads, 3].

    `poisoned`: the graph also gathers from a 4-element table at index |input[:, 0]|; that adds
    nothing to the logits, but ONNX Runtime fails the whole run when a row has |input[:, 0]| ≥ 4 — a
    real model error on demand.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = _body(rng, CLF_FEATURES, 2.0)
    nodes += [
        helper.make_node("MatMul", ["body", "w2"], ["z0"]),
        helper.make_node("Add", ["z0", "b2"], ["z1"]),
        helper.make_node("Reshape", ["z1", "shape"], ["logits" if not poisoned else "clean_logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
    ]
    if poisoned:
        nodes[-1:-1] = [
            helper.make_node("Gather", ["input", "zero_index"], ["x0"], axis=1),  # (batch,)
            helper.make_node("Abs", ["x0"], ["x0_abs"]),
            helper.make_node("Cast", ["x0_abs"], ["table_index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "table_index"], ["looked_up"], axis=0),  # (batch,)
            helper.make_node("Unsqueeze", ["looked_up", "axes"], ["offset"]),  # (batch, 1, 1)
            helper.make_node("Add", ["clean_logits", "offset"], ["logits"]),
        ]
        inits += [
            numpy_helper.from_array(np.array(0, dtype=np.int64), "zero_index"),
            _init("table", np.zeros(4)),
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
        ]
    inits += [
        _init("w2", rng.normal(0, 1.5 / np.sqrt(HIDDEN), (HIDDEN, heads * CLF_CLASSES))),
        _init("b2", rng.normal(0, 0.2, heads * CLF_CLASSES)),
        numpy_helper.from_array(np.array([-1, heads, CLF_CLASSES], dtype=np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "hydra_clf",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", CLF_FEATURES])],
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["batch", heads, CLF_CLASSES])],
        inits,
    )
    return _finish(graph)


def make_regressor(seed: int = 0, heads: int = HEADS) -> onnx.ModelProto:
    """input [-1, 5] → MLP body → per-head (mean, softplus variance): mean, variance [-1, heads]."""
    rng = np.random.default_rng(seed)
    nodes, inits = _body(rng, REG_FEATURES, 1.5)
    nodes += [
        helper.make_node("MatMul", ["body", "wm"], ["m0"]),
        helper.make_node("Add", ["m0", "bm"], ["mean"]),
        helper.make_node("MatMul", ["body", "wv"], ["v0"]),
        helper.make_node("Add", ["v0", "bv"], ["v1"]),
        helper.make_node("Softplus", ["v1"], ["v2"]),
        helper.make_node("Add", ["v2", "eps"], ["variance"]),
    ]
    inits += [
        _init("wm", rng.normal(0, 3.0 / np.sqrt(HIDDEN), (HIDDEN, heads))),
        _init("bm", rng.normal(10.0, 0.5, heads)),
        _init("wv", rng.normal(0, 0.5 / np.sqrt(HIDDEN), (HIDDEN, heads))),
        _init("bv", rng.normal(-1.0, 0.1, heads)),
        _init("eps", np.array(1e-3)),
    ]
    graph = helper.make_graph(
        nodes,
        "hydra_reg",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", REG_FEATURES])],
        [
            helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", heads]),
            helper.make_tensor_value_info("variance", TensorProto.FLOAT, ["batch", heads]),
        ],
        inits,
    )
    return _finish(graph)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def calibration_inputs(
    task: Literal["classification", "regression"], n: int = 200, seed: int = 123
) -> np.ndarray:
    features = CLF_FEATURES if task == "classification" else REG_FEATURES
    return np.random.default_rng(seed).normal(0, 1, (n, features)).astype(np.float32)


def write_model(
    root: Path,
    name: str,
    version: int,
    task: Literal["classification", "regression"],
    *,
    seed: int = 0,
    heads: int = HEADS,
    poisoned: bool = False,
) -> Path:
    """Write `root/name/version/{model.onnx, manifest.json}`; calibration scores from running it."""
    directory = root / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    if task == "classification":
        model = make_classifier(seed, heads, poisoned=poisoned)
    else:
        model = make_regressor(seed, heads)
    onnx.save(model, directory / "model.onnx")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    calib = calibration_inputs(task)
    if task == "classification":
        (log_probs,) = session.run(["log_probs"], {"input": calib})
        scores = classification_uncertainty(log_probs).mutual_information
        features = CLF_FEATURES
        extra: dict[str, Any] = {
            "labels": ["setosa", "versicolor", "virginica"],
            "outputs": {"log_probs": "log_probs"},
            "ood": {
                "score": "mutual_information",
                "calibration_scores": sorted(scores.tolist()),
                "default_alpha": 0.05,
            },
        }
    else:
        mean, variance = session.run(["mean", "variance"], {"input": calib})
        scores = regression_uncertainty(mean, variance).epistemic_variance
        features = REG_FEATURES
        extra = {
            "feature_names": list(REG_FEATURE_NAMES),
            "outputs": {"mean": "mean", "variance": "variance"},
            "ood": {
                "score": "epistemic_variance",
                "calibration_scores": sorted(scores.tolist()),
                "default_alpha": 0.1,
            },
        }
    manifest = ModelManifest.model_validate(
        {
            "name": name,
            "version": version,
            "task": task,
            "description": f"test {task} Hydra (seed {seed})",
            "input": {"name": "input", "shape": [-1, features]},
            "heads": heads,
            "evaluation": {"note": "synthetic test model"},
            "provenance": {"dataset": "synthetic", "seed": seed},
            **extra,
        }
    )
    manifest.dump(directory)
    return directory


def build_test_repository(root: Path, *, clf_seed: int = 0, reg_seed: int = 1) -> Path:
    """A model repository with `clf/1` (classification) and `reg/1` (regression)."""
    root.mkdir(parents=True, exist_ok=True)
    write_model(root, "clf", 1, "classification", seed=clf_seed)
    write_model(root, "reg", 1, "regression", seed=reg_seed)
    return root


class ReferenceModel:
    """In-process answers for a model directory: direct ORT run + service.inference, no server."""

    def __init__(self, directory: Path) -> None:
        self.manifest = ModelManifest.load(directory)
        self.session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
        self.calibrator = ConformalOODCalibrator(self.manifest.ood.calibration_scores)

    def answer(
        self, rows: np.ndarray, *, alpha: float | None = None, level: float = 0.95, heads: bool = False
    ) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, dtype=np.float32)
        names = self.manifest.outputs
        if self.manifest.task == "classification":
            (log_probs,) = self.session.run([names.log_probs or ""], {"input": rows})
            raw = {"log_probs": log_probs}
        else:
            mean, var = self.session.run([names.mean or "", names.variance or ""], {"input": rows})
            raw = {"mean": mean, "variance": var}
        summary = inference.summarise(self.manifest, self.calibrator, raw)
        return inference.finalise(
            self.manifest,
            summary,
            alpha=self.manifest.ood.default_alpha if alpha is None else alpha,
            level=level,
            include_heads=heads,
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_server(repo_dir: Path, *args: str, **env: str) -> Server:
    """Start `python -m service` on a free port (not waiting for readiness)."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_")}
    environment.update({f"HYDRA_{k.upper()}": str(v) for k, v in env.items()})
    environment["PYTHONUNBUFFERED"] = "1"
    log = Path(tempfile.mkstemp(prefix="hydra-serve-", suffix=".log")[1])
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model-repository",
                str(repo_dir),
                *args,
            ],
            cwd=REPO_ROOT,
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return Server(f"http://127.0.0.1:{port}", process, log)


def wait_ready(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/v2/health/ready", timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    server.terminate()
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()}")


@contextlib.contextmanager
def running_server(repo_dir: Path, *args: str, **env: str) -> Iterator[Server]:
    """A ready server for `repo_dir`; `env` keys become HYDRA_<KEY> variables. Stopped with SIGTERM."""
    server = start_server(repo_dir, *args, **env)
    try:
        wait_ready(server)
        yield server
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()
