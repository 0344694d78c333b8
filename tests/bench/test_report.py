"""BENCHMARKS.md sections render what the results say, including missed targets."""

from __future__ import annotations

from typing import Any

from bench.report import cost_section, grpc_section, headline, server_section

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
    assert "paired rounds" not in text  # none in this run

    from bench.batching_rule import summarise

    rounds = [
        {
            "order": ["hydra", "hydra-b1", "hydra-delay"],
            "cells": {
                "hydra 1x1": {"rows_per_s": 210.0, "p50_ms": 4.5, "p99_ms": 11.0, "errors": 0},
                "hydra-b1 1x1": {"rows_per_s": 205.0, "p50_ms": 4.6, "p99_ms": 10.0, "errors": 0},
            },
        }
    ]
    result["workloads"]["x"]["paired"] = {  # type: ignore[index]
        "rounds": 1,
        "seconds_per_cell": 5,
        "cells": [[1, 1]],
        "per_round": rounds,
        "summary": summarise(rounds, ((1, 1),)),
        "same_server_twice": {
            "instances_in_start_order": [
                {"median_rows_per_s": 180.0, "rows_per_s": [170.0, 190.0]},
                {"median_rows_per_s": 215.0, "rows_per_s": [210.0, 220.0]},
            ]
        },
    }
    text = server_section(result)
    assert "| 1 × 1 | (a) ours, run when idle | 210 | 4.50 | 11.0 | 0 | 210 |" in text
    assert "| 1 × 1 | (b) ours, batch 1 | 205 | 4.60 | 10.0 | 0 | 205 |" in text
    assert "started 1st: median 180 rows/s (170, 190); started 2nd: median 215 rows/s (210, 220)" in text


def _grpc_cell(rows_per_s: float, rows: int, **extra: float) -> dict[str, float]:
    return {
        "rows_per_s": rows_per_s,
        "requests_per_s": rows_per_s / rows,
        "p50_ms": 10.0,
        "p99_ms": 30.0,
        "client_cpu_us_per_request": 20.0,
        "server_cpu_us_per_request": 400.0,
        **extra,
    }


def test_grpc_section_shows_ratios_ceilings_and_the_target() -> None:
    def cells(json: float, binary: float, grpc: float, rows: int) -> dict[str, object]:
        return {
            "v2_json": _grpc_cell(json, rows, errors=0, non_2xx=0),
            "v2_binary": _grpc_cell(binary, rows, errors=0, non_2xx=0),
            "grpc": _grpc_cell(grpc, rows, grpc_non_ok=2),
            "ratios": {
                "grpc_over_v2_json": grpc / json,
                "grpc_over_v2_binary": grpc / binary,
                "v2_binary_over_v2_json": binary / json,
            },
        }

    result = {
        "machine": MACHINE,
        "model": "models/digits/1",
        "max_batch_size": 64,
        "max_queue_delay_ms": 2.0,
        "in_flight": 32,
        "h2load_connections": 4,
        "seconds_per_cell": 5,
        "rounds": 3,
        "cells": {"1": cells(2000.0, 2200.0, 2100.0, 1), "32": cells(16000.0, 20000.0, 24000.0, 32)},
        "ceiling": {"1": _grpc_cell(6000.0, 1), "32": _grpc_cell(192000.0, 32)},
        "http_ceiling": {"1": _grpc_cell(10000.0, 1), "32": _grpc_cell(320000.0, 32)},
        "profiles": {},
    }
    text = grpc_section(result)
    assert "| 1 | gRPC (h2load) | 2,100 | 2,100 | 10.0 | 30.0 | 2 | 20 | 400 |" in text
    assert "| 1 | 1.05× | 0.95× | 1.10× |" in text and "| 32 | 1.50× | 1.20× | 1.25× |" in text
    assert "| 1 | 6,000 | 20 | 35% | 10,000 | 20 | 20% |" in text
    assert "gRPC one-row ≥ 1.5 × V2 JSON: **missed** (1.05×)" in text
