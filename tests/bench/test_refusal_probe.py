"""bench/refusal_probe.py, goodput.sh's timer of fresh-connection requests: open loop, by status."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class SlowRefusals(BaseHTTPRequestHandler):
    """Every POST: its body read, 0.2 s, then 503 (odd requests) or 200."""

    numbers = itertools.count(1)  # next() is atomic under the GIL: handler threads share it

    def do_POST(self) -> None:  # the stdlib handler's name for POST
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(0.2)
        status = 503 if next(SlowRefusals.numbers) % 2 else 200
        body = b'{"error": "busy"}' if status == 503 else b"{}"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_probes_are_sent_open_loop_and_timed_by_status(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowRefusals)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    body = tmp_path / "body.json"
    body.write_text('{"instances": [[0.0]]}')
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/models/m:predict"
        done = subprocess.run(
            [sys.executable, "-m", "bench.refusal_probe", url, str(body), "1.0"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    counts = {status: summary[status]["count"] for status in ("200", "503")}
    # one probe every 50 ms for 1 s, none waiting for the one before (one at a time: 5 in 1 s)
    assert 16 <= counts["200"] + counts["503"] <= 21, summary
    assert abs(counts["200"] - counts["503"]) <= 1 and summary["unanswered"] == 0
    for status in ("200", "503"):
        assert 195 <= summary[status]["p50_ms"] < 1000, summary  # the server's 0.2 s, per request
