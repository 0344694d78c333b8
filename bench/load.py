"""Short, bounded load test of the V1 predict route: rows/s and latency with batching on and off.

Starts `python -m service` on a free loopback port for each configuration (bench.servers; batching
on: the given max batch size and queue delay; off: max_batch_size=1), sends a fixed number of
requests from a fixed number of concurrent keep-alive clients (bench.http_load's raw HTTP/1.1, or
httpx with --client httpx), and prints rows/s, requests/s, p50 and p99.

    .venv/bin/python -m bench.load                      # models/digits, 2000 one-row requests, 32 clients
    .venv/bin/python -m bench.load --requests 500 --concurrency 16 --rows 4 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from bench.http_load import Connection
from bench.servers import REPO_ROOT, hydra_server


@dataclass(frozen=True)
class Result:
    config: str
    max_batch_size: int
    requests: int
    rows_per_request: int
    concurrency: int
    errors: int
    seconds: float
    rows_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch_rows: float


@contextlib.contextmanager
def serve(repository: Path, model: str, max_batch_size: int, delay_ms: float) -> Iterator[str]:
    """The server under test (bench.servers, the one starter); its log in a temporary file."""
    with tempfile.TemporaryDirectory(prefix="bench-load-") as logs:
        log = Path(logs) / "server.log"
        with hydra_server(
            repository, model, max_batch_size=max_batch_size, max_queue_delay_ms=delay_ms, log=log
        ) as (url, _):
            yield url


Send = Callable[[bytes], Awaitable[int]]  # one request body -> its status code


async def _drain(payloads: list[bytes], senders: list[Send]) -> tuple[list[float], int, float]:
    """Every payload sent once, each sender taking the next as soon as its last one was answered:
    (latencies in s, answers other than 200, wall seconds)."""
    latencies: list[float] = []
    errors = 0
    queue = iter(payloads)  # shared by the workers: next() runs between awaits, never inside one

    async def worker(send: Send) -> None:
        nonlocal errors
        for body in queue:
            t0 = time.perf_counter()
            status = await send(body)
            latencies.append(time.perf_counter() - t0)
            errors += status != 200

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(send) for send in senders))
    return latencies, errors, time.perf_counter() - t0


async def drive_raw(
    url: str, model: str, payloads: list[bytes], concurrency: int
) -> tuple[list[float], int, float]:
    """Keep-alive HTTP/1.1 over asyncio streams (bench.http_load): ~10x less client CPU than httpx,
    so on a small box the numbers describe the server rather than the load generator."""
    path = f"/v1/models/{model}:predict"
    connections = [Connection(url) for _ in range(concurrency)]

    def sender(connection: Connection) -> Send:
        async def send(body: bytes) -> int:
            status, _, _ = await connection.request("POST", path, body)
            return status

        return send

    try:
        # every connection open and answered once before the clock starts
        await asyncio.gather(*(c.request("POST", path, payloads[0]) for c in connections))
        return await _drain(payloads, [sender(c) for c in connections])
    finally:
        await asyncio.gather(*(c.close() for c in connections))


async def drive_httpx(
    url: str, model: str, payloads: list[bytes], concurrency: int
) -> tuple[list[float], int, float]:
    path = f"/v1/models/{model}:predict"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30, headers=headers) as client:

        async def send(body: bytes) -> int:
            return (await client.post(path, content=body)).status_code

        # warm the connections and the model's first batches before timing
        await asyncio.gather(*(send(payloads[0]) for _ in range(concurrency)))
        return await _drain(payloads, [send] * concurrency)


def mean_batch_rows(url: str, model: str) -> float:
    batching = httpx.get(f"{url}/v1/models/{model}").json()["batching"]
    return batching["rows"] / max(1, batching["batches"])


def run(args: argparse.Namespace) -> list[Result]:
    rng = np.random.default_rng(0)
    meta_features = None
    results = []
    configs = [("batching on", args.max_batch_size), ("batching off", 1)]
    for name, batch in configs:
        with serve(args.repository, args.model, batch, args.max_queue_delay_ms) as url:
            if meta_features is None:
                shape = httpx.get(f"{url}/v1/models/{args.model}").json()["input"]["shape"][1:]
                meta_features = shape
            payloads = [
                json.dumps(
                    {"instances": rng.uniform(0, 16, (args.rows, *meta_features)).round(1).tolist()}
                ).encode()
                for _ in range(args.requests)
            ]
            drive = drive_raw if args.client == "raw" else drive_httpx
            latencies, errors, seconds = asyncio.run(drive(url, args.model, payloads, args.concurrency))
            lat = np.asarray(latencies) * 1000
            results.append(
                Result(
                    config=name,
                    max_batch_size=batch,
                    requests=args.requests,
                    rows_per_request=args.rows,
                    concurrency=args.concurrency,
                    errors=errors,
                    seconds=round(seconds, 3),
                    rows_per_s=round(args.requests * args.rows / seconds, 1),
                    requests_per_s=round(args.requests / seconds, 1),
                    p50_ms=round(float(np.percentile(lat, 50)), 2),
                    p99_ms=round(float(np.percentile(lat, 99)), 2),
                    mean_batch_rows=round(mean_batch_rows(url, args.model), 2),
                )
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--requests", type=int, default=2000, help="requests per configuration (bounded)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw",
                        help="load generator: raw asyncio HTTP/1.1 (cheap) or httpx")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 512:
        parser.error("keep it bounded: 1..100000 requests, 1..512 concurrent clients")
    results = run(args)
    header = (
        f"{'config':<13} {'batch':>5} {'rows/s':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'rows/batch':>10} {'errors':>6}"
    )
    print(header)
    for r in results:
        print(f"{r.config:<13} {r.max_batch_size:>5} {r.rows_per_s:>9.1f} {r.requests_per_s:>8.1f} "
              f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.mean_batch_rows:>10.2f} {r.errors:>6}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
