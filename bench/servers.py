"""Start the servers under test as separate processes on a free loopback port.

- `hydra_server`: `python -m service` (uvicorn, our settings as flags), one model repository.
- `ceiling_server`: `python -m bench.ceilings` (bare ASGI or a FastAPI route answering fixed bytes).
- `triton_server`: bench/triton_server.py under `.venv-triton` (Debian python3.11 + nvidia-pytriton).
Both yield (base URL, pid) once the model answers ready, and are stopped with SIGTERM.

`service_command` and `free_port` are the one way to start `python -m service` on a loopback port
(bench/gpu_run.py and tests/service/support.py use them too). Only the standard library is imported at
module level (httpx where it is used): bench/gpu_run.py runs on GPU hosts that have the service's
dependencies and not the dev ones.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TRITON_VENV = REPO_ROOT / ".venv-triton"
# PyTriton guards Triton's statistics API with a token; this process picks it and tells the server
TRITON_TOKEN = secrets.token_urlsafe(16)


class TritonUnavailable(RuntimeError):
    pass


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; the IANA range elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return 49152, 65535


# Ports handed out by this process: two calls must not return the same port before either is bound.
_handed_out: set[int] = set()


def free_port(span: int = 1) -> int:
    """A free loopback port p such that p..p+span-1 are free too (Triton takes three).

    Picked at random below the kernel's ephemeral range, never from it: a port the kernel hands out
    (bind to 0) is free now, but any outgoing connection on this machine - another test's client, a
    load generator - can take it as its local port before the server binds it. Seen in CI: the gRPC
    port, checked free, was an httpx connection's by the time the server started.
    """
    low, _ = _ephemeral_range()
    first, last = (10_000, low - span) if low - span > 10_000 else (1_024, low - span)
    chooser = random.SystemRandom()
    for _ in range(200):
        port = chooser.randrange(first, last)
        wanted = range(port, port + span)
        if _handed_out.intersection(wanted):
            continue
        try:
            for candidate in wanted:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        _handed_out.update(wanted)
        return port
    raise RuntimeError("no free loopback port range")


def service_command(port: int, repository: Path, *flags: str) -> list[str]:
    """`python -m service` on 127.0.0.1:`port` serving `repository`, then `flags` (settings as flags)."""
    return [
        sys.executable,
        "-m",
        "service",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model-repository",
        str(repository),
        *flags,
    ]


def _wait_ready(url: str, model: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/models/{model}/ready", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} not ready after {timeout_s}s")


@contextlib.contextmanager
def running(
    cmd: list[str], env: dict[str, str], url: str, model: str, log: Path, timeout_s: float
) -> Iterator[tuple[str, int]]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            _wait_ready(url, model, process, timeout_s)
            yield url, process.pid
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def hydra_server(
    repository: Path,
    model: str,
    *,
    max_batch_size: int,
    max_queue_delay_ms: float,
    log: Path,
    cuda: bool = False,
    run_when_idle: bool = True,
    settings: dict[str, str] | None = None,
) -> contextlib.AbstractContextManager[tuple[str, int]]:
    """`settings`: extra HYDRA_<NAME> variables, e.g. {"shadow_fraction": "0.01"}."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_")}
    env |= {f"HYDRA_{k.upper()}": v for k, v in (settings or {}).items()}
    cmd = service_command(
        port,
        repository,
        "--max-batch-size",
        str(max_batch_size),
        "--max-queue-delay-ms",
        str(max_queue_delay_ms),
        "--log-level",
        "warning",
        "--max-queue-size",
        "4096",
        "--run-when-idle",
        str(run_when_idle).lower(),
        "--execution-providers",
        "cuda" if cuda else "cpu",
        "--grpc-port",
        "0",  # HTTP only here; `python -m bench grpc` (bench/grpc.py) runs the gRPC comparison
    )
    return running(cmd, env, f"http://127.0.0.1:{port}", model, log, 120)


def digits_server(log: Path, **settings: str) -> contextlib.AbstractContextManager[tuple[str, int]]:
    """Our server on the committed models/digits/1 as the shadow and workers runs start it (max batch
    64, queue delay 2 ms); `settings`: extra HYDRA_<NAME> variables, e.g. shadow_fraction="0.01"."""
    return hydra_server(
        REPO_ROOT / "models", "digits", max_batch_size=64, max_queue_delay_ms=2.0, log=log, settings=settings
    )


def ceiling_server(
    kind: str, model: str, answers: dict[int, Path], *, log: Path
) -> contextlib.AbstractContextManager[tuple[str, int]]:
    """`bench.ceilings` (kind `asgi` or `fastapi`): `answers[rows]` to each request of that many rows."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "bench.ceilings",
        kind,
        str(port),
        *(f"{rows}={path}" for rows, path in sorted(answers.items())),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_")}
    return running(cmd, env, f"http://127.0.0.1:{port}", model, log, 60)


def triton_python() -> Path:
    python = TRITON_VENV / "bin" / "python"
    if not python.exists():
        raise TritonUnavailable(
            f"{python} missing: run `make bench-triton-venv` (Debian python3.11 + nvidia-pytriton)"
        )
    return python


def triton_server(
    package: Path,
    model: str,
    *,
    max_batch_size: int,
    max_queue_delay_ms: float,
    log: Path,
    cuda: bool = False,
) -> contextlib.AbstractContextManager[tuple[str, int]]:
    port = free_port(span=3)
    cmd = [
        str(triton_python()),
        str(REPO_ROOT / "bench" / "triton_server.py"),
        "--package",
        str(package),
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
        "--max-queue-delay-us",
        str(int(max_queue_delay_ms * 1000)),
        "--provider",
        "cuda" if cuda else "cpu",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["BENCH_TRITON_TOKEN"] = TRITON_TOKEN
    return running(cmd, env, f"http://127.0.0.1:{port}", model, log, 180)


def hydra_batch_stats(url: str, model: str) -> tuple[int, int]:
    """(batches, rows) our batcher has run so far (V1 model metadata)."""
    import httpx

    b = httpx.get(f"{url}/v1/models/{model}", timeout=5).json()["batching"]
    return int(b["batches"]), int(b["rows"])


def triton_batch_stats(url: str, model: str) -> tuple[int, int]:
    """(executions, inferences) from Triton's statistics extension."""
    import httpx

    headers = {"triton-access-token": TRITON_TOKEN}
    s = httpx.get(f"{url}/v2/models/{model}/stats", timeout=5, headers=headers).json()["model_stats"][0]
    return int(s["execution_count"]), int(s["inference_count"])
