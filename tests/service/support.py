"""Test support: real small Hydra ONNX models with valid manifests, and a real server subprocess.

`build_test_repository(root)` writes `clf/1` (classification: 8 features, 3 classes, 4 heads) and
`reg/1` (regression: 5 features, 4 heads), each an MLP body + M heads built with `onnx.helper`, and a
manifest whose conformal calibration scores come from running the model on calibration inputs.

`build_density_repository(root)` writes `dens_clf/1` and `dens_reg/1`: the same graphs plus a
`density` output (squared Mahalanobis distance of the body features to the nearest class mean), an
`input_density` output (squared Mahalanobis distance of the standardised raw row to the training
mean, scored two-sided) and a schema-2 manifest whose OOD score combines the head score with both
(`ood.components`, as a trained package has them), and a plain `clf/1` beside them. It is its own
repository so tests that count models are unaffected.

`running_server(repo_dir, **env)` starts `python -m service` as a uvicorn subprocess on a free
127.0.0.1 port, waits for `/v2/health/ready`, yields a `Server` (base URL, process, log), and stops
it with SIGTERM: for tests where the socket or the process matters (signals, workers, limits on
connections and bodies, overload, Prometheus scrapes, tritonclient, gRPC, the KServe SDK).
`in_process(repo_dir, **settings)` runs the same app in this process with its lifespan, reached
through httpx's ASGI transport, for everything else (a start costs ~0.05 s instead of 1.5-2.5 s).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from onnx import TensorProto, helper, numpy_helper
from sklearn.covariance import LedoitWolf

from bench.servers import free_port, service_command
from service.manifest import ModelManifest
from tests import oracle

REPO_ROOT = Path(__file__).resolve().parents[2]
OPSET = 17
HIDDEN = 16
HEADS = 4
CLF_FEATURES, CLF_CLASSES = 8, 3
REG_FEATURES = 5
REG_FEATURE_NAMES = ("age", "bmi", "bp", "s1", "s2")
API_KEY = "s3cret-key"  # the servers of tests that load, unload or break models need one
AUTH = {"X-API-Key": API_KEY}
T = TypeVar("T")


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
    return classifier_model(nodes, inits, "hydra_clf", heads)


def classifier_model(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], name: str, heads: int
) -> onnx.ModelProto:
    """The checked model of a classifier graph: input [batch, 8] → ... → log_probs [batch, heads, 3]."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", CLF_FEATURES])],
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["batch", heads, CLF_CLASSES])],
        inits,
    )
    return finish_model(graph)


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
    return finish_model(graph)


def with_density(model: onnx.ModelProto, fit_rows: np.ndarray) -> onnx.ModelProto:
    """`model` plus two outputs, as training/density.py exports them (both fitted on `fit_rows`):

    `density` (batch,) = min over class means of ‖(body − μ_c) W‖²: μ_c are the body-feature means
    of `fit_rows` grouped by the predicted class (one group for regression), W W^T the inverse of
    their pooled within-class covariance (shrunk towards its mean eigenvalue: a ReLU body has dead
    units). Whitened means are precomputed, so the graph adds MatMul, Unsqueeze, Sub,
    ReduceSumSquare and ReduceMin.

    `input_density` (batch,) = ‖(x − μ) W‖² on the raw row (`input_density_parameters`).
    """
    graph = onnx.ModelProto.FromString(model.SerializeToString()).graph
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    body = np.maximum(fit_rows.astype(np.float64) @ weights["w1"] + weights["b1"], 0.0)  # (n, HIDDEN)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    if graph.output[0].name == "log_probs":
        (log_probs,) = session.run(["log_probs"], {"input": fit_rows})
        groups = oracle.classification(log_probs)["label"]
    else:
        groups = np.zeros(len(body), dtype=np.int64)
    present = np.unique(groups)
    means = np.stack([body[groups == g].mean(axis=0) for g in present])  # (K', HIDDEN)
    centred = body - means[np.searchsorted(present, groups)]
    covariance = centred.T @ centred / len(body)
    covariance = 0.9 * covariance + 0.1 * np.trace(covariance) / HIDDEN * np.eye(HIDDEN)
    eigenvalues, vectors = np.linalg.eigh(covariance)
    whitening = vectors / np.sqrt(eigenvalues)  # W W^T = covariance^-1
    graph.node.extend(
        [
            helper.make_node("MatMul", ["body", "density_w"], ["white"]),  # (batch, HIDDEN)
            helper.make_node("Unsqueeze", ["white", "density_axis"], ["white3"]),  # (batch, 1, HIDDEN)
            helper.make_node("Sub", ["white3", "density_means"], ["white_diff"]),  # (batch, K, HIDDEN)
            helper.make_node("ReduceSumSquare", ["white_diff"], ["class_distance"], axes=[-1], keepdims=0),
            helper.make_node("ReduceMin", ["class_distance"], ["density"], axes=[1], keepdims=0),
        ]
    )
    graph.initializer.extend(
        [
            _init("density_w", whitening),
            _init("density_means", means @ whitening),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "density_axis"),
        ]
    )
    graph.output.append(helper.make_tensor_value_info("density", TensorProto.FLOAT, ["batch"]))
    mean, input_whitening = input_density_parameters(fit_rows)
    graph.node.extend(
        [
            helper.make_node("Sub", ["input", "input_density_mean"], ["input_centred"]),
            helper.make_node("MatMul", ["input_centred", "input_density_w"], ["input_white"]),
            helper.make_node("ReduceSumSquare", ["input_white"], ["input_density"], axes=[-1], keepdims=0),
        ]
    )
    graph.initializer.extend([_init("input_density_mean", mean), _init("input_density_w", input_whitening)])
    graph.output.append(helper.make_tensor_value_info("input_density", TensorProto.FLOAT, ["batch"]))
    return finish_model(graph)


def input_density_parameters(fit_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """μ and W of the input typicality ‖(x − μ) W‖², float64, as training/density.py fits them:
    standardise each feature on `fit_rows`, a Ledoit–Wolf covariance Σ of the standardised rows, and
    W = diag(1/σ) V Λ^{-1/2} (Σ = V Λ V^T), so ‖(x − μ) W‖² = z^T Σ^{-1} z with z the standardised row."""
    rows = np.asarray(fit_rows, dtype=np.float64)
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    covariance = LedoitWolf(assume_centered=True).fit((rows - mean) / std).covariance_
    eigenvalues, vectors = np.linalg.eigh(covariance)
    whitening: np.ndarray = vectors / np.sqrt(eigenvalues) / std[:, None]
    return mean, whitening


def finish_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """`graph` as a model of opset 17, IR 8, that passes the ONNX checker."""
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
    density: bool = False,
) -> Path:
    """Write `root/name/version/{model.onnx, manifest.json}`; calibration scores from running it.

    `density`: the graph also outputs `density` and `input_density` (`with_density`, fitted on a
    draw of centred N(0, 1) "training" rows) and the manifest is schema 2 with a combined OOD score:
    the head score, the density and the input typicality (two-sided), each normalised on one draw
    of ID rows (`normaliser_inputs`), calibrated on another (`calibration_inputs`).
    """
    directory = root / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    if task == "classification":
        model = make_classifier(seed, heads, poisoned=poisoned)
    else:
        model = make_regressor(seed, heads)
    if density:
        model = with_density(model, calibration_inputs(task, n=400, seed=321))  # the "training" rows
    onnx.save(model, directory / "model.onnx")
    graph = RawModel(model)
    calib = calibration_inputs(task)
    if task == "classification":
        scores = oracle.classification(graph.raw(calib)["log_probs"])["mutual_information"]
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
        raw = graph.raw(calib)
        scores = oracle.regression(raw["mean"], raw["variance"])["epistemic_variance"]
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
    if density:
        extra["outputs"] |= {"density": "density", "input_density": "input_density"}
        extra["ood"] |= combined_ood(graph, task, extra["ood"]["score"], calib)
    manifest = ModelManifest.model_validate(
        {
            "schema_version": 2 if density else 1,
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


def normaliser_inputs(task: Literal["classification", "regression"], n: int = 200) -> np.ndarray:
    """ID rows (the calibration inputs' law, another draw) that the combined score is normalised on."""
    return calibration_inputs(task, n=n, seed=456)


def combined_ood(
    model: RawModel, task: Literal["classification", "regression"], head_score: str, calib: np.ndarray
) -> dict[str, Any]:
    """The `ood` fields of a combined score: components fitted on `normaliser_inputs`, calibration
    scores = the combined statistic on `calib` (another split), both with the test oracle."""
    reference = component_scores(model.raw(normaliser_inputs(task)), head_score)
    components = [
        oracle.fit_component(score, values, tails=COMPONENT_TAILS.get(score, "upper"))
        | {"fitted_on": "test-normaliser"}
        for score, values in reference.items()
    ]
    ood = {"score": "combined", "combination": "sum_pos_log_z", "components": components}
    combined = oracle.ood_score(ood, component_scores(model.raw(calib), head_score))
    return ood | {"calibration_scores": sorted(combined.tolist())}


# Input typicality is unusual both ways (too far from the training mean, or too close to it).
COMPONENT_TAILS: dict[str, Literal["upper", "both"]] = {"input_density": "both"}


def component_scores(raw: dict[str, np.ndarray], head_score: str) -> dict[str, np.ndarray]:
    """{head_score: per-row uncertainty score, "density", "input_density": the graph's own scores
    (those it has)}, float64, in the manifest's component order."""
    if "log_probs" in raw:
        head = oracle.classification(raw["log_probs"])[head_score]
    else:
        head = oracle.regression(raw["mean"], raw["variance"])[head_score]
    graph = {n: np.asarray(raw[n], dtype=np.float64) for n in oracle.GRAPH_SCORES if n in raw}
    return {head_score: head} | graph


def build_test_repository(root: Path, *, clf_seed: int = 0, reg_seed: int = 1) -> Path:
    """A model repository with `clf/1` (classification) and `reg/1` (regression)."""
    root.mkdir(parents=True, exist_ok=True)
    write_model(root, "clf", 1, "classification", seed=clf_seed)
    write_model(root, "reg", 1, "regression", seed=reg_seed)
    return root


def build_density_repository(root: Path) -> Path:
    """`dens_clf/1` and `dens_reg/1` (schema 2: density and input-density outputs, combined OOD
    score of three components) and a v1 `clf/1`."""
    root.mkdir(parents=True, exist_ok=True)
    write_model(root, "dens_clf", 1, "classification", seed=0, density=True)
    write_model(root, "dens_reg", 1, "regression", seed=1, density=True)
    write_model(root, "clf", 1, "classification", seed=0)
    return root


class RawModel:
    """A graph run in-process with ORT: its raw outputs keyed by graph output name (= manifest role)."""

    def __init__(self, model: onnx.ModelProto | Path) -> None:
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        self.session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])

    def raw(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        values = self.session.run(names, {"input": np.asarray(rows, dtype=np.float32)})
        return dict(zip(names, values, strict=True))


class ReferenceModel:
    """In-process answers for a model directory: a direct ORT run + the independent `tests.oracle`."""

    def __init__(self, directory: Path) -> None:
        self.manifest = ModelManifest.load(directory)  # for contract checks (names, shapes)
        self.spec = oracle.read_manifest(directory)  # what the oracle reads: plain JSON
        self.session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])

    def raw(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The graph outputs the manifest names, by role (`log_probs` | `mean`, `variance`; `density`,
        `input_density`)."""
        wanted = {role: name for role, name in self.spec["outputs"].items() if name is not None}
        values = self.session.run(list(wanted.values()), {"input": np.asarray(rows, dtype=np.float32)})
        return dict(zip(wanted, values, strict=True))

    def answer(
        self, rows: np.ndarray, *, alpha: float | None = None, level: float = 0.95, heads: bool = False
    ) -> dict[str, np.ndarray]:
        return oracle.answer(self.spec, self.raw(rows), alpha=alpha, level=level, heads=heads)


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    """A raw TCP connection to a server's `http://host:port` (requests written by hand)."""
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, str, bytes]:
    """(status, head, body) of one HTTP/1.1 response read off `sock` (a `Content-Length` body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    head = raw_head.decode("latin-1")
    length = 0
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(" ", 2)[1]), head, body


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    grpc_port: int = 0  # 0: gRPC off

    @property
    def grpc_target(self) -> str:
        """host:port of the Open Inference Protocol over gRPC (tritonclient.grpc's `url`)."""
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_server(repo_dir: Path, *args: str, **env: str) -> Server:
    """Start `python -m service` on a free port (not waiting for readiness)."""
    port = free_port(span=2)  # HTTP on port, gRPC on port + 1
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_")}
    # CPU unless a test asks otherwise: tests compare with a CPU reference at tight tolerances and
    # assert the CPU provider, and `auto` would pick a working GPU.
    env.setdefault("execution_providers", "cpu")
    # gRPC on a free port of its own (the default 8081 would collide between concurrent servers)
    env.setdefault("grpc_port", str(port + 1))
    environment.update({f"HYDRA_{k.upper()}": str(v) for k, v in env.items()})
    environment["PYTHONUNBUFFERED"] = "1"
    log = Path(tempfile.mkstemp(prefix="hydra-serve-", suffix=".log")[1])
    with log.open("wb") as sink:
        process = subprocess.Popen(
            service_command(port, repo_dir, *args),
            cwd=REPO_ROOT,
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return Server(f"http://127.0.0.1:{port}", process, log, int(env["grpc_port"]))


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


def held_batches(delay_ms: int) -> dict[str, str]:
    """Server settings under which requests sent together wait `delay_ms` in the batch queue: Triton's
    rule (a partial batch waits out the delay even while the model is idle) and room for 256 rows.
    Long enough for a test to signal, reload or inspect the server while they wait."""
    return {"max_queue_delay_ms": str(delay_ms), "max_batch_size": "256", "run_when_idle": "false"}


@contextlib.contextmanager
def running_server(repo_dir: Path, *args: str, **env: str) -> Iterator[Server]:
    """A ready server for `repo_dir`; `env` keys become HYDRA_<KEY> variables. Stopped with SIGTERM."""
    server = start_server(repo_dir, *args, **env)
    try:
        wait_ready(server)  # a failed start raises with the log's text: the file can go either way
        yield server
    finally:
        stop(server.process)
        server.log_path.unlink(missing_ok=True)  # one per server start: thousands in /tmp otherwise


def server_fixture(doc: str, scope: str = "module", **settings: str) -> Any:
    """A pytest fixture: a server over `model_repository` with `settings` (HYDRA_<KEY>), shared per
    `scope`. Assign it to a module-level name: `tight_server = server_fixture("...", max_queue_size="2")`."""

    def fixture(model_repository: Path) -> Iterator[Server]:
        with running_server(model_repository, **settings) as server:
            yield server

    fixture.__doc__ = doc
    return pytest.fixture(scope=scope)(fixture)  # type: ignore[call-overload]


def stop(process: subprocess.Popen[Any], timeout: float = 30.0) -> int:
    """SIGTERM a process still running, wait `timeout` s, then SIGKILL; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


class InProcessClient:
    """httpx's AsyncClient over `httpx.ASGITransport`, called from synchronous tests: each request
    runs on the event loop of a blocking portal thread (the loop the app's lifespan started on)."""

    def __init__(self, portal: BlockingPortal, client: httpx.AsyncClient) -> None:
        self._portal = portal
        self._client = client

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        content = kwargs.get("content")
        if content is not None and not isinstance(content, bytes | str) and hasattr(content, "__next__"):
            chunks = content  # a synchronous generator: streamed as a chunked body

            async def streamed() -> AsyncIterator[bytes]:
                for chunk in chunks:
                    yield chunk

            kwargs["content"] = streamed()
        return self._portal.call(functools.partial(self._client.request, method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def head(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("HEAD", url, **kwargs)

    def run(self, scenario: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
        """`await scenario(client)` on the app's event loop: for tests that keep many requests in
        flight at once (asyncio tasks sharing the one AsyncClient)."""
        return self._portal.call(scenario, self._client)


@contextlib.contextmanager
def in_process(
    repo_dir: Path, *, headers: dict[str, str] | None = None, **settings: Any
) -> Iterator[InProcessClient]:
    """The app `python -m service` serves, in this process with its lifespan run, reached through
    httpx's ASGI transport (no socket): for tests where the transport does not matter. CPU and no
    gRPC, as the subprocess servers here default to. `headers` go with every request (an API key)."""
    from service.app import create_app
    from service.settings import Settings

    options: dict[str, Any] = {"execution_providers": "cpu", "grpc_port": 0} | settings
    app = create_app(Settings(model_repository=repo_dir, **options))
    # raise_app_exceptions=False: an unhandled error is answered 500, as uvicorn would answer it
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    with start_blocking_portal() as portal:
        lifespan = app.router.lifespan_context(app)
        portal.call(lifespan.__aenter__)
        client = httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", headers=headers, timeout=30
        )
        try:
            yield InProcessClient(portal, client)
        finally:
            portal.call(client.aclose)
            portal.call(lifespan.__aexit__, None, None, None)
            # the lifespan's gc.freeze() (a server's start-up) would keep this app's reference
            # cycles, its ONNX Runtime sessions and their thread pools, for the rest of the run
            gc.unfreeze()
