"""The in-process load generator: raw HTTP/1.1 keep-alive connections on asyncio (bench and tests).

httpx costs about a millisecond of client CPU per request; on a 2-core machine shared with the
server that would cap the offered load below what the overload tests and bench/load.py need. This
client writes the request bytes itself and reads `Content-Length` bodies (all the server sends),
nothing more. (Load from a separate process, with wrk: bench/loadgen.py.)

- `closed_loop`: `concurrency` workers, each sending its next request as soon as the last answered.
- `open_loop`: requests released on a fixed schedule (`rate` per second) whatever the answers do;
  `connections` workers take them in order. `Outcome.late_s` says how far behind schedule a request
  started (the client's own backlog, reported so a too-slow client cannot pass for a fast server).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sized
from dataclasses import dataclass
from urllib.parse import urlsplit

BodyFactory = Callable[[int], bytes]


@dataclass
class Outcome:
    """One request: its index, status (0 = transport error), headers, body and times (perf_counter)."""

    index: int
    status: int
    headers: dict[str, str]
    body: bytes
    scheduled: float
    started: float
    finished: float
    error: str = ""

    @property
    def latency_s(self) -> float:
        return self.finished - self.started

    @property
    def late_s(self) -> float:
        return self.started - self.scheduled


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closes it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _ensure_open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        reader, writer = await self._ensure_open()
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Content-Length: {len(body)}",
        ]
        if body:
            lines.append("Content-Type: application/json")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            raise
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        response_headers: dict[str, str] = {}
        for line in header_lines:
            if ":" in line:
                key, _, value = line.partition(":")
                response_headers[key.strip().lower()] = value.strip()
        payload = await reader.readexactly(int(response_headers.get("content-length", "0")))
        if response_headers.get("connection", "").lower() == "close":
            await self.close()
        return status, response_headers, payload

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


async def _send(
    connection: Connection, path: str, index: int, body: bytes, scheduled: float, headers: dict[str, str]
) -> Outcome:
    started = time.perf_counter()
    try:
        status, response_headers, payload = await connection.request("POST", path, body, headers)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        await connection.close()
        return Outcome(index, 0, {}, b"", scheduled, started, time.perf_counter(), repr(exc))
    return Outcome(index, status, response_headers, payload, scheduled, started, time.perf_counter())


async def _workers(
    url: str,
    path: str,
    make_body: BodyFactory,
    headers: dict[str, str],
    count: int,
    next_job: Callable[[], Awaitable[tuple[int, float] | None]],
    outcomes: list[Outcome],
) -> None:
    """`count` workers, each on its own connection, sending the jobs `next_job` gives (a request's
    index and the time it was due) one after another, appending to `outcomes`, until it gives None."""

    async def worker() -> None:
        connection = Connection(url)
        try:
            while (job := await next_job()) is not None:
                index, scheduled = job
                outcomes.append(await _send(connection, path, index, make_body(index), scheduled, headers))
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(count)))


async def closed_loop(
    url: str,
    path: str,
    make_body: BodyFactory,
    *,
    concurrency: int,
    duration_s: float,
    first_index: int = 0,
    headers: dict[str, str] | None = None,
    stop: asyncio.Event | None = None,
    outcomes: list[Outcome] | None = None,
) -> list[Outcome]:
    """`concurrency` workers, each with its own connection, for `duration_s` (or until `stop`).

    `outcomes`: the list answers are appended to as they come (a caller can watch the load run)."""
    outcomes = [] if outcomes is None else outcomes
    counter = iter(range(first_index, 1 << 62))
    deadline = time.perf_counter() + duration_s

    async def next_job() -> tuple[int, float] | None:
        if time.perf_counter() >= deadline or (stop is not None and stop.is_set()):
            return None
        return next(counter), time.perf_counter()

    await _workers(url, path, make_body, headers or {}, concurrency, next_job, outcomes)
    return outcomes


async def open_loop(
    url: str,
    path: str,
    make_body: BodyFactory,
    *,
    rate: float,
    duration_s: float,
    connections: int,
    first_index: int = 0,
    headers: dict[str, str] | None = None,
) -> list[Outcome]:
    """`rate` requests per second for `duration_s`, released on schedule, over `connections` workers."""
    outcomes: list[Outcome] = []
    total = int(rate * duration_s)
    t0 = time.perf_counter() + 0.05
    schedule: asyncio.Queue[int | None] = asyncio.Queue()

    async def release() -> None:
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            schedule.put_nowait(i)
        for _ in range(connections):
            schedule.put_nowait(None)

    async def next_job() -> tuple[int, float] | None:
        i = await schedule.get()
        return None if i is None else (first_index + i, t0 + i / rate)

    await asyncio.gather(
        release(), _workers(url, path, make_body, headers or {}, connections, next_job, outcomes)
    )
    return outcomes


async def until_answered(outcomes: Sized, count: int, timeout_s: float = 30.0) -> None:
    """Wait until `outcomes` (the list a running load appends its answers to) holds `count` of them;
    raise after `timeout_s`. Counts, not sleeps: the box may be busy."""
    deadline = time.perf_counter() + timeout_s
    while len(outcomes) < count:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{len(outcomes)} of {count} answers after {timeout_s}s")
        await asyncio.sleep(0.01)


def throughput(outcomes: list[Outcome], status: int = 200) -> float:
    """Answers with `status` per second over the span from the first start to the last finish."""
    chosen = [o for o in outcomes if o.status == status]
    if not chosen:
        return 0.0
    span = max(o.finished for o in chosen) - min(o.started for o in outcomes)
    return len(chosen) / span if span > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))]
