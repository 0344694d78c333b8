"""`python -m bench.refusal_probe URL BODY_FILE SECONDS`: how fast an overloaded server answers, by status.

A raw-socket client for `bench/goodput.sh`: while wrk overloads the server, it sends the same POST
on a fresh connection every 50 ms, open loop (a probe does not wait for the one before: a served
probe takes seconds under overload, and one at a time gave 2-14 probes a cell, too few for a p99;
20 requests/s is ~2 % of the capacity), times each from the request's first byte to the answer's last,
and prints one JSON line: count, p50 and p99 per status (503 = refused, 200 = served) and the
probes that got no answer within 10 s. wrk's own latency percentiles mix served and refused
answers; this separates them.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np


def _probe(host: str, port: int, request: bytes, timeout_s: float = 10.0) -> tuple[int, float] | None:
    """(status, seconds from first byte sent to answer read whole), or None on timeout / reset."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            start = time.perf_counter()
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            length = int(fields.get("content-length", "0"))
            while len(rest) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return int(lines[0].split(" ", 2)[1]), time.perf_counter() - start
    except OSError:
        return None


def main() -> None:
    url, body, seconds = urlsplit(sys.argv[1]), Path(sys.argv[2]).read_bytes(), float(sys.argv[3])
    host, port = url.hostname or "127.0.0.1", url.port or 80
    request = (
        f"POST {url.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    by_status: dict[int, list[float]] = {}
    unanswered = 0
    start, interval = time.monotonic(), 0.05
    with ThreadPoolExecutor(max_workers=int(10.0 / interval) + 1) as pool:  # each lives ≤ 10 s
        probes = []
        while (due := start + len(probes) * interval) < start + seconds:
            time.sleep(max(0.0, due - time.monotonic()))
            probes.append(pool.submit(_probe, host, port, request))
        for probe in probes:
            result = probe.result()
            if result is None:
                unanswered += 1
            else:
                by_status.setdefault(result[0], []).append(result[1])
    summary: dict[str, object] = {"unanswered": unanswered}
    for status, latencies in sorted(by_status.items()):
        ms = np.asarray(latencies) * 1000
        summary[str(status)] = {
            "count": len(latencies),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
