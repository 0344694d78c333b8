"""BENCHMARKS.md §5 (drift) and §6 (shadow) render what their results say, missed targets included."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from bench import drift, shadow


def _delays(median: float | None) -> dict[str, Any]:
    return {
        "streams": 30, "false_alarms_in_prefix": 0, "missed_within_max_after": 0 if median else 30,
        "median_delay": median, "q25_delay": median or 20_001.0, "q75_delay": median or 20_001.0,
    }  # fmt: skip


def _drift_result(ours: list[float | None], theirs: list[float | None], false_alarms: int) -> dict[str, Any]:
    plan = drift.PLANS["reduced"]
    datasets = []
    for name in ("mnist1d", "digits"):
        datasets.append(
            {
                "dataset": name,
                "id_pool": "pool",
                "ours_false_alarms": {
                    "streams": 200,
                    "rows_per_stream": 10_000,
                    "alarms": false_alarms,
                    "frequency": false_alarms / 200,
                    "alarm_rows": [],
                },
                "served_p_false_alarms": {"streams": 100, "alarms": 1, "frequency": 0.01},
                "alibi": {"eval_streams": 100, "eval_false_alarms": 1, "eval_false_alarm_frequency": 0.01},
                "long_streams": {
                    "streams": 50,
                    "rows_per_stream": 100_000,
                    "ours_alarms": 0,
                    "served_p_alarms": 3,
                },
                "severities": [
                    {"severity": k + 1, "shift": f"s{k + 1}", "ours": _delays(o), "alibi": _delays(t)}
                    for k, (o, t) in enumerate(zip(ours, theirs, strict=True))
                ],
            }
        )
    return {"plan": asdict(plan), "datasets": datasets, "targets": drift.targets(datasets, plan)}


def test_drift_section_marks_a_slower_severity_and_too_many_false_alarms() -> None:
    result = _drift_result([None, 300.0, 50.0, 40.0, 1000.0], [None, 250.0, 60.0, 50.0, 30.0], false_alarms=5)
    text = drift.section(result)
    assert result["targets"] == {
        "false_alarms_le_delta": False,
        "median_delay_le_alibi_every_severity": False,
        "digits_clear_shift_alarm_within_1500_rows": True,
    }
    assert "| mnist1d | 2 | s2 | 300 [300, 300] | 250 [250, 250] | **no** |" in text
    assert "| mnist1d | 1 | s1 | > 20,000 | > 20,000 | neither within 20,000 |" in text
    assert "| digits | 50 × 100,000 | 0 | 3 |" in text
    assert text.count("**missed**") == 2


def test_drift_section_all_met() -> None:
    result = _drift_result([10.0] * 5, [20.0] * 5, false_alarms=0)
    assert all(result["targets"].values()) and "**missed**" not in drift.section(result)
    assert "Not run yet" in drift.section(None)


def test_shadow_section_reports_the_drop_and_fidelity() -> None:
    cell = {"rows_per_s": 1000.0, "p99_ms": 10.0, "shadow_rows": 0, "shadow_dropped": 0}
    result = {
        "fidelity": [
            {"traffic": "in-distribution", "window_rows": 807,
             "fidelity": {"mi_spearman": 0.95, "label_agreement": 0.97, "mi_ratio": 0.9}},
        ],
        "throughput": {
            "fraction": 0.01, "concurrency": 32, "rounds": 1, "seconds_per_cell": 12.0,
            "cells": {"off": [cell], "on": [cell | {"rows_per_s": 900.0, "shadow_rows": 90}]},
            "median_rows_per_s_off": 1000.0, "median_rows_per_s_on": 900.0, "median_p99_ms_off": 10.0,
            "median_p99_ms_on": 10.0, "drop": 0.1, "drop_of_medians": 0.1, "round_ratios_on_over_off": [0.9],
        },
        "targets": {
            "mi_spearman_ge_0.8": True, "label_agreement_ge_0.98": False,
            "throughput_drop_le_5pct_at_0.01": False,
        },
    }  # fmt: skip
    text = shadow.section(result)
    assert "| in-distribution (held-out rows) | 807 | 0.950 | 0.970 | 0.900 |" in text
    assert "Throughput drop at 0.01: 10.0 %" in text and text.count("**missed**") == 2
