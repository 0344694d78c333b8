"""Result bookkeeping of the bench parts: profiles, targets, seed aggregation, request bodies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.loadgen import v2_body
from bench.profiling import summarise
from bench.quality import aggregate
from bench.server import targets


def test_profile_summary_shares_by_leaf_and_inclusive(tmp_path: Path) -> None:
    raw = tmp_path / "prof.txt"
    raw.write_text(
        "thread (0x1);main (a.py:1);handle (/x/site-packages/app/h.py:5);"
        "loads (/x/site-packages/orjson.py:3) 30\n"
        "thread (0x1);main (a.py:1);handle (/x/site-packages/app/h.py:5) 10\n"
        "thread (0x2);worker (/r/service/batcher.py:9);run (/r/service/runtime.py:2) 60\n"
    )
    s = summarise(raw)
    assert s["samples"] == 100
    assert dict(s["leaf_percent"]) == {
        "run (service/runtime.py)": 60.0,
        "loads (orjson.py)": 30.0,
        "handle (app/h.py)": 10.0,
    }
    assert dict(s["inclusive_percent"])["handle (app/h.py)"] == 40.0


def _cell(config: str, rows: int, conc: int, rps: float, p99: float, frac: float = 0.1) -> dict[str, object]:
    return {
        "config": config,
        "rows_per_request": rows,
        "concurrency": conc,
        "rows_per_s": rps,
        "p99_ms": p99,
        "fraction_of_ceiling": frac,
    }


def test_targets_need_throughput_and_latency() -> None:
    rows = [
        _cell("hydra", 1, 32, 3000, 20),
        _cell("triton", 1, 32, 1000, 30),  # 3x, lower p99: met
        _cell("hydra", 32, 32, 9000, 50),
        _cell("triton", 32, 32, 3000, 40),  # 3x but higher p99: missed
        _cell("hydra", 1, 64, 2000, 30, 0.6),
        _cell("hydra-b1", 1, 64, 400, 100),  # 5x: met
    ]
    got = {t["target"]: t["met"] for t in targets(rows, "mnist1d_wide")}
    assert got["(a) >= 2x (c) rows/s at equal or lower p99, concurrency 32, 1-row requests"] is True
    assert got["(a) >= 2x (c) rows/s at equal or lower p99, concurrency 32, 32-row requests"] is False
    assert got["(a) >= 4x (b) rows/s, compute-bound model, 64 concurrent one-row clients"] is True
    assert got["(a) >= 50% of (d), the in-process ORT ceiling at the same batch"] is False  # 1 of 3 cells
    # the batching-off target is about the compute-bound model only
    assert not any("4x (b)" in t["target"] for t in targets(rows, "digits"))


def test_aggregate_mean_and_population_std_over_seeds() -> None:
    def run(seed: int, acc: float) -> dict[str, object]:
        return {
            "dataset": "d",
            "seed": seed,
            "methods": {"hydra": {"test": {"accuracy": acc}, "ood_score": "mi"}},
            "retention_mean": acc / 2,
            "fidelity": {"spearman": 1.0},
            "conformal": {"flag": True},
        }

    agg = aggregate([run(0, 0.8), run(1, 0.9)], "dataset")["d"]
    assert agg["methods.hydra.test.accuracy"] == {
        "mean": pytest.approx(0.85),
        "std": pytest.approx(0.05),
        "n": 2,
    }
    assert agg["retention_mean"]["mean"] == pytest.approx(0.425)
    assert "conformal.flag" not in agg  # booleans and strings are not averaged


def test_v2_body_is_a_valid_infer_request() -> None:
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    body = json.loads(v2_body(rows))
    (tensor,) = body["inputs"]
    assert tensor == {
        "name": "input",
        "shape": [2, 3],
        "datatype": "FP32",
        "data": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
    }
    assert "outputs" not in body


def test_well_posed_retention_skips_sets_the_ensemble_cannot_detect() -> None:
    from bench.quality import well_posed_retention

    run = {
        "methods": {
            "ensemble": {"ood": {"far": {"auroc": 0.99}, "near": {"auroc": 0.55}}},
            "hydra": {
                "ood": {"far": {"auroc": 0.95, "retention": 0.92}, "near": {"auroc": 0.6, "retention": 2.0}}
            },
        }
    }
    assert well_posed_retention(run) == pytest.approx(0.92)
    run["methods"]["ensemble"]["ood"]["far"]["auroc"] = 0.6
    assert well_posed_retention(run) is None


def _round(order: list[str], cells: dict[str, tuple[float, float, float]]) -> dict[str, object]:
    return {
        "order": order,
        "cells": {
            k: {"rows_per_s": r, "p50_ms": p50, "p99_ms": p99, "errors": 0, "mean_batch_rows": 1.0}
            for k, (r, p50, p99) in cells.items()
        },
    }


def test_batching_rule_targets_judge_medians_over_paired_rounds() -> None:
    from bench.batching_rule import summarise
    from bench.batching_rule import targets as rule_targets

    cells = ((1, 1), (1, 32))
    keys = ("hydra 1x1", "hydra-b1 1x1", "hydra 1x32", "hydra-delay 1x32")
    per_round = [  # (rows/s, p50 ms, p99 ms) of each key, one line a round
        [(200, 4.0, 9), (190, 4.2, 9), (950, 30, 60), (1000, 31, 61)],
        [(150, 5.0, 9), (210, 3.9, 9), (1040, 29, 60), (990, 30, 62)],
        [(205, 4.1, 9), (200, 4.3, 9), (1010, 30, 59), (1005, 30, 60)],
    ]
    rounds = [
        _round(["hydra", "hydra-b1", "hydra-delay"], dict(zip(keys, r, strict=True))) for r in per_round
    ]
    paired = {
        "rounds": 3,
        "cells": [list(c) for c in cells],
        "per_round": rounds,
        "summary": summarise(rounds, cells),
    }
    s = paired["summary"]
    # medians per config: one bad round of (a) does not decide
    assert s["hydra 1x1"]["rows_per_s"] == 200 and s["hydra-b1 1x1"]["rows_per_s"] == 200
    assert s["hydra 1x1"]["p50_ms"] == 4.1 and s["hydra-b1 1x1"]["p50_ms"] == 4.2
    assert s["hydra 1x32"]["rounds_rows_per_s"] == [950, 1040, 1010]
    got = {t["target"].split(":")[0]: t for t in rule_targets(paired)}
    assert got["one client"]["met"] is True  # 200 >= 200 rows/s, p50 4.1 <= 4.2
    assert "per round 1.05, 0.71, 1.02" in got["one client"]["value"]
    no_loss = got["32 one-row clients"]
    assert no_loss["met"] is True  # median 1010 vs 1000
    assert "per round 0.95, 1.05, 1.00" in no_loss["value"]
    # a loss in the medians is a miss
    rounds[2]["cells"]["hydra 1x32"]["rows_per_s"] = 900  # type: ignore[index]
    paired["summary"] = summarise(rounds, cells)
    assert {t["target"].split(":")[0]: t["met"] for t in rule_targets(paired)}["32 one-row clients"] is False


def test_grid_one_client_target_gives_way_to_the_paired_rounds() -> None:
    from bench.batching_rule import summarise

    rows = [_cell("hydra", 1, 1, 100, 5), _cell("hydra-b1", 1, 1, 300, 5)]
    rows[0]["p50_ms"] = rows[1]["p50_ms"] = 3.0
    grid_only = [t for t in targets(rows, "digits") if t["target"].startswith("one client")]
    assert len(grid_only) == 1 and grid_only[0]["met"] is False
    cells = ((1, 1),)
    rounds = [
        _round(
            ["hydra", "hydra-b1", "hydra-delay"], {"hydra 1x1": (300, 3.0, 9), "hydra-b1 1x1": (290, 3.1, 9)}
        )
    ]
    paired = {
        "rounds": 1,
        "cells": [list(c) for c in cells],
        "per_round": rounds,
        "summary": summarise(rounds, cells),
    }
    one_client = [t for t in targets(rows, "digits", paired) if t["target"].startswith("one client")]
    assert (
        len(one_client) == 1 and "paired rounds" in one_client[0]["target"] and one_client[0]["met"] is True
    )


def test_web_floor_share_is_judged_on_the_paired_rounds_when_they_ran() -> None:
    from bench.batching_rule import WEB_FLOOR_CELL, summarise

    cells = ((1, 1), WEB_FLOOR_CELL)
    rounds = [
        _round(
            ["hydra-lean", "ceiling-fastapi"],
            {"hydra-lean 1x32": (4000, 8, 20), "ceiling-fastapi 1x32": (7000, 4, 9)},
        ),
        _round(
            ["ceiling-fastapi", "hydra-lean"],
            {"hydra-lean 1x32": (3900, 8, 20), "ceiling-fastapi 1x32": (8100, 4, 9)},
        ),
        _round(
            ["hydra-lean", "ceiling-fastapi"],
            {"hydra-lean 1x32": (4200, 8, 20), "ceiling-fastapi 1x32": (7200, 4, 9)},
        ),
    ]
    paired = {"rounds": 3, "cells": [[1, 1]], "per_round": rounds, "summary": summarise(rounds, cells)}
    # the grid's own cells say 40 %: a single pair minutes apart; the paired medians decide
    rows = [_cell("hydra-lean", 1, 32, 2800, 20), _cell("ceiling-fastapi", 1, 32, 7000, 9)]
    for r in rows:
        r["requests_per_s"] = r["rows_per_s"]
    grid = [t for t in targets(rows, "digits") if "FastAPI-route" in t["target"]]
    assert len(grid) == 1 and grid[0]["met"] is False
    got = [t for t in targets(rows, "digits", paired) if "FastAPI-route" in t["target"]]
    assert len(got) == 1 and got[0]["met"] is True  # median 4,000 / 7,200 = 56 %
    assert "56% (4,000 vs 7,200 req/s); per round 57%, 48%, 58%" in got[0]["value"]
