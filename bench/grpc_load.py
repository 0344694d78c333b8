"""`python -m bench grpc`: Open Inference Protocol over gRPC vs V2 JSON vs V2 binary, in one run.

One hydra-serve process (HTTP and gRPC, the shipped `models/digits/1`, batch 64, 2 ms delay) and
three load generators in their own processes on loopback, each a C program so that the client is
not what is measured: wrk (HTTP/1.1 keep-alive, bench/wrk_post.lua) for V2 JSON and V2 binary, and
h2load (nghttp2's HTTP/2 load generator, Debian's `nghttp2-client`) for gRPC, sending a
pre-serialized, length-prefixed `ModelInferRequest` exactly as tritonclient.grpc builds it
(raw_input_contents). Every cell keeps 32 requests in flight: wrk 32 connections; h2load 4
connections x 8 streams (gRPC clients multiplex one channel).

Cells: one-row and 32-row requests, each protocol `rounds` times, interleaved (J B G J B G ...) so
drift on the shared machine hits all three alike. Per cell: rows/s, p50/p99, the client's and the
server's CPU time per request. gRPC status codes travel in HTTP/2 trailers, which h2load does not
read: errors are counted from the server's own `hydra_requests_total{protocol="grpc"}` (less the
CANCELLED streams h2load resets when its timed warm-up and run end, reported apart).

The client's ceiling, in the same run: h2load against `bench.grpc_echo` (a grpc.aio server on
uvloop, like ours, answering every call with the same answer bytes without work) — what this
machine pushes through a Python gRPC server that does nothing; and wrk's against the server's
cheapest HTTP route is in the existing §3 ceiling study. A py-spy profile of the server under the
one-row gRPC and JSON cells says where the time goes.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bench import profiling
from bench.loadgen import run_wrk, v2_body, warm_wrk
from bench.servers import REPO_ROOT, free_port, running

MODEL = "digits"
INFER = "/inference.GRPCInferenceService/ModelInfer"
IN_FLIGHT = 32
H2_CONNECTIONS = 4


class H2loadMissing(RuntimeError):
    pass


def h2load_binary() -> str:
    path = shutil.which("h2load")
    if path is None:
        raise H2loadMissing("h2load not found: apt-get install nghttp2-client (Debian)")
    return path


def _rows(n: int, features: int) -> np.ndarray:
    return (np.random.default_rng(n).random((n, features), dtype=np.float32) * 16).astype(np.float32)


def grpc_frame(rows: np.ndarray) -> bytes:
    """A ModelInferRequest as tritonclient.grpc sends it, in gRPC's length-prefixed framing."""
    from tritonclient.grpc import service_pb2  # the stock client's own messages

    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    message = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


def binary_body(rows: np.ndarray) -> tuple[bytes, int]:
    """A V2 binary-extension request (what tritonclient.http sends by default) and its JSON length."""
    raw = rows.astype("<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(rows.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    return header + raw, len(header)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_h2load(
    url: str, frame_file: Path, seconds: float, rows_per_request: int, log_dir: Path
) -> dict[str, Any]:
    """h2load for `seconds` (after a 1 s warm-up) with IN_FLIGHT streams; rows/s, p50/p99."""
    base = [
        h2load_binary(),
        "-c",
        str(H2_CONNECTIONS),
        "-m",
        str(IN_FLIGHT // H2_CONNECTIONS),
        "-t",
        "1",
        "-d",
        str(frame_file),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ]
    subprocess.run([*base, "-D", "1", url], capture_output=True, check=True, timeout=60)
    log = log_dir / "h2load-requests.tsv"
    cpu0 = _children_cpu_s()
    proc = subprocess.run(
        [*base, "-D", str(max(1, round(seconds))), "--log-file", str(log), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    client_cpu = _children_cpu_s() - cpu0
    out = proc.stdout
    finished = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    if not finished or not counts:
        raise RuntimeError(f"h2load printed no summary:\n{out}\n{proc.stderr}")
    done, failed = int(counts.group(2)), int(counts.group(4))
    # --log-file: one line per request: start (µs since run start), HTTP status, duration (µs)
    durations = np.array(
        [float(line.split("\t")[2]) for line in log.read_text().splitlines() if line.strip()]
    )
    secs = float(finished.group(1))
    return {
        "requests": done,
        "seconds": round(secs, 3),
        "rows_per_request": rows_per_request,
        "concurrency": IN_FLIGHT,
        "rows_per_s": round(done * rows_per_request / secs, 1),
        "requests_per_s": round(done / secs, 1),
        "p50_ms": round(float(np.percentile(durations, 50)) / 1000, 3) if durations.size else None,
        "p99_ms": round(float(np.percentile(durations, 99)) / 1000, 3) if durations.size else None,
        "http_failed": failed,
        "client_cpu_us_per_request": round(client_cpu / max(1, done) * 1e6, 1),
    }


def _wrk_cell(url: str, body: Path, seconds: float, rows: int, header_length: int | None) -> dict[str, Any]:
    warm_wrk(url, body, IN_FLIGHT, 1.0, header_length)
    cpu0 = _children_cpu_s()
    cell = run_wrk(url, body, IN_FLIGHT, seconds, rows, warmup_s=0.0, header_length=header_length)
    client_cpu = _children_cpu_s() - cpu0
    result = {
        k: getattr(cell, k)
        for k in ("requests", "seconds", "rows_per_request", "concurrency", "rows_per_s", "requests_per_s")
    }
    result |= {"p50_ms": cell.p50_ms, "p99_ms": cell.p99_ms, "errors": cell.errors, "non_2xx": cell.non_2xx}
    result["client_cpu_us_per_request"] = round(client_cpu / max(1, cell.requests) * 1e6, 1)
    return result


def _grpc_counts(http_url: str) -> dict[str, float]:
    text = httpx.get(f"{http_url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("hydra_requests_total{") and 'protocol="grpc"' in line and INFER in line:
            code = re.search(r'code="(\d+)"', line)
            if code:
                counts[code.group(1)] = float(line.rsplit(" ", 1)[1])
    return counts


@contextlib.contextmanager
def _hydra(log: Path) -> Iterator[tuple[str, str, int]]:
    """Our server on the shipped models, HTTP and gRPC on free ports: (HTTP url, gRPC target, pid)."""
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_")}
    cmd = [
        sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
        "--grpc-port", str(grpc_port), "--model-repository", str(REPO_ROOT / "models"),
        "--max-batch-size", "64", "--max-queue-delay-ms", "2", "--max-queue-size", "4096",
        "--execution-providers", "cpu", "--log-level", "warning",
    ]  # fmt: skip
    with running(cmd, env, f"http://127.0.0.1:{port}", MODEL, log, 120) as (url, pid):
        yield url, f"127.0.0.1:{grpc_port}", pid


@contextlib.contextmanager
def _echo(response: Path, kind: str = "grpc") -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_echo", kind, str(port), str(response)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line.decode(errors="replace"))
            if line.strip() == b"ready":
                break
        else:
            raise RuntimeError(f"bench.grpc_echo {kind} did not start: {''.join(lines)}")
        if kind == "http":
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", content=b"{}", timeout=1)
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("bench.grpc_echo http did not start")
                time.sleep(0.1)
            yield f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
        else:
            yield f"http://127.0.0.1:{port}{INFER}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _capture_answer(grpc_target: str, rows: np.ndarray) -> bytes:
    """The server's real answer bytes for `rows` (what the echo server then returns)."""
    import grpc

    with grpc.insecure_channel(grpc_target) as channel:
        response: bytes = channel.unary_unary(INFER)(grpc_frame(rows)[5:], timeout=30)
    return response


def _median_cell(cells: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(cells, key=lambda c: c["rows_per_s"])
    median = dict(ordered[len(ordered) // 2])
    median["rounds_rows_per_s"] = [c["rows_per_s"] for c in cells]
    return median


def run_grpc(
    seconds: float = 5.0,
    rounds: int = 3,
    row_sizes: tuple[int, ...] = (1, 32),
    profile: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    h2load_binary()
    work = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    features = 64  # models/digits/1: 8x8 images
    result: dict[str, Any] = {
        "model": f"models/{MODEL}/1",
        "seconds_per_cell": seconds,
        "rounds": rounds,
        "in_flight": IN_FLIGHT,
        "h2load_connections": H2_CONNECTIONS,
        "max_batch_size": 64,
        "max_queue_delay_ms": 2.0,
        "cells": {},
        "ceiling": {},
        "profiles": {},
    }
    bodies: dict[int, dict[str, Any]] = {}
    for n in row_sizes:
        rows = _rows(n, features)
        (work / f"json-{n}.json").write_bytes(v2_body(rows))
        binary, header_length = binary_body(rows)
        (work / f"binary-{n}.bin").write_bytes(binary)
        (work / f"grpc-{n}.bin").write_bytes(grpc_frame(rows))
        bodies[n] = {"header_length": header_length}
    with _hydra(work / "server.log") as (url, grpc_target, pid):
        infer_url = f"{url}/v2/models/{MODEL}/infer"
        grpc_url = f"http://{grpc_target}{INFER}"
        for n in row_sizes:
            (work / f"answer-{n}.bin").write_bytes(_capture_answer(grpc_target, _rows(n, features)))
            json_answer = httpx.post(infer_url, content=(work / f"json-{n}.json").read_bytes(), timeout=30)
            (work / f"answer-{n}.json").write_bytes(json_answer.content)
            cells: dict[str, list[dict[str, Any]]] = {"v2_json": [], "v2_binary": [], "grpc": []}
            for round_ in range(rounds):
                for protocol in cells:
                    cpu0 = _process_cpu_s(pid)
                    before = _grpc_counts(url)
                    if protocol == "grpc":
                        cell = run_h2load(grpc_url, work / f"grpc-{n}.bin", seconds, n, work)
                        after = _grpc_counts(url)
                        delta = {k: v - before.get(k, 0) for k, v in after.items()}
                        # 499 = CANCELLED: the streams still in flight when h2load's timed warm-up
                        # and run end (it resets them), not failures
                        cell["grpc_cancelled_at_end"] = delta.get("499", 0)
                        cell["grpc_non_ok"] = sum(v for k, v in delta.items() if k not in ("200", "499"))
                    elif protocol == "v2_json":
                        cell = _wrk_cell(infer_url, work / f"json-{n}.json", seconds, n, None)
                    else:
                        cell = _wrk_cell(
                            infer_url, work / f"binary-{n}.bin", seconds, n, bodies[n]["header_length"]
                        )
                    # server CPU over warm-up + cell, per request of the cell (an upper bound)
                    cell["server_cpu_us_per_request"] = round(
                        (_process_cpu_s(pid) - cpu0) / max(1, cell["requests"]) * 1e6, 1
                    )
                    cells[protocol].append(cell)
                    log(f"[{n} row(s)] round {round_ + 1} {protocol}: {cell['rows_per_s']:.0f} rows/s")
            result["cells"][str(n)] = {p: _median_cell(c) for p, c in cells.items()}
            medians = result["cells"][str(n)]
            result["cells"][str(n)]["ratios"] = {
                "grpc_over_v2_json": round(
                    medians["grpc"]["rows_per_s"] / medians["v2_json"]["rows_per_s"], 3
                ),
                "grpc_over_v2_binary": round(
                    medians["grpc"]["rows_per_s"] / medians["v2_binary"]["rows_per_s"], 3
                ),
                "v2_binary_over_v2_json": round(
                    medians["v2_binary"]["rows_per_s"] / medians["v2_json"]["rows_per_s"], 3
                ),
            }
        if profile and profiling.py_spy() is not None:
            for protocol in ("grpc", "v2_json"):
                out = work / f"profile-{protocol}.txt"
                spy = profiling.start(pid, max(2.0, seconds - 1), out)
                time.sleep(0.5)
                if protocol == "grpc":
                    run_h2load(grpc_url, work / "grpc-1.bin", seconds, 1, work)
                else:
                    _wrk_cell(infer_url, work / "json-1.json", seconds, 1, None)
                if spy is not None:
                    spy.wait(timeout=60)
                    if out.exists():
                        result["profiles"][f"{protocol}_1row"] = profiling.summarise(out, top=15)
    # The transports' ceilings: the same requests against servers doing no work, one per protocol
    for n in row_sizes:
        with _echo(work / f"answer-{n}.bin") as echo_url:
            cells = [run_h2load(echo_url, work / f"grpc-{n}.bin", seconds, n, work) for _ in range(rounds)]
        result["ceiling"][str(n)] = _median_cell(cells)
        with _echo(work / f"answer-{n}.json", "http") as echo_url:
            http_cells = [
                _wrk_cell(echo_url, work / f"json-{n}.json", seconds, n, None) for _ in range(rounds)
            ]
        result.setdefault("http_ceiling", {})[str(n)] = _median_cell(http_cells)
        log(f"[{n} row(s)] h2load -> grpc_echo ceiling: {cells[0]['requests_per_s']:.0f} req/s (round 1)")
    shutil.rmtree(work, ignore_errors=True)
    return result
