"""Worker processes (part 3d): the same server with `--workers 1` and `--workers 2`, in one run.

Both servers run side by side on models/digits/1 (the server bench's settings: batch 64, delay 2 ms,
run-when-idle, ORT intra-op threads left at 0 so each worker gets cores / workers); wrk drives one
at a time with one-row and 32-row V2 JSON requests, alternating 1-worker and 2-worker cells for
`rounds` rounds, so both see the same machine load; medians over rounds are reported, with the
2-worker / 1-worker ratio of each round. An idle server costs nothing measurable (no polling on the
request path; the 2-worker follower stats one file every 50 ms).

The machine is shared: when other processes compete for the cores, the scheduler gives a server of
two processes a larger share than a server of one, which flatters the ratio. So each cell also
records the CPU time the server's processes used (utime + stime of the supervisor and every worker,
from /proc), and rows per CPU-second — the efficiency that decides how the rate scales with the
cores a server is given, whatever else runs.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import run_wrk, v2_body, warm_wrk
from bench.machine import Section
from bench.ort_timing import sample_rows
from bench.servers import digits_server
from bench.workloads import BUILD

PLANS = {
    "reduced": {"rounds": 3, "seconds": 8.0, "concurrencies": (32, 128)},
    "smoke": {"rounds": 1, "seconds": 2.0, "concurrencies": (32,)},
    "full": {"rounds": 5, "seconds": 15.0, "concurrencies": (8, 32, 128)},
}
ROW_SIZES = (1, 32)
WORKER_COUNTS = (1, 2)
SECTION = Section("### 3d. Worker processes: `--workers 2` vs `--workers 1`", "python -m bench workers")


def _bodies(work: Path) -> dict[int, Path]:
    paths = {}
    for n in ROW_SIZES:
        path = work / f"digits-{n}rows.json"
        path.write_bytes(v2_body(sample_rows((64,), n, seed=n)))
        paths[n] = path
    return paths


def _cpu_seconds(root: int) -> float:
    """utime + stime of `root` and all its descendants, in seconds."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def run(preset: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    plan = PLANS[preset]
    work = BUILD / "workers"
    work.mkdir(parents=True, exist_ok=True)
    bodies = _bodies(work)
    cells: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        urls, pids = {}, {}
        for count in WORKER_COUNTS:
            url, pids[count] = stack.enter_context(
                digits_server(work / f"workers-{count}.log", workers=str(count))
            )
            urls[count] = url
        for n_rows in ROW_SIZES:
            for conc in plan["concurrencies"]:
                for count in WORKER_COUNTS:  # open the connections, warm every worker's first batches
                    warm_wrk(f"{urls[count]}/v2/models/digits/infer", bodies[n_rows], conc)
                for r in range(plan["rounds"]):
                    for count in WORKER_COUNTS:
                        endpoint = f"{urls[count]}/v2/models/digits/infer"
                        load = os.getloadavg()[0]
                        cpu0 = _cpu_seconds(pids[count])
                        cell = run_wrk(endpoint, bodies[n_rows], conc, plan["seconds"], n_rows, warmup_s=0.0)
                        cpu = _cpu_seconds(pids[count]) - cpu0
                        row = {
                            "workers": count,
                            "round": r,
                            **asdict(cell),
                            "server_cpu_s": round(cpu, 2),
                            # rows answered per second of server CPU (the cell's wall time is wrk's)
                            "rows_per_cpu_s": round(cell.rows_per_s * cell.seconds / cpu, 1) if cpu else None,
                            "loadavg_1m": round(load, 2),
                        }
                        cells.setdefault(f"{n_rows}x{conc}", []).append(row)
                        log(
                            f"[workers {count}] {n_rows:>2} rows x {conc:>3} round {r}: "
                            f"{cell.rows_per_s:>9.1f} rows/s p50 {cell.p50_ms:.2f} ms "
                            f"p99 {cell.p99_ms:.2f} ms errors {cell.errors}, server CPU {cpu:.1f} s "
                            f"({row['rows_per_cpu_s']} rows/CPU-s, load {load:.2f})"
                        )
        for count in WORKER_COUNTS:  # every cell answered by a live, ready server
            httpx.get(f"{urls[count]}/v2/health/ready", timeout=5).raise_for_status()
    return {
        "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()},
        "cores_available": len(os.sched_getaffinity(0)),
        "cells": cells,
        "summary": summarise(cells),
    }


def summarise(cells: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for key, rows in cells.items():
        by = {c: [r for r in rows if r["workers"] == c] for c in WORKER_COUNTS}
        one, two = by[1], by[2]
        ratios = [b["rows_per_s"] / a["rows_per_s"] for a, b in zip(one, two, strict=True) if a["rows_per_s"]]
        out.append(
            {
                "cell": key,
                "rows_per_request": one[0]["rows_per_request"],
                "concurrency": one[0]["concurrency"],
                "rows_per_s": {c: statistics.median(r["rows_per_s"] for r in by[c]) for c in WORKER_COUNTS},
                "p50_ms": {c: statistics.median(r["p50_ms"] for r in by[c]) for c in WORKER_COUNTS},
                "p99_ms": {c: statistics.median(r["p99_ms"] for r in by[c]) for c in WORKER_COUNTS},
                "errors": {c: sum(r["errors"] for r in by[c]) for c in WORKER_COUNTS},
                "cores_used": {
                    c: statistics.median(r["server_cpu_s"] / r["seconds"] for r in by[c])
                    for c in WORKER_COUNTS
                },
                "rows_per_cpu_s": {
                    c: statistics.median(r["rows_per_cpu_s"] or 0.0 for r in by[c]) for c in WORKER_COUNTS
                },
                "speedup_per_round": [round(x, 3) for x in ratios],
                "speedup": round(statistics.median(ratios), 3) if ratios else None,
            }
        )
    return out


@SECTION.renders
def section(result: dict[str, Any]) -> str:
    plan = result["plan"]
    lines = SECTION.opening(
        result,
        f", load average at start {result.get('machine', {}).get('loadavg_at_start', '?')}. Both servers "
        "side by side on models/digits/1 (batch 64, delay 2 ms, ORT intra-op threads cores / workers), wrk "
        f"(2 threads) driving one at a time, {plan['rounds']} alternating rounds of {plan['seconds']:g} s "
        "per cell; medians (bench/workers.py).",
    )
    lines += [
        "| request | clients | rows/s, 1 worker | rows/s, 2 workers | speed-up (per round) "
        "| p50 ms 1 / 2 | p99 ms 1 / 2 | errors 1 / 2 | cores used 1 / 2 | rows per CPU-s 1 / 2 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in sorted(result["summary"], key=lambda s: (s["rows_per_request"], s["concurrency"])):
        rps, p50, p99, err = (s[k] for k in ("rows_per_s", "p50_ms", "p99_ms", "errors"))
        rounds = ", ".join(f"{x:.2f}" for x in s["speedup_per_round"])
        lines.append(
            f"| {s['rows_per_request']} row{'s' if s['rows_per_request'] > 1 else ''} "
            f"| {s['concurrency']} | {_get(rps, 1):.0f} | {_get(rps, 2):.0f} | "
            f"**{s['speedup']:.2f}x** ({rounds}) | {_get(p50, 1):.2f} / {_get(p50, 2):.2f} | "
            f"{_get(p99, 1):.2f} / {_get(p99, 2):.2f} | {_get(err, 1)} / {_get(err, 2)} | "
            f"{_get(s['cores_used'], 1):.2f} / {_get(s['cores_used'], 2):.2f} | "
            f"{_get(s['rows_per_cpu_s'], 1):.0f} / {_get(s['rows_per_cpu_s'], 2):.0f} |"
        )
    efficiency = [
        _get(s["rows_per_cpu_s"], 2) / _get(s["rows_per_cpu_s"], 1)
        for s in result["summary"]
        if _get(s["rows_per_cpu_s"], 1)
    ]
    if efficiency:
        low, high = min(efficiency), max(efficiency)
        lines += [
            "",
            "How to read it: the speed-up is what this run's machine gave, and the machine was shared "
            "(load average above): a server of two processes gets a larger share of contended cores "
            "than a server of one, so it tracks the *cores used* columns. Rows per CPU-second do not "
            f"depend on that share: 2 workers do {low:.2f}–{high:.2f}× the work per CPU-second of 1 "
            "(thinner batches per worker against no contention for one event loop). One worker is one "
            "event loop that does this model's HTTP work (in this run it never used more than "
            f"{max(_get(s['cores_used'], 1) for s in result['summary']):.2f} cores), so with the "
            "cores free the expected speed-up is about N × that ratio for N workers on N cores: "
            f"{2 * low:.1f}–{2 * high:.1f}× for 2 on this 2-core machine if wrk ran elsewhere, "
            "linear per core up to the core count, and nothing past it.",
        ]
    return "\n".join(lines)


def _get(by_count: dict[Any, Any], count: int) -> Any:
    # JSON turns the integer keys into strings
    return by_count.get(count, by_count.get(str(count)))
