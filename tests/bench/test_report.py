"""BENCHMARKS.md sections render what the results say, including missed targets."""

from __future__ import annotations

from typing import Any

from bench.report import cost_section, headline, server_section

MACHINE = {
    "date_utc": "2026-01-01T00:00:00+00:00",
    "cpu": "cpu",
    "cores": 2,
    "memory_gib": 1.0,
    "gpu": None,
    "git_commit": "abc",
    "loadavg_at_start": [0.1, 0.1, 0.1],
    "busiest_processes_at_start": [],
    "command": "python -m bench cost",
    "versions": {"onnxruntime": "1.0"},
}


def _timing(rps: float) -> dict[str, float]:
    return {"rows_per_s": rps, "p50_ms": 1.0, "p99_ms": 2.0}


def _cost() -> dict[str, Any]:
    cells = [
        {
            "batch": 1,
            "timings": {"hydra": _timing(700), "ensemble": _timing(100), "member": _timing(800)},
            "speedup_vs_ensemble": 7.0,
            "speedup_over_flop_ratio": 0.875,
            "target_met": False,
        },
        {
            "batch": 64,
            "timings": {"hydra": _timing(8000), "ensemble": _timing(1000), "member": _timing(9000)},
            "speedup_vs_ensemble": 8.0,
            "speedup_over_flop_ratio": 1.0,
            "target_met": True,
        },
    ]
    workload = {
        "package": "models/x/1",
        "flops_per_row": {"hydra": 10, "ensemble": 80, "member": 9},
        "flop_ratio_ensemble_over_hydra": 8.0,
        "flop_ratio_hydra_over_member": 1.11,
        "cells": cells,
    }
    return {
        "machine": MACHINE,
        "provider": "CPUExecutionProvider",
        "io_binding": False,
        "seconds_per_cell": 1,
        "workloads": {"x": workload},
    }


def test_cost_section_marks_each_batch() -> None:
    text = cost_section(_cost())
    assert "| 1 | 700 | 100 | 800 |" in text and "**missed**" in text
    assert "| 64 | 8,000 | 1,000 | 9,000 |" in text and "**met**" in text
    assert "FLOP ratio ensemble / Hydra = **8.00**" in text
    assert "missed at some batch" in headline(None, _cost(), None)


def test_server_section_shows_every_cell_and_target() -> None:
    cell = {
        "config": "hydra",
        "rows_per_request": 1,
        "concurrency": 32,
        "rows_per_s": 500.0,
        "p50_ms": 3.0,
        "p99_ms": 9.0,
        "errors": 0,
        "mean_batch_rows": 12.5,
        "ceiling_batch": 32,
        "bytes_per_response": 1500.0,
    }
    result = {
        "machine": MACHINE,
        "seconds_per_cell": 5,
        "max_batch_size": 64,
        "max_queue_delay_ms": 2.0,
        "configs": ["hydra"],
        "workloads": {
            "x": {
                "ceiling": {"32": {"rows_per_s": 2000.0}},
                "cells": [cell],
                "profiles": {},
                "targets": [{"target": "t", "value": "v", "met": False}],
            }
        },
    }
    text = server_section(result)
    assert "| 32 | (a) ours, batching | 500 | 3.0 | 9.0 | 0 | 12.5 | 1,500 | 2,000 (b=32) | 25.0% |" in text
    assert "| t | v | **missed** |" in text
