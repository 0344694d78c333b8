"""In-process ONNX Runtime timing: sessions configured like the server's, interleaved rounds.

Graphs are timed round-robin in short slices (each graph gets `rounds` slices of
`seconds / rounds`) so that a change in background load hits every graph of a comparison alike;
ratios from the same call are comparable even on a shared machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.gpu import cuda_unavailable_reason
from service.runtime import CPU, CUDA, cuda_provider_options
from service.settings import Settings


def make_session(
    path: Path, provider: str = "CPUExecutionProvider", threads: int = 0
) -> ort.InferenceSession:
    """An InferenceSession with the serving runtime's options (service/runtime.py): default thread
    count, no spin-waiting between runs, the server's default CUDA provider options.

    Stops (SystemExit) when `provider` was asked for and the session came up on another one:
    onnxruntime-gpu without its CUDA libraries runs on CPU, and CPU numbers must not be published
    under the GPU's name."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers: list[str | tuple[str, dict[str, str]]] = [provider]
    if provider == CUDA:
        providers = [(CUDA, cuda_provider_options(Settings())), CPU]
    elif provider != CPU:
        providers.append(CPU)
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    require_provider(provider, session.get_providers()[0])
    return session


def require_provider(asked: str, got: str) -> None:
    """SystemExit with the reason when `asked` was not what the session (or server) runs on."""
    if got != asked:
        why = f": {cuda_unavailable_reason()}" if asked == CUDA else ""
        raise SystemExit(f"bench: {asked} was requested but the session came up on {got}{why}")


@dataclass(frozen=True)
class Timing:
    graph: str
    batch: int
    calls: int
    seconds: float
    rows_per_s: float
    p50_ms: float
    p99_ms: float


class Runner:
    """Runs one session on one fixed input; with `io_binding` (CUDA) the input is bound once per call
    from host memory and the outputs copied back, as the server does."""

    def __init__(self, session: ort.InferenceSession, rows: np.ndarray, io_binding: bool = False) -> None:
        self.session = session
        self.rows = rows
        self.input_name = session.get_inputs()[0].name
        self.outputs = [o.name for o in session.get_outputs()]
        self.io_binding = io_binding

    def __call__(self) -> None:
        if self.io_binding:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, self.rows)
            for name in self.outputs:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            binding.copy_outputs_to_cpu()
        else:
            self.session.run(self.outputs, {self.input_name: self.rows})


def time_interleaved(
    runners: dict[str, Runner], batch: int, seconds: float, rounds: int = 5, warmup: int = 3
) -> dict[str, Timing]:
    """Time every runner for about `seconds` in total, interleaved over `rounds` slices."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    latencies: dict[str, list[float]] = {name: [] for name in runners}
    spent = dict.fromkeys(runners, 0.0)
    slice_s = seconds / rounds
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                run()
                t1 = time.perf_counter()
                latencies[name].append(t1 - t0)
                if t1 - start >= slice_s:
                    break
            spent[name] += time.perf_counter() - start
    out = {}
    for name, lat in latencies.items():
        ms = np.asarray(lat) * 1000.0
        out[name] = Timing(
            graph=name,
            batch=batch,
            calls=len(lat),
            seconds=round(spent[name], 3),
            rows_per_s=round(batch * len(lat) / sum(lat), 1),
            p50_ms=round(float(np.percentile(ms, 50)), 4),
            p99_ms=round(float(np.percentile(ms, 99)), 4),
        )
    return out


def sample_rows(row_shape: tuple[int, ...], batch: int, seed: int = 0) -> np.ndarray:
    """Input rows in the raw feature range of our datasets (0..16); the cost does not depend on values."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 16.0, size=(batch, *row_shape)).astype(np.float32)
