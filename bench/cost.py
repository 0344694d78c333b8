"""Part 2 — serving cost: Hydra vs the ensemble it replaces vs one member, in-process ONNX Runtime.

For each workload and batch size, the three graphs are timed in the same run (interleaved, see
bench.ort_timing) and their FLOPs counted from the graphs (bench.flops). The claim under test:
Hydra's speedup over the ensemble is at least 0.9x the ensemble/Hydra FLOP ratio at every batch size.
"""

from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.flops import count_flops
from bench.ort_timing import Runner, make_session, sample_rows, time_interleaved
from bench.workloads import REPO_ROOT, Workload

TARGET_FRACTION_OF_FLOP_RATIO = 0.9


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def run_cost(
    workloads: list[Workload],
    batches: tuple[int, ...] = (1, 64, 256),
    seconds: float = 3.0,
    provider: str = "CPUExecutionProvider",
    io_binding: bool = False,
    threads: int = 0,
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "provider": provider,
        "io_binding": io_binding,
        "intra_op_threads": threads,
        "batches": list(batches),
        "seconds_per_cell": seconds,
        "workloads": {},
    }
    for w in workloads:
        w.ensure_member()
        graphs = w.graphs
        flops = {g: count_flops(p, batch=1) for g, p in graphs.items()}
        sessions = {g: make_session(p, provider, threads) for g, p in graphs.items()}
        row_shape = tuple(int(d) for d in sessions["hydra"].get_inputs()[0].shape[1:])
        flop_ratio = flops["ensemble"].total / flops["hydra"].total
        cells = []
        for b in batches:
            rows = sample_rows(row_shape, b)
            runners = {g: Runner(s, rows, io_binding) for g, s in sessions.items()}
            timing = time_interleaved(runners, b, seconds * len(runners))
            speedup = timing["hydra"].rows_per_s / timing["ensemble"].rows_per_s
            cells.append(
                {
                    "batch": b,
                    "timings": {g: asdict(t) for g, t in timing.items()},
                    "speedup_vs_ensemble": round(speedup, 3),
                    "speedup_over_flop_ratio": round(speedup / flop_ratio, 3),
                    "target_met": speedup >= TARGET_FRACTION_OF_FLOP_RATIO * flop_ratio,
                    "hydra_vs_member_cost": round(
                        timing["member"].rows_per_s / timing["hydra"].rows_per_s, 3
                    ),
                }
            )
        results["workloads"][w.name] = {
            "package": _relative(w.package),
            "flops_per_row": {g: f.total for g, f in flops.items()},
            "flops_by_op": {g: dict(f.by_op) for g, f in flops.items()},
            "matmul_share": {g: round(f.matmul_share, 4) for g, f in flops.items()},
            "flop_ratio_ensemble_over_hydra": round(flop_ratio, 3),
            "flop_ratio_hydra_over_member": round(flops["hydra"].total / flops["member"].total, 4),
            "cells": cells,
        }
    results["machine"] = platform.processor() or platform.machine()
    return results
