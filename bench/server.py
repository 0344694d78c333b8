"""Part 3 — the server under load, compared in one run on the same model and the same requests:

  (a) hydra        our server, dynamic batching (max batch B rows, queue delay d)
  (a) hydra-lean   the same server asked for four outputs only (`outputs`: probabilities,
                   mutual_information, disagreement, variance)
  (b) hydra-b1     our server, batching off (max batch size 1: every row is its own model run)
  (a') hydra-delay our server, batching with Triton's rule: wait up to the delay even on an idle model
  (c) triton       Triton + PyTriton, dynamic batcher (same B and d), Python backend calling ORT
  (c) triton-lean  the same Triton asked for the same four outputs (equal answers with hydra-lean)
  (e) ceiling-asgi     a bare ASGI app on the same uvicorn: parse the body (orjson), answer fixed bytes
  (f) ceiling-fastapi  the same as a FastAPI route (`bench.ceilings`); both answer hydra-lean's bytes
  (d) ORT          in-process ONNX Runtime on model.onnx at the batch the cell could form

One-row and 32-row V2 JSON requests at each concurrency, from wrk in its own process on loopback.
Targets (issue 13): hydra-lean >= 2x triton-lean rows/s with p99 <= its, at concurrency 32;
hydra-lean one-row >= 50% of (f); (a) >= 4x (b) on the compute-bound model at 64 one-row clients;
32-row requests on the compute-bound model >= 50% of (d); one client: (a) >= (b) in rows/s and
p50, and at 32-128 one-row clients (a) no loss against (a'). Those two are judged on paired rounds
(bench/batching_rule.py: each server alone, started afresh every round, the order reversed each
round) with an A/A control, because the grid runs each server's cells minutes apart. A py-spy
profile of (a) is taken on the cells named in `profile_cells`.
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

from bench import batching_rule, profiling
from bench.loadgen import run_wrk, v2_body, warm_wrk
from bench.ort_timing import Runner, make_session, require_provider, sample_rows, time_interleaved
from bench.servers import (
    TritonUnavailable,
    ceiling_server,
    hydra_batch_stats,
    hydra_server,
    triton_batch_stats,
    triton_python,
    triton_server,
)
from bench.workloads import BUILD, Workload

CONFIGS = (
    "hydra",
    "hydra-lean",
    "hydra-b1",
    "hydra-delay",
    "triton",
    "triton-lean",
    "ceiling-asgi",
    "ceiling-fastapi",
)
CUDA = "CUDAExecutionProvider"
# the four tensors a lean request names in `outputs` (what the issue compared Triton on)
LEAN_OUTPUTS = ("probabilities", "mutual_information", "disagreement", "variance")
CEILINGS = ("ceiling-asgi", "ceiling-fastapi")


def server_of(config: str) -> str:
    """The server process a config runs on: hydra-lean shares hydra's, triton-lean Triton's."""
    return config.removesuffix("-lean")


def is_lean(config: str) -> bool:
    """Lean configs (and the ceilings, which answer hydra-lean's bytes) send the four-output body."""
    return config.endswith("-lean") or config in CEILINGS


class InProcessCeiling:
    """(d): in-process ORT on the workload's `model.onnx`, one session, timed at any batch on demand.

    Each cell's share of (d) divides by a timing taken right after that cell (the server idle), not by
    the table timed at the workload's start: on this shared VM the same timing drifted 44 % between
    two runs hours apart (mnist1d_wide, batch 64: 9,002 and 5,087 rows/s), and within a run's minutes
    the machine's speed moves too."""

    def __init__(self, w: Workload, provider: str) -> None:
        self.session = make_session(w.graphs["hydra"], provider)
        self.io_binding = provider == CUDA
        self.row_shape = tuple(int(d) for d in self.session.get_inputs()[0].shape[1:])

    def time(self, batch: int, seconds: float, rounds: int = 2) -> dict[str, Any]:
        runner = Runner(self.session, sample_rows(self.row_shape, batch), self.io_binding)
        return asdict(time_interleaved({"hydra": runner}, batch, seconds, rounds=rounds)["hydra"])


def _ceiling(timer: InProcessCeiling, batches: list[int], seconds: float) -> dict[int, dict[str, Any]]:
    return {b: timer.time(b, seconds) for b in batches}


def _bodies(w: Workload, row_sizes: tuple[int, ...], work: Path, lean: bool) -> dict[int, Path]:
    """One V2 JSON body per request size, with real-range rows (the same bytes for every server);
    `lean`: naming the four LEAN_OUTPUTS in `outputs`."""
    shape = tuple(int(d) for d in ort.InferenceSession(str(w.graphs["hydra"])).get_inputs()[0].shape[1:])
    paths = {}
    for n in row_sizes:
        path = work / f"{w.name}-{n}rows{'-lean' if lean else ''}.json"
        path.write_bytes(v2_body(sample_rows(shape, n, seed=n), outputs=LEAN_OUTPUTS if lean else None))
        paths[n] = path
    return paths


def _capture_answers(endpoint: str, bodies: dict[int, Path], work: Path, name: str) -> dict[int, Path]:
    """Our server's answer bytes to each lean body: what the ceiling servers answer with."""
    paths = {}
    for n, body in bodies.items():
        answer = httpx.post(
            endpoint, content=body.read_bytes(), headers={"Content-Type": "application/json"}, timeout=30
        )
        answer.raise_for_status()
        path = work / f"{name}-{n}rows-lean-answer.json"
        path.write_bytes(answer.content)
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
    paired_rounds: int = 3,
    aa_rounds: int = 4,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The grid (every config × cell, each server's cells back to back), then the batching rule's
    paired rounds (bench/batching_rule.py; `paired_rounds` 0 skips them), which judge its criteria,
    and their A/A control: two identical servers, `aa_rounds` alternating one-client cells (0: none)."""
    work = BUILD / "server"
    work.mkdir(parents=True, exist_ok=True)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    if any(server_of(c) == "triton" for c in configs):
        try:
            triton_python()
        except TritonUnavailable as exc:
            log(f"skipping Triton: {exc}")
            configs = tuple(c for c in configs if server_of(c) != "triton")
    if any(c in CEILINGS for c in configs) and not any(server_of(c) == "hydra" for c in configs):
        log("skipping the ceilings: they answer hydra-lean's bytes, and hydra is not in this run")
        configs = tuple(c for c in configs if c not in CEILINGS)
    cells = _cells(row_sizes, concurrencies, extra_one_row)
    result: dict[str, Any] = {
        "seconds_per_cell": seconds,
        "max_batch_size": max_batch_size,
        "max_queue_delay_ms": max_queue_delay_ms,
        "provider": provider,
        "configs": list(configs),
        "lean_outputs": list(LEAN_OUTPUTS),
        "workloads": {},
    }
    # each server once, its configs (full and lean answers) back to back in every cell
    servers = list(dict.fromkeys(server_of(c) for c in configs))
    for w in workloads:
        bodies = {lean: _bodies(w, row_sizes, work, lean) for lean in (False, True)}
        answers: dict[int, Path] = {}
        batches = sorted({min(r * c, max_batch_size) for r, c in cells} | {1})
        log(f"[{w.name}] in-process ceiling at batches {batches}")
        timer = InProcessCeiling(w, provider)
        ceiling = _ceiling(timer, batches, min(seconds, 2.0))
        rows: list[dict[str, Any]] = []
        failures: list[str] = []
        profiles: dict[str, Any] = {}
        for server_name in servers:
            variants = [c for c in configs if server_of(c) == server_name]
            log_file = work / f"{w.name}-{server_name}.log"
            server, stats = _server(
                server_name, w, max_batch_size, max_queue_delay_ms, log_file, provider, answers
            )
            try:
                with server as (url, pid):
                    if server_name.startswith("hydra"):  # the server says which provider its session runs on
                        serving_on = httpx.get(f"{url}/v1/models/{w.name}", timeout=10).json()["provider"]
                        require_provider(provider, serving_on)
                    endpoint = f"{url}/v2/models/{w.name}/infer"
                    if server_name == "hydra":
                        answers.update(_capture_answers(endpoint, bodies[True], work, w.name))
                    for n_rows, conc in cells:
                        for config in variants:
                            body = bodies[is_lean(config)][n_rows]
                            profile = config == "hydra" and (n_rows, conc) in profile_cells
                            row, prof = _measure(
                                config,
                                endpoint,
                                body,
                                n_rows,
                                conc,
                                seconds,
                                url,
                                w.name,
                                stats,
                                pid,
                                work / "profiles" / f"{w.name}-{config}-{n_rows}x{conc}.txt"
                                if profile
                                else None,
                                timer,
                                max_batch_size,
                            )
                            rows.append(row)
                            if prof is not None:
                                profiles[f"{n_rows}x{conc}"] = prof
                            log(
                                f"[{w.name}] {config:<15} {n_rows:>2} rows x {conc:>3}: "
                                f"{row['rows_per_s']:>9.1f} rows/s "
                                f"p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms "
                                f"errors {row['errors']} "
                                f"batch {row['mean_batch_rows']}"
                            )
                            _drain(endpoint, bodies[is_lean(config)][min(row_sizes)])
            except (RuntimeError, subprocess.SubprocessError, httpx.HTTPError) as exc:
                if server_name != "triton":
                    raise
                # the comparison server is someone else's software: report its failure, keep our cells
                log(f"[{w.name}] triton failed, its cells are missing: {exc}")
                failures.append(f"{w.name}/{server_name}: {exc}")
        paired = None
        rule = [c for c in batching_rule.CONFIGS if c in configs]
        if paired_rounds > 0 and len(rule) == len(batching_rule.CONFIGS) and provider != CUDA:
            paired = batching_rule.run_paired(
                w,
                bodies[False],
                rounds=paired_rounds,
                seconds=seconds,
                max_batch_size=max_batch_size,
                max_queue_delay_ms=max_queue_delay_ms,
                work=work,
                # the per-request cost criterion is judged on the digits model (see targets)
                web_floor=(bodies[True], answers)
                if w.name == "digits" and "ceiling-fastapi" in configs
                else None,
                log=log,
            )
            if aa_rounds > 0:
                paired["same_server_twice"] = batching_rule.same_server_twice(
                    w, bodies[False][1], instances=2, rounds=aa_rounds, seconds=seconds, work=work
                )
                log(f"[{w.name}] A/A control: {paired['same_server_twice']}")
        result["workloads"][w.name] = {
            "ceiling": {str(k): v for k, v in ceiling.items()},
            "cells": rows,
            "profiles": profiles,
            "failures": failures,
            "paired": paired,
            "targets": targets(rows, w.name, paired),
        }
    return result


def _server(
    name: str,
    w: Workload,
    max_batch_size: int,
    max_queue_delay_ms: float,
    log_file: Path,
    provider: str,
    answers: dict[int, Path],
) -> tuple[contextlib.AbstractContextManager[tuple[str, int]], Callable[[str, str], tuple[int, int]] | None]:
    """The server process of one config, and how to read its (batches, rows) counters."""
    if name == "triton":
        server = triton_server(
            w.package,
            w.name,
            max_batch_size=max_batch_size,
            max_queue_delay_ms=max_queue_delay_ms,
            log=log_file,
            cuda=provider == CUDA,
        )
        return server, triton_batch_stats
    if name in CEILINGS:
        return ceiling_server(name.removeprefix("ceiling-"), w.name, answers, log=log_file), None
    server = hydra_server(
        w.repository,
        w.name,
        max_batch_size=1 if name == "hydra-b1" else max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms,
        log=log_file,
        cuda=provider == CUDA,
        run_when_idle=name != "hydra-delay",
    )
    return server, hydra_batch_stats


def _measure(
    config: str,
    endpoint: str,
    body: Path,
    n_rows: int,
    conc: int,
    seconds: float,
    url: str,
    model: str,
    stats: Callable[[str, str], tuple[int, int]] | None,
    pid: int,
    profile_path: Path | None,
    timer: InProcessCeiling,
    max_batch_size: int,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One load cell: warm-up, the timed wrk run (py-spy alongside when asked), the server's counters,
    then (d) at the cell's batch, timed for 1 s with the server idle (the ceilings run no model)."""
    load_before = os.getloadavg()[0]
    warm_wrk(endpoint, body, conc)
    b0 = stats(url, model) if stats else None  # batches counted over the timed part only
    spy = profiling.start(pid, max(1.0, seconds - 1.0), profile_path) if profile_path else None
    cell = run_wrk(endpoint, body, conc, seconds, n_rows, warmup_s=0.0)
    prof = None
    if spy is not None and profile_path is not None:
        spy.wait(timeout=60)
        if profile_path.exists():
            prof = profiling.summarise(profile_path)
    mean_batch = None
    if stats is not None and b0 is not None:
        b1 = stats(url, model)
        runs, served = b1[0] - b0[0], b1[1] - b0[1]
        mean_batch = round(served / runs, 2) if runs else None
    ceiling_batch = min(n_rows * conc, max_batch_size)
    row = {
        "config": config,
        **asdict(cell),
        "mean_batch_rows": mean_batch,
        "ceiling_batch": ceiling_batch,
        "loadavg_1m": round(load_before, 2),
    }
    if config not in CEILINGS:
        adjacent = timer.time(ceiling_batch, 1.0)
        row["ceiling_adjacent"] = adjacent
        row["fraction_of_ceiling"] = round(cell.rows_per_s / adjacent["rows_per_s"], 4)
    return row, prof


def _find(rows: list[dict[str, Any]], config: str, n_rows: int, conc: int) -> dict[str, Any] | None:
    for r in rows:
        if r["config"] == config and r["rows_per_request"] == n_rows and r["concurrency"] == conc:
            return r
    return None


def targets(
    rows: list[dict[str, Any]], workload: str, paired: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The issue's criteria on this workload's cells; the batching rule's on the paired rounds
    when they ran (the grid's one-client cells are minutes apart, so they only judge without)."""
    out = []
    for ours, theirs, what in (
        ("hydra", "triton", "every answer tensor"),
        ("hydra-lean", "triton-lean", "lean"),
    ):
        for n_rows in sorted({r["rows_per_request"] for r in rows}):
            a, c = _find(rows, ours, n_rows, 32), _find(rows, theirs, n_rows, 32)
            if a and c:
                ratio = a["rows_per_s"] / c["rows_per_s"]
                label = (
                    "(a) >= 2x (c) rows/s at equal or lower p99, concurrency 32, "
                    if what != "lean"
                    else "(a) >= 2x (c) rows/s at equal or lower p99, both asked for the four lean outputs, "
                    "concurrency 32, "
                )
                out.append(
                    {
                        "target": label + f"{n_rows}-row requests",
                        "value": f"{ratio:.2f}x, p99 {a['p99_ms']:.1f} vs {c['p99_ms']:.1f} ms",
                        "met": bool(ratio >= 2.0 and a["p99_ms"] <= c["p99_ms"]),
                    }
                )
    lean, route, bare = (_find(rows, cfg, 1, 32) for cfg in ("hydra-lean", "ceiling-fastapi", "ceiling-asgi"))
    paired_floor = paired is not None and "ceiling-fastapi 1x32" in paired["summary"]
    # the per-request-bound model; the wide one is ORT-bound
    if lean and route and workload == "digits" and not paired_floor:
        share = lean["requests_per_s"] / route["requests_per_s"]
        versus_bare = (
            f"; {100 * lean['requests_per_s'] / bare['requests_per_s']:.0f}% of bare ASGI" if bare else ""
        )
        out.append(
            {
                "target": "(a) one-row lean >= 50% of (f), the FastAPI-route ceiling, concurrency 32",
                "value": f"{100 * share:.0f}% ({lean['requests_per_s']:,.0f} vs "
                f"{route['requests_per_s']:,.0f} req/s){versus_bare}",
                "met": bool(share >= 0.5),
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
    a, b = _find(rows, "hydra", 1, 1), _find(rows, "hydra-b1", 1, 1)
    if paired is not None:
        out += batching_rule.targets(paired)
    elif a and b:
        out.append(
            {
                "target": "one client: (a) >= (b) in rows/s and p50",
                "value": f"{a['rows_per_s']:,.0f} vs {b['rows_per_s']:,.0f} rows/s, "
                f"p50 {a['p50_ms']:.2f} vs {b['p50_ms']:.2f} ms",
                "met": bool(a["rows_per_s"] >= b["rows_per_s"] and a["p50_ms"] <= b["p50_ms"]),
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
    wide = [r for r in ours if r["rows_per_request"] == 32]
    if wide and workload != "digits":
        met = [r for r in wide if r["fraction_of_ceiling"] >= 0.5]
        shares = ", ".join(f"{100 * r['fraction_of_ceiling']:.0f}% (x{r['concurrency']})" for r in wide)
        out.append(
            {
                "target": "(a) 32-row requests on the compute-bound model >= 50% of (d)",
                "value": f"met in {len(met)}/{len(wide)} cells: {shares}",
                "met": len(met) == len(wide),
            }
        )
    return out
