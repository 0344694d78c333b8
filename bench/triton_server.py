"""Triton Inference Server through PyTriton, serving one model package like our server does.

Runs under the Python of `.venv-triton` (Debian's python3.11; see `make bench-triton-venv`), NOT the
project venv: `python bench/triton_server.py --package models/digits/1 --port 8100`.

Triton's dynamic batcher (max batch size and queue delay as given, in rows and microseconds) forms
batches; PyTriton's Python backend hands each batch to `infer`, which runs the same ONNX graph in
ONNX Runtime (same session options as our server) and computes the same answer tensors with our
own `service.inference` code, so both servers do identical work per batch. Scalar answers are
declared with per-row shape (1,) (Triton's batched outputs need a dimension), so their V2 shape is
[n, 1] where ours is [n]; the payload is the same size.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from service import inference  # noqa: E402  (numpy + pydantic only: no FastAPI, no torch)
from service.manifest import ModelManifest  # noqa: E402
from service.uncertainty import ConformalOODCalibrator  # noqa: E402

DTYPES = {"FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_, "BYTES": bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True, help="models/<name>/<version>")
    parser.add_argument("--port", type=int, required=True, help="HTTP port (gRPC and metrics take +1, +2)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="cuda: onnxruntime-gpu")
    args = parser.parse_args()

    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    manifest = ModelManifest.load(args.package / "manifest.json")
    calibrator = ConformalOODCalibrator(manifest.ood.calibration_scores)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if args.provider == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    graph = str(args.package / "model.onnx")
    session = ort.InferenceSession(graph, sess_options=options, providers=providers)
    if args.provider == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit("--provider cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    # the graph outputs the manifest names, by role: the heads', then the densities (schema 2) and the
    # unseen-value count (schema 3)
    named = manifest.outputs.model_dump()
    roles = ["log_probs"] if manifest.task == "classification" else ["mean", "variance"]
    roles += [r for r in ("density", "input_density", "unseen_values") if named.get(r)]
    raw_names = [named[r] for r in roles]
    specs = [s for s in inference.output_specs(manifest) if s[0] not in inference.head_output_names(manifest)]
    alpha = manifest.ood.default_alpha

    @batch  # type: ignore[untyped-decorator]  (PyTriton ships no type hints)
    def infer(input: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.ascontiguousarray(input, dtype=np.float32)
        raw = dict(zip(roles, session.run(raw_names, {manifest.input.name: rows}), strict=True))
        answers = inference.finalise(manifest, inference.summarise(manifest, calibrator, raw), alpha=alpha)
        out: dict[str, np.ndarray] = {}
        for name, datatype, shape in specs:
            value = answers[name]
            if datatype == "BYTES":
                value = np.char.encode(value.astype(str), "utf-8").astype(object)
            out[name] = value.reshape(len(rows), *(shape[1:] or [1]))
        return out

    inputs = [Tensor(name=manifest.input.name, dtype=np.float32, shape=tuple(manifest.row_shape))]
    outputs = [Tensor(name=n, dtype=DTYPES[d], shape=tuple(s[1:]) or (1,)) for n, d, s in specs]
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=args.port + 1,
        metrics_port=args.port + 2,
        log_verbose=0,
    )
    logging.basicConfig(level=logging.WARNING)
    # PyTriton restricts the statistics API to a token; the benchmark reads batch sizes from it
    security = TritonSecurityConfig(access_token=os.environ.get("BENCH_TRITON_TOKEN") or None)
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=manifest.name,
            infer_func=infer,
            inputs=inputs,
            outputs=outputs,
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
