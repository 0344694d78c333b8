"""ONNX export of a `PackagedModel` with the serving contract, checked against PyTorch.

Contract (see service/manifest.py): one float32 input "input" of shape (batch, *row_shape) with a
dynamic batch axis; outputs "log_probs" (batch, heads, classes) or "mean" and "variance"
(batch, heads); the Hydra graph adds "density" and "input_density" (batch,) when it carries the
densities of training/density.py, and "unseen_values" (batch,) when the table has discrete columns.
Export fails loudly if ONNX Runtime's outputs differ from
PyTorch's by more than `PARITY_TOLERANCE` (absolute for values within ±1, relative beyond: float32 precision).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from training.models import PackagedModel

INPUT_NAME = "input"
OPSET = 17
PARITY_TOLERANCE = 1e-4


class ExportParityError(RuntimeError):
    """ONNX Runtime disagrees with PyTorch beyond tolerance: the graph must not ship."""


DENSITY_OUTPUT = "density"
INPUT_DENSITY_OUTPUT = "input_density"
UNSEEN_VALUES_OUTPUT = "unseen_values"


def output_names(
    task: str, density: bool = False, input_density: bool = False, unseen_values: bool = False
) -> list[str]:
    names = ["log_probs"] if task == "classification" else ["mean", "variance"]
    names += [DENSITY_OUTPUT] if density else []
    names += [INPUT_DENSITY_OUTPUT] if input_density else []
    return names + ([UNSEEN_VALUES_OUTPUT] if unseen_values else [])


def model_output_names(model: PackagedModel) -> list[str]:
    return output_names(
        model.task, model.has_density, model.input_density is not None, model.unseen_values is not None
    )


def export_onnx(
    model: PackagedModel, row_shape: tuple[int, ...], path: Path, check_rows: np.ndarray
) -> dict[str, float]:
    """Write `model` to `path` and verify it on `check_rows` (raw inputs) and on random rows.

    Uses the TorchScript-based exporter (dynamo=False): it yields a small, plain graph
    (MatMul/Gemm/Conv/Relu/LogSoftmax) with a symbolic batch axis.
    """
    model = model.cpu().eval()
    names = model_output_names(model)
    example = torch.from_numpy(np.ascontiguousarray(check_rows[:4], dtype=np.float32))
    dynamic_axes = {INPUT_NAME: {0: "batch"}} | {n: {0: "batch"} for n in names}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return check_parity(model, path, row_shape, check_rows)


def parity_scale(name: str, want: np.ndarray, logits: np.ndarray, y_mean: float) -> np.ndarray:
    """What an output's |ORT − torch| is divided by before the tolerance (see `check_parity`)."""
    scale = np.abs(logits).max(axis=-1, keepdims=True) if want.ndim == 3 else np.abs(want)
    if name == "mean":
        scale = np.maximum(scale, abs(y_mean))
    return np.maximum(1.0, scale)


def check_parity(
    model: PackagedModel, path: Path, row_shape: tuple[int, ...], rows: np.ndarray
) -> dict[str, float]:
    """Max |ORT - torch| per output on `rows` plus random rows of odd batch sizes (dynamic axis).

    The random rows lie around `rows` (their per-feature mean ± 3 std): odd batch sizes and fresh
    values, at magnitudes the model meets, not |max| in every feature (millions of std for a
    small-scale feature, where float32 rounding alone exceeds any tolerance)."""
    rng = np.random.default_rng(0)
    flat = rows.reshape(len(rows), -1).astype(np.float64)
    spread = np.where(flat.std(axis=0) > 0, flat.std(axis=0), 1.0)
    random_rows = flat.mean(axis=0) + 3.0 * spread * rng.standard_normal((3, flat.shape[1]))
    batches = [
        np.ascontiguousarray(rows, dtype=np.float32),
        random_rows.reshape(3, *row_shape).astype(np.float32),
        np.ascontiguousarray(rows[:1], dtype=np.float32),
    ]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = model_output_names(model)
    worst = dict.fromkeys(names, 0.0)
    for batch in batches:
        got = session.run(names, {INPUT_NAME: batch})
        with torch.no_grad():
            x = torch.from_numpy(batch)
            want = model(x)
            logits = torch.cat([m(x) for m in model.members], dim=1).numpy()  # (batch, heads, out)
        wants = [want] if isinstance(want, torch.Tensor) else list(want)
        for name, g, w in zip(names, got, wants, strict=True):
            w_np = w.numpy()
            if g.shape != w_np.shape:
                raise ExportParityError(f"{path.name}: output {name} shape {g.shape} != torch {w_np.shape}")
            # absolute error for values of magnitude <= 1 (probabilities, log-probs near 0), relative
            # above: float32 has ~1e-7 relative precision, so a variance in large target units cannot
            # agree to 1e-4 absolutely. A log-softmax is a difference of logits, so its rounding
            # error scales with the row's largest |logit| (huge on far-out rows), not with the
            # log-prob itself: compare log-probs relative to that, per (row, head). The density is a
            # squared distance: relative, like a variance. A regression mean is y_mean + y_std·z in
            # target units: where it lies near 0 against a large y_mean (prices), float32 rounds
            # the sum at |y_mean|'s precision, so its error is relative to |y_mean| too.
            denom = parity_scale(name, w_np, logits, model.y_mean)
            err = float(np.max(np.abs(g - w_np) / denom)) if g.size else 0.0
            worst[name] = max(worst[name], err)
    bad = {k: v for k, v in worst.items() if not v <= PARITY_TOLERANCE}
    if bad:
        raise ExportParityError(
            f"{path.name}: ONNX Runtime differs from PyTorch by {bad} > {PARITY_TOLERANCE}"
        )
    return worst


def graph_summary(path: Path) -> dict[str, object]:
    proto = onnx.load(str(path))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    return {"nodes": len(proto.graph.node), "ops": ops, "parameters": params, "bytes": path.stat().st_size}
