"""alibi-detect's CVMDriftOnline on the drift bench's saved score streams (run in .venv-alibi only).

`python bench/alibi_cvm.py --streams DIR --out alibi.json --delta 0.01 --prefix 1000 --windows 20,100`

For each dataset folder in DIR (reference.npy = the calibration scores; calibration_streams.npy and
id_streams.npy = clean streams; delay_streams.npy = (severity, stream, rows) clean prefix + shift):
the detector's statistic (max over windows of the normalised CVM statistic, `CVMDriftOnline.score`)
is run row by row; the threshold is the (1 − δ) quantile of the per-stream maxima on the calibration
streams, so δ of clean streams of that length alarm (its own bootstrap configuration targets an ERT
and would need ≥ 10 × ERT simulations for ERT ≈ rows/δ). False alarms are then counted on the separate
id_streams, and the first row above the threshold is the alarm on each delay stream. Standalone: numpy
and alibi-detect only (it pins numpy 1.x, so it never runs in the project's venv).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np


def trajectory(detector, stream: np.ndarray, stop_above: float | None = None) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Max-over-windows statistic after each row (NaN before the smallest window is full)."""
    detector.reset_state()
    out = np.full(stream.size, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t, value in enumerate(stream):
            stats = detector.score(np.asarray([value], dtype=np.float64))
            out[t] = np.nanmax(stats) if np.isfinite(stats).any() else np.nan
            if stop_above is not None and out[t] > stop_above:
                return out[: t + 1]
    return out


def main() -> None:
    from alibi_detect.cd import CVMDriftOnline

    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--delta", type=float, default=0.01)
    parser.add_argument("--prefix", type=int, default=1000)
    parser.add_argument("--windows", default="20,100")
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    result = {}
    for folder in sorted(p for p in args.streams.iterdir() if (p / "reference.npy").exists()):
        t0 = time.perf_counter()
        reference = np.load(folder / "reference.npy").astype(np.float64)
        # thresholds of its own configuration are not used (see the docstring): few bootstraps
        detector = CVMDriftOnline(reference, ert=1000, window_sizes=windows, n_bootstraps=3000, verbose=False)
        cal = np.load(folder / "calibration_streams.npy")
        maxima = np.array([np.nanmax(trajectory(detector, s)) for s in cal])
        threshold = float(np.quantile(maxima, 1.0 - args.delta, method="higher"))
        evals = np.load(folder / "id_streams.npy")
        eval_alarms = 0
        for s in evals:
            traj = trajectory(detector, s, stop_above=threshold)
            eval_alarms += int(np.nanmax(traj) > threshold)
        delay = np.load(folder / "delay_streams.npy")
        severities = []
        for k in range(delay.shape[0]):
            alarms = []
            for s in delay[k]:
                traj = trajectory(detector, s, stop_above=threshold)
                above = np.flatnonzero(np.nan_to_num(traj, nan=-np.inf) > threshold)
                alarms.append(int(above[0]) if above.size else None)
            severities.append({"severity": k + 1, "alarms": alarms})
        result[folder.name] = {
            "detector": f"alibi_detect.cd.CVMDriftOnline(window_sizes={windows})",
            "reference_size": int(reference.size),
            "threshold": threshold,
            "calibration_streams": len(cal),
            "calibration_false_alarms": int((maxima > threshold).sum()),
            "eval_streams": len(evals),
            "eval_false_alarms": eval_alarms,
            "eval_false_alarm_frequency": eval_alarms / max(1, len(evals)),
            "severities": severities,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(
            f"[alibi] {folder.name}: threshold {threshold:.3f}, {eval_alarms}/{len(evals)} false alarms, "
            f"{result[folder.name]['seconds']} s",
            flush=True,
        )
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
