"""Load from a separate process on loopback: wrk (Debian's `wrk`) with bench/wrk_post.lua.

wrk is a C client (event loop, keep-alive connections): on a 2-core machine it costs a fraction of a
core where a Python client would compete with the server for the CPU it measures. Each cell runs
`wrk -c <concurrency>` for a bounded duration after a short warm-up and reports rows/s, p50, p99 and
errors (connect/read/write/timeouts and non-2xx answers).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LUA = Path(__file__).resolve().parent / "wrk_post.lua"


class WrkMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class CellResult:
    requests: int
    seconds: float
    rows_per_request: int
    concurrency: int
    rows_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    non_2xx: int
    bytes_per_response: float  # HTTP response size, headers included (both servers answer the same tensors)


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise WrkMissing(
            "wrk not found: install Debian's package (apt-get install wrk) or run `make bench-deps`"
        )
    return path


def v2_body(rows: np.ndarray, input_name: str = "input", outputs: tuple[str, ...] | None = None) -> bytes:
    """A V2 JSON infer request for `rows` (n, *row_shape); no `outputs` (the default): every
    default output; else those named."""
    request: dict[str, object] = {
        "inputs": [
            {
                "name": input_name,
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.reshape(-1).round(4).tolist(),
            }
        ]
    }
    if outputs is not None:
        request["outputs"] = [{"name": name} for name in outputs]
    return json.dumps(request).encode()


def warm_wrk(
    url: str, body_file: Path, concurrency: int, seconds: float = 1.0, header_length: int | None = None
) -> None:
    """Open the connections and warm the server's first batches, untimed."""
    threads = max(1, min(2, concurrency))
    cmd = [
        wrk_binary(),
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
        "--",
        str(body_file),
        *([] if header_length is None else [str(header_length)]),
    ]
    subprocess.run(cmd, capture_output=True, check=True, timeout=seconds + 30)


def run_wrk(
    url: str,
    body_file: Path,
    concurrency: int,
    seconds: float,
    rows_per_request: int,
    warmup_s: float = 1.0,
    header_length: int | None = None,
) -> CellResult:
    """`header_length`: the body is a V2 binary-extension request whose JSON header has this length."""
    threads = max(1, min(2, concurrency))
    base = [wrk_binary(), f"-t{threads}", f"-c{concurrency}", "--timeout", "10s", "-s", str(LUA)]
    if warmup_s > 0:
        warm_wrk(url, body_file, concurrency, warmup_s, header_length)
    extra = [] if header_length is None else [str(header_length)]
    proc = subprocess.run(
        [*base, f"-d{max(1, round(seconds))}s", "--latency", url, "--", str(body_file), *extra],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"requests"')]
    if not line:
        raise RuntimeError(f"wrk printed no summary:\n{proc.stdout}\n{proc.stderr}")
    s = json.loads(line[-1])
    secs = s["duration_us"] / 1e6
    errors = sum(s["errors"].values())
    return CellResult(
        requests=s["requests"],
        seconds=round(secs, 3),
        rows_per_request=rows_per_request,
        concurrency=concurrency,
        rows_per_s=round(s["requests"] * rows_per_request / secs, 1),
        requests_per_s=round(s["requests"] / secs, 1),
        p50_ms=round(s["p50_us"] / 1000, 3),
        p99_ms=round(s["p99_us"] / 1000, 3),
        errors=errors,
        non_2xx=s["errors"]["status"],
        bytes_per_response=round(s["bytes"] / max(1, s["requests"]), 1),
    )
