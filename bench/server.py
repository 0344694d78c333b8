"""Part 3 — the server under load, compared in one run on the same model and the same requests:

  (a) hydra      our server, dynamic batching (max batch B rows, queue delay d)
  (b) hydra-b1   our server, batching off (max batch size 1: every row is its own model run)
  (a') hydra-delay our server, batching with Triton's rule: wait up to the delay even on an idle model
  (c) triton     Triton + PyTriton, dynamic batcher (same B and d), Python backend calling ORT
  (d) ceiling    in-process ONNX Runtime on model.onnx at the batch the cell could form

One-row and 32-row V2 JSON requests at each concurrency, from wrk in its own process on loopback.
Targets: (a) >= 2x (c) rows/s with p99 <= (c)'s at concurrency 32; (a) >= 4x (b) on the
compute-bound model at 64 one-row clients; (a) >= 50% of (d). A py-spy profile of (a) is taken on
the cells named in `profile_cells`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import onnxruntime as ort

from bench import profiling
from bench.loadgen import run_wrk, v2_body, warm_wrk
from bench.ort_timing import Runner, make_session, require_provider, sample_rows, time_interleaved
from bench.servers import (
    TritonUnavailable,
    hydra_batch_stats,
    hydra_server,
    triton_batch_stats,
    triton_python,
    triton_server,
)
from bench.workloads import BUILD, Workload

CONFIGS = ("hydra", "hydra-b1", "hydra-delay", "triton")
CUDA = "CUDAExecutionProvider"


def _ceiling(w: Workload, batches: list[int], seconds: float, provider: str) -> dict[int, dict[str, Any]]:
    session = make_session(w.graphs["hydra"], provider)
    io_binding = provider == CUDA
    row_shape = tuple(int(d) for d in session.get_inputs()[0].shape[1:])
    out = {}
    for b in batches:
        runner = Runner(session, sample_rows(row_shape, b), io_binding)
        t = time_interleaved({"hydra": runner}, b, seconds, rounds=2)
        out[b] = asdict(t["hydra"])
    return out


def _bodies(w: Workload, row_sizes: tuple[int, ...], work: Path) -> dict[int, Path]:
    """One V2 JSON body per request size, with real-range rows (the same bytes for every server)."""
    shape = tuple(int(d) for d in ort.InferenceSession(str(w.graphs["hydra"])).get_inputs()[0].shape[1:])
    paths = {}
    for n in row_sizes:
        path = work / f"{w.name}-{n}rows.json"
        path.write_bytes(v2_body(sample_rows(shape, n, seed=n)))
        paths[n] = path
    return paths


def _drain(endpoint: str, body: Path) -> None:
    """Wait until the backlog a cell left behind (requests wrk gave up on are still queued) has run:
    both servers answer in arrival order, so a probe returns once the queue ahead of it is empty."""
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(
            endpoint, content=body.read_bytes(), headers={"Content-Type": "application/json"}, timeout=120
        )
    time.sleep(0.3)


def _cells(
    row_sizes: tuple[int, ...], concurrencies: tuple[int, ...], extra_one_row: tuple[int, ...]
) -> list[tuple[int, int]]:
    cells = [(r, c) for r in row_sizes for c in concurrencies]
    cells += [(1, c) for c in extra_one_row if (1, c) not in cells]
    return sorted(cells)


def run_server(
    workloads: list[Workload],
    *,
    seconds: float = 5.0,
    row_sizes: tuple[int, ...] = (1, 32),
    concurrencies: tuple[int, ...] = (1, 8, 32, 128),
    extra_one_row: tuple[int, ...] = (64,),
    max_batch_size: int = 64,
    max_queue_delay_ms: float = 2.0,
    configs: tuple[str, ...] = CONFIGS,
    profile_cells: tuple[tuple[int, int], ...] = ((1, 32), (32, 32), (1, 64)),
    provider: str = "CPUExecutionProvider",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    work = BUILD / "server"
    work.mkdir(parents=True, exist_ok=True)
    if "triton" in configs:
        try:
            triton_python()
        except TritonUnavailable as exc:
            log(f"skipping Triton: {exc}")
            configs = tuple(c for c in configs if c != "triton")
    cells = _cells(row_sizes, concurrencies, extra_one_row)
    result: dict[str, Any] = {
        "seconds_per_cell": seconds,
        "max_batch_size": max_batch_size,
        "max_queue_delay_ms": max_queue_delay_ms,
        "provider": provider,
        "configs": list(configs),
        "workloads": {},
    }
    for w in workloads:
        bodies = _bodies(w, row_sizes, work)
        batches = sorted({min(r * c, max_batch_size) for r, c in cells} | {1})
        log(f"[{w.name}] in-process ceiling at batches {batches}")
        ceiling = _ceiling(w, batches, min(seconds, 2.0), provider)
        rows: list[dict[str, Any]] = []
        failures: list[str] = []
        profiles: dict[str, Any] = {}
        for config in configs:
            batch = 1 if config == "hydra-b1" else max_batch_size
            log_file = work / f"{w.name}-{config}.log"
            if config == "triton":
                server = triton_server(
                    w.package,
                    w.name,
                    max_batch_size=batch,
                    max_queue_delay_ms=max_queue_delay_ms,
                    log=log_file,
                    cuda=provider == CUDA,
                )
                stats = triton_batch_stats
            else:
                server = hydra_server(
                    w.repository,
                    w.name,
                    max_batch_size=batch,
                    max_queue_delay_ms=max_queue_delay_ms,
                    log=log_file,
                    cuda=provider == CUDA,
                    run_when_idle=config != "hydra-delay",
                )
                stats = hydra_batch_stats
            try:
                with server as (url, pid):
                    if config != "triton":  # the server says which provider its session really runs on
                        serving_on = httpx.get(f"{url}/v1/models/{w.name}", timeout=10).json()["provider"]
                        require_provider(provider, serving_on)
                    endpoint = f"{url}/v2/models/{w.name}/infer"
                    for n_rows, conc in cells:
                        prof_path = work / "profiles" / f"{w.name}-{config}-{n_rows}x{conc}.txt"
                        load_before = os.getloadavg()[0]
                        warm_wrk(endpoint, bodies[n_rows], conc)
                        b0 = stats(url, w.name)  # batches counted over the timed part only
                        spy = None
                        if config == "hydra" and (n_rows, conc) in profile_cells:
                            spy = profiling.start(pid, max(1.0, seconds - 1.0), prof_path)
                        cell = run_wrk(endpoint, bodies[n_rows], conc, seconds, n_rows, warmup_s=0.0)
                        if spy is not None:
                            spy.wait(timeout=60)
                            if prof_path.exists():
                                profiles[f"{n_rows}x{conc}"] = profiling.summarise(prof_path)
                        b1 = stats(url, w.name)
                        runs, served = b1[0] - b0[0], b1[1] - b0[1]
                        ceiling_batch = min(n_rows * conc, max_batch_size)
                        row = {
                            "config": config,
                            **asdict(cell),
                            "mean_batch_rows": round(served / runs, 2) if runs else None,
                            "ceiling_batch": ceiling_batch,
                            "fraction_of_ceiling": round(
                                cell.rows_per_s / ceiling[ceiling_batch]["rows_per_s"], 4
                            ),
                            "loadavg_1m": round(load_before, 2),
                        }
                        rows.append(row)
                        log(
                            f"[{w.name}] {config:<8} {n_rows:>2} rows x {conc:>3}: "
                            f"{cell.rows_per_s:>9.1f} rows/s "
                            f"p50 {cell.p50_ms:.2f} ms p99 {cell.p99_ms:.2f} ms errors {cell.errors} "
                            f"batch {row['mean_batch_rows']}"
                        )
                        _drain(endpoint, bodies[min(row_sizes)])
            except (RuntimeError, subprocess.SubprocessError, httpx.HTTPError) as exc:
                if config != "triton":
                    raise
                # the comparison server is someone else's software: report its failure, keep our cells
                log(f"[{w.name}] triton failed, its cells are missing: {exc}")
                failures.append(f"{w.name}/{config}: {exc}")
        result["workloads"][w.name] = {
            "ceiling": {str(k): v for k, v in ceiling.items()},
            "cells": rows,
            "profiles": profiles,
            "failures": failures,
            "targets": targets(rows, w.name),
        }
    return result


def _find(rows: list[dict[str, Any]], config: str, n_rows: int, conc: int) -> dict[str, Any] | None:
    for r in rows:
        if r["config"] == config and r["rows_per_request"] == n_rows and r["concurrency"] == conc:
            return r
    return None


def targets(rows: list[dict[str, Any]], workload: str) -> list[dict[str, Any]]:
    out = []
    for n_rows in sorted({r["rows_per_request"] for r in rows}):
        a, c = _find(rows, "hydra", n_rows, 32), _find(rows, "triton", n_rows, 32)
        if a and c:
            ratio = a["rows_per_s"] / c["rows_per_s"]
            out.append(
                {
                    "target": "(a) >= 2x (c) rows/s at equal or lower p99, concurrency 32, "
                    f"{n_rows}-row requests",
                    "value": f"{ratio:.2f}x, p99 {a['p99_ms']:.1f} vs {c['p99_ms']:.1f} ms",
                    "met": bool(ratio >= 2.0 and a["p99_ms"] <= c["p99_ms"]),
                }
            )
    a, b = _find(rows, "hydra", 1, 64), _find(rows, "hydra-b1", 1, 64)
    if a and b and workload != "digits":
        ratio = a["rows_per_s"] / b["rows_per_s"]
        out.append(
            {
                "target": "(a) >= 4x (b) rows/s, compute-bound model, 64 concurrent one-row clients",
                "value": f"{ratio:.2f}x",
                "met": bool(ratio >= 4.0),
            }
        )
    ours = [r for r in rows if r["config"] == "hydra"]
    if ours:
        best = max(ours, key=lambda r: r["fraction_of_ceiling"])
        met = [r for r in ours if r["fraction_of_ceiling"] >= 0.5]
        out.append(
            {
                "target": "(a) >= 50% of (d), the in-process ORT ceiling at the same batch",
                "value": f"met in {len(met)}/{len(ours)} cells; "
                f"best {100 * best['fraction_of_ceiling']:.0f}% "
                f"({best['rows_per_request']} rows x {best['concurrency']})",
                "met": len(met) == len(ours),
            }
        )
    return out
