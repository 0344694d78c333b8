"""Shadow teacher benchmark (part 6): fidelity on in-distribution traffic and the throughput it costs.

- Fidelity: the real server on models/digits/1 with `HYDRA_SHADOW_FRACTION=1` gets the package's
  held-out rows (validation, calibration and test splits: never trained on) as V1 requests; the
  shadow window's measures are read from the model's V1 metadata once every row was compared. The
  same for the held-out rows mixed 30 % toward uniform pixel noise (a shift), for context.
- Cost: the same server with the shadow off (`HYDRA_SHADOW_FRACTION=0`) and at the default 0.01,
  driven by wrk (one-row V2 requests of held-out rows, concurrency 32, the server bench's main cell),
  alternating off / on for `rounds` rounds of `seconds` each, so both see the same machine load.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.loadgen import run_wrk, v2_body
from bench.machine import Section
from bench.servers import digits_server
from bench.workloads import REPO_ROOT

PLANS = {
    "reduced": {"rounds": 6, "seconds": 12.0},
    "smoke": {"rounds": 1, "seconds": 3.0},
    "full": {"rounds": 8, "seconds": 20.0},
}
CONCURRENCY = 32
FRACTION = 0.01
SECTION = Section("## 6. Shadow teacher: fidelity on live traffic and its cost", "python -m bench shadow")


def _held_out() -> np.ndarray:
    from training.config import DataConfig
    from training.data import load_data

    data = load_data(DataConfig(dataset="digits"))
    return np.concatenate([data.val.x, data.cal.x, data.test.x]).astype(np.float32)


def fidelity(rows: np.ndarray, work: Path, label: str) -> dict[str, Any]:
    with (
        digits_server(
            work / f"fidelity-{label}.log",
            shadow_fraction="1.0",
            shadow_max_busy="1.0",
            shadow_window=str(max(1000, len(rows))),
        ) as (url, _),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        for start in range(0, len(rows), 32):
            r = client.post(
                "/v1/models/digits:predict", json={"instances": rows[start : start + 32].tolist()}
            )
            r.raise_for_status()
        deadline = time.monotonic() + 60
        while True:
            shadow = client.get("/v1/models/digits").json()["shadow"]
            if shadow["rows"] + shadow["dropped_rows"] >= len(rows) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    return {"traffic": label, "rows": len(rows), **shadow}


def throughput(
    rows: np.ndarray, work: Path, rounds: int, seconds: float, log: Callable[[str], None]
) -> dict[str, Any]:
    body = work / "digits-1row.json"
    body.write_bytes(v2_body(rows[:1]))
    cells: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    shadow_rows: list[int] = []
    for r in range(rounds):
        for config, fraction in (
            (("off", 0.0), ("on", FRACTION)) if r % 2 == 0 else (("on", FRACTION), ("off", 0.0))
        ):
            log_path = work / f"throughput-{config}-{r}.log"
            with digits_server(log_path, shadow_fraction=str(fraction)) as (url, _):
                cell = run_wrk(f"{url}/v2/models/digits/infer", body, CONCURRENCY, seconds, 1, warmup_s=2.0)
                shadow = httpx.get(f"{url}/v1/models/digits", timeout=10).json()["shadow"]
            cells[config].append(
                {**cell.__dict__, "shadow_rows": shadow["rows"], "shadow_dropped": shadow["dropped_rows"]}
            )
            if config == "on":
                shadow_rows.append(shadow["rows"])
            log(
                f"[shadow] round {r} {config}: {cell.rows_per_s:.0f} rows/s, p99 {cell.p99_ms} ms, "
                f"shadow rows {shadow['rows']} dropped {shadow['dropped_rows']}"
            )
    off = float(np.median([c["rows_per_s"] for c in cells["off"]]))
    on = float(np.median([c["rows_per_s"] for c in cells["on"]]))
    # each round's on and off cells run back to back: their ratio cancels slow changes of machine load
    pair_ratios = [a["rows_per_s"] / b["rows_per_s"] for a, b in zip(cells["on"], cells["off"], strict=True)]
    return {
        "fraction": FRACTION,
        "concurrency": CONCURRENCY,
        "rows_per_request": 1,
        "seconds_per_cell": seconds,
        "rounds": rounds,
        "cells": cells,
        "median_rows_per_s_off": off,
        "median_rows_per_s_on": on,
        "drop_of_medians": 1.0 - on / off,
        "round_ratios_on_over_off": pair_ratios,
        "drop": 1.0 - float(np.median(pair_ratios)),
        "median_p99_ms_off": float(np.median([c["p99_ms"] for c in cells["off"]])),
        "median_p99_ms_on": float(np.median([c["p99_ms"] for c in cells["on"]])),
    }


def shadow_cpu_per_row(rows: np.ndarray, repeats: int = 1000) -> dict[str, float]:
    """CPU seconds the shadow worker spends per sampled row (one-row samples, as at fraction 0.01 and
    one-row requests): the package's ensemble.onnx + service.uncertainty, in this process."""
    from service.manifest import ModelManifest
    from service.shadow import EnsembleRunner

    package = REPO_ROOT / "models" / "digits" / "1"
    runner = EnsembleRunner(package / "ensemble.onnx", ModelManifest.load(package / "manifest.json"))
    for i in range(50):
        runner(rows[i : i + 1])
    t0 = time.process_time()
    for i in range(repeats):
        runner(rows[i % len(rows) : i % len(rows) + 1])
    return {"cpu_ms_per_sampled_row": 1000 * (time.process_time() - t0) / repeats}


def run(preset: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    plan = PLANS[preset]
    rows = _held_out()
    rng = np.random.default_rng(3)
    mixed = (0.7 * rows + 0.3 * rng.uniform(0.0, 16.0, rows.shape)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        work = Path(tmp)
        fid = [fidelity(rows, work, "in-distribution"), fidelity(mixed, work, "mixed 30% toward noise")]
        for f in fid:
            log(f"[shadow] fidelity on {f['traffic']}: {f['fidelity']} ({f['rows']} rows)")
        cost = throughput(rows, work, int(plan["rounds"]), float(plan["seconds"]), log)
    cost |= shadow_cpu_per_row(rows)
    # what the shadow adds at the measured rate, as a share of the machine's CPU (all cores)
    cores = os.cpu_count() or 1
    cost["cores"] = cores
    cost["shadow_cpu_share_of_machine"] = (
        FRACTION * cost["median_rows_per_s_on"] * cost["cpu_ms_per_sampled_row"] / 1000 / cores
    )
    in_dist = fid[0]["fidelity"] or {}
    return {
        "fidelity": fid,
        "throughput": cost,
        "targets": {
            "mi_spearman_ge_0.8": bool(in_dist.get("mi_spearman", 0.0) >= 0.8),
            "label_agreement_ge_0.98": bool(in_dist.get("label_agreement", 0.0) >= 0.98),
            "throughput_drop_le_5pct_at_0.01": bool(cost["drop"] <= 0.05),
        },
    }


@SECTION.renders
def section(result: dict[str, Any]) -> str:
    t = result["throughput"]
    lines = SECTION.opening(
        result,
        ". The real server on models/digits/1; the shadow runs the package's `ensemble.onnx` (8 teachers) "
        "in its own thread after the answers went out, and compares on the same rows (service/shadow.py).",
    )
    lines += [
        "| traffic | rows compared | mi_spearman | label_agreement | mi_ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in result["fidelity"]:
        m = f["fidelity"] or {}
        values = " | ".join(
            f"{m.get(k, float('nan')):.3f}" for k in ("mi_spearman", "label_agreement", "mi_ratio")
        )
        lines.append(f"| {f['traffic']} (held-out rows) | {f['window_rows']} | {values} |")
    lines += [
        "",
        f"Throughput, shadow off vs `HYDRA_SHADOW_FRACTION={t['fraction']}` (wrk, one-row V2 requests, "
        f"concurrency {t['concurrency']}, {t['rounds']} alternating rounds of {t['seconds_per_cell']:g} s "
        "each, "
        "one fresh server per cell; medians):",
        "",
        "| shadow | rows/s | p99 ms | per-round rows/s |",
        "| --- | --- | --- | --- |",
        f"| off | {t['median_rows_per_s_off']:.0f} | {t['median_p99_ms_off']:.1f} | "
        + ", ".join(f"{c['rows_per_s']:.0f}" for c in t["cells"]["off"])
        + " |",
        f"| {t['fraction']} | {t['median_rows_per_s_on']:.0f} | {t['median_p99_ms_on']:.1f} | "
        + ", ".join(f"{c['rows_per_s']:.0f}" for c in t["cells"]["on"])
        + " |",
        "",
        f"Throughput drop at {t['fraction']}: {100 * t['drop']:.1f} % (1 − the median over rounds of on/off, "
        "the two cells of a round back to back; of the medians: "
        f"{100 * t.get('drop_of_medians', t['drop']):.1f} %; "
        "target ≤ 5 %: "
        f"{_met(result['targets']['throughput_drop_le_5pct_at_0.01'])}); rows compared per "
        "on-cell: "
        + ", ".join(str(c["shadow_rows"]) for c in t["cells"]["on"])
        + ", dropped: "
        + ", ".join(str(c["shadow_dropped"]) for c in t["cells"]["on"])
        + ". "
        + (
            f"The shadow worker's CPU per sampled row: {t['cpu_ms_per_sampled_row']:.3f} ms (ensemble.onnx + "
            f"uncertainty, one-row samples); at {t['fraction']} that is "
            f"{1000 * t['fraction'] * t['cpu_ms_per_sampled_row']:.1f} µs per served row, or "
            f"{100 * t['shadow_cpu_share_of_machine']:.2f} % of the machine's {t['cores']} cores at the rate "
            "measured: the drop to expect, well below this machine's round-to-round noise. "
            if "cpu_ms_per_sampled_row" in t
            else ""
        )
        + "Fidelity targets on in-distribution "
        f"traffic (mi_spearman ≥ 0.8, label_agreement ≥ 0.98): "
        f"{_met(result['targets']['mi_spearman_ge_0.8'] and result['targets']['label_agreement_ge_0.98'])}.",
    ]
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"
