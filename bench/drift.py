"""Drift alarm benchmark: false alarms on clean streams, detection delay against shift severity, and
alibi-detect's `CVMDriftOnline` on the same score streams at the same false-alarm rate.

Score streams come from the served code: `OnnxModelRuntime` + `inference.summarise` (the OOD score and
the served p-value of every row, exactly as the server computes them) on pools of rows:
- digits (models/digits/1): in-distribution = the package's held-out test split; shifted = test rows
  mixed toward uniform pixel noise, x' = (1 − λ) x + λ u, u ~ U(0, 16)^64, λ = 0.1 … 0.5 (severity 1 … 5);
- MNIST-1D (a package trained for the bench with the training pipeline, in bench/build/drift):
  in-distribution = fresh rows from MNIST-1D's own generator; severity k = 1 … 5 = the generator with
  (1 + 0.3k)x correlated noise and (1 + 0.1k)x shear (bench.quality.shifted_mnist1d's levels).

A stream draws rows from a pool with replacement. False alarms: `id_streams` streams of `id_rows` rows
each through `service.drift.DriftMonitor` (batches of 64 rows, as a server forms them). Detection: a clean
prefix of `prefix` rows, then shifted rows until the alarm (at most `max_after`); the delay is the number of
shifted rows up to and including the alarm row. The same streams (saved as .npy) go to alibi-detect in its
own venv (.venv-alibi, bench/alibi_cvm.py): `CVMDriftOnline` with the calibration scores as reference; its
constant threshold on the max-over-windows statistic is set so that a fraction δ of *separate* clean
calibration streams alarm within `id_rows` rows, i.e. the same false-alarm rate per stream as δ (an ERT of
about id_rows/δ, which its bootstrap configuration cannot reach: it needs ≥ 10 × ERT simulations).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.workloads import BUILD, REPO_ROOT

DRIFT_BUILD = BUILD / "drift"
MNIST1D_PACKAGE = DRIFT_BUILD / "models" / "mnist1d" / "1"
DIGITS_PACKAGE = REPO_ROOT / "models" / "digits" / "1"
ALIBI_PYTHON = REPO_ROOT / ".venv-alibi" / "bin" / "python"
BATCH = 64
DIGITS_LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class DriftPlan:
    id_streams: int = 100
    id_rows: int = 10_000
    alibi_calibration_streams: int = 100
    delay_streams: int = 30
    prefix: int = 1000
    max_after: int = 20_000
    long_streams: int = 50
    long_rows: int = 100_000
    delta: float = 0.01
    windows: tuple[int, ...] = (20, 100)
    mnist1d_id_pool: int = 100_000
    shift_pool: int = 10_000


PLANS = {
    "reduced": DriftPlan(),
    "full": DriftPlan(id_streams=200, alibi_calibration_streams=200, delay_streams=100),
    "smoke": DriftPlan(
        id_streams=4,
        id_rows=2000,
        alibi_calibration_streams=4,
        delay_streams=3,
        max_after=1000,
        long_streams=2,
        long_rows=5000,
        mnist1d_id_pool=5000,
        shift_pool=2000,
    ),
}


def build_mnist1d_package(seed: int = 0) -> Path:
    """The MNIST-1D package of this bench (8 teachers, 8 heads; `python -m training run`'s pipeline)."""
    if (MNIST1D_PACKAGE / "manifest.json").exists():
        return MNIST1D_PACKAGE
    subprocess.run(
        [
            str(REPO_ROOT / ".venv" / "bin" / "python"),
            "-m",
            "training",
            "run",
            "--dataset",
            "mnist1d",
            "--out",
            str(MNIST1D_PACKAGE),
            "--members",
            "8",
            "--seed",
            str(seed),
            "--run-dir",
            str(BUILD / "runs" / f"drift-mnist1d-s{seed}"),
        ],
        check=True,
        cwd=REPO_ROOT,
    )
    return MNIST1D_PACKAGE


class ServedScores:
    """OOD scores and served p-values of rows through the server's own code path."""

    def __init__(self, package: Path) -> None:
        from service.manifest import ModelManifest
        from service.runtime import OnnxModelRuntime
        from service.settings import Settings
        from service.uncertainty import ConformalOODCalibrator

        self.manifest = ModelManifest.load(package / "manifest.json")
        settings = Settings(execution_providers="cpu", intra_op_threads=1)
        self.runtime = OnnxModelRuntime(package / "model.onnx", self.manifest, settings)
        self.calibrator = ConformalOODCalibrator(self.manifest.ood.calibration_scores)
        self.calibration_scores = np.asarray(self.manifest.ood.calibration_scores, dtype=np.float64)

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from service import inference

        scores, p = [], []
        for start in range(0, len(rows), 1024):
            raw = self.runtime.run(np.ascontiguousarray(rows[start : start + 1024], dtype=np.float32))
            summary = inference.summarise(self.manifest, self.calibrator, raw)
            scores.append(np.asarray(summary["ood_score"], np.float64))
            p.append(np.asarray(summary["ood_p_value"], np.float64))
        return np.concatenate(scores), np.concatenate(p)


def mnist1d_rows(level: int, rows: int, seed: int) -> np.ndarray:
    """MNIST-1D from its generator at shift level `level` (0: in-distribution), another seed per call."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = rows
    args.train_split = 0.0
    args.seed = seed
    args.corr_noise_scale *= 1.0 + 0.3 * level
    args.shear_scale *= 1.0 + 0.1 * level
    raw = make_dataset(args)
    return np.concatenate([raw["x"], raw["x_test"]])[:rows].astype(np.float32)


def pools(dataset: str, plan: DriftPlan, log: Callable[[str], None]) -> dict[str, Any]:
    """Score pools (ID and one per severity) for one dataset, with the calibration scores."""
    from training.config import DataConfig
    from training.data import load_data

    if dataset == "digits":
        served = ServedScores(DIGITS_PACKAGE)
        data = load_data(DataConfig(dataset="digits"))
        cal_scores, _ = served(data.cal.x)
        check = float(np.max(np.abs(np.sort(cal_scores) - np.sort(served.calibration_scores))))
        test = data.test.x.astype(np.float32)
        id_scores, id_p = served(test)
        rng = np.random.default_rng(7)
        shifted = {}
        for k, lam in enumerate(DIGITS_LAMBDAS, start=1):
            base = test[rng.integers(0, len(test), plan.shift_pool)]
            noise = rng.uniform(0.0, 16.0, base.shape).astype(np.float32)
            shifted[k] = served(((1.0 - lam) * base + lam * noise).astype(np.float32))[0]
        shift_desc = {k: f"lambda={lam}" for k, lam in enumerate(DIGITS_LAMBDAS, start=1)}
        id_desc = f"held-out test split ({len(test)} rows), resampled"
    else:
        served = ServedScores(build_mnist1d_package())
        data = load_data(DataConfig(dataset="mnist1d"))
        cal_scores, _ = served(data.cal.x)
        check = float(np.max(np.abs(np.sort(cal_scores) - np.sort(served.calibration_scores))))
        chunks = [
            mnist1d_rows(0, min(20_000, plan.mnist1d_id_pool), seed=70_000 + i)
            for i in range(max(1, plan.mnist1d_id_pool // 20_000))
        ]
        id_scores, id_p = served(np.concatenate(chunks))
        shifted = {k: served(mnist1d_rows(k, plan.shift_pool, seed=80_000 + k))[0] for k in range(1, 6)}
        shift_desc = {k: f"corr_noise x{1 + 0.3 * k:.1f}, shear x{1 + 0.1 * k:.1f}" for k in range(1, 6)}
        id_desc = f"fresh rows of MNIST-1D's generator ({len(id_scores)} rows), resampled"
    log(f"[drift] {dataset}: calibration scores reproduced to {check:.2e}; ID pool {len(id_scores)}")
    return {
        "calibration": served.calibration_scores,
        "calibrator": served.calibrator,
        "id": id_scores,
        "id_served_p": id_p,
        "shifted": shifted,
        "shift_desc": shift_desc,
        "id_desc": id_desc,
        "calibration_check": check,
    }


def run_monitor(calibration: np.ndarray, scores: np.ndarray, delta: float, seed: int) -> int | None:
    """Row index (0-based) of the first alarm of the served DriftMonitor on `scores`, or None."""
    from service.drift import DriftMonitor

    monitor = DriftMonitor(calibration, delta=delta, seed=seed)
    for start in range(0, scores.size, BATCH):
        alarms = monitor.observe(scores[start : start + BATCH])
        if alarms:
            return alarms[0] - 1
    return None


def run_on_served_p(p_values: np.ndarray, delta: float) -> int | None:
    """The same martingale on the *served* p-values (fixed calibration set), for comparison."""
    from service.drift import ConformalTestMartingale

    m = ConformalTestMartingale(delta=delta)
    for start in range(0, p_values.size, BATCH):
        update = m.update(p_values[start : start + BATCH])
        if update.alarms:
            return start + update.alarms[0]
    return None


def run_dataset(dataset: str, plan: DriftPlan, out_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    pool = pools(dataset, plan, log)
    rng = np.random.default_rng({"digits": 11, "mnist1d": 12}[dataset])
    n_id = len(pool["id"])
    # streams as indices into the pools, saved for alibi
    id_idx = rng.integers(0, n_id, (plan.id_streams, plan.id_rows))
    cal_idx = rng.integers(0, n_id, (plan.alibi_calibration_streams, plan.id_rows))
    prefix_idx = rng.integers(0, n_id, (5, plan.delay_streams, plan.prefix))
    shift_idx = rng.integers(0, plan.shift_pool, (5, plan.delay_streams, plan.max_after))
    folder = out_dir / dataset
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "reference.npy", pool["calibration"])
    np.save(folder / "id_streams.npy", pool["id"][id_idx])
    np.save(folder / "calibration_streams.npy", pool["id"][cal_idx])
    delay_streams = np.stack(
        [
            np.concatenate([pool["id"][prefix_idx[k - 1]], pool["shifted"][k][shift_idx[k - 1]]], axis=1)
            for k in range(1, 6)
        ]
    )  # (severity, stream, prefix + max_after)
    np.save(folder / "delay_streams.npy", delay_streams)

    t0 = time.perf_counter()
    id_alarms = [
        run_monitor(pool["calibration"], s, plan.delta, seed=i) for i, s in enumerate(pool["id"][id_idx])
    ]
    cal_alarms = [
        run_monitor(pool["calibration"], s, plan.delta, seed=10_000 + i)
        for i, s in enumerate(pool["id"][cal_idx])
    ]
    served_p_alarms = [run_on_served_p(p, plan.delta) for p in pool["id_served_p"][id_idx]]
    # long clean streams: ours (exact) against the martingale on the served p-values (fixed calibration)
    long_ours, long_served = [], []
    for i in range(plan.long_streams):
        idx = rng.integers(0, n_id, plan.long_rows)
        long_ours.append(run_monitor(pool["calibration"], pool["id"][idx], plan.delta, seed=30_000 + i))
        long_served.append(run_on_served_p(pool["id_served_p"][idx], plan.delta))
    ours_seconds = time.perf_counter() - t0
    fa = [a is not None for a in id_alarms + cal_alarms]
    log(f"[drift] {dataset}: ours {sum(fa)} false alarms in {len(fa)} clean streams ({ours_seconds:.0f} s)")
    severities = []
    for k in range(1, 6):
        alarms = [
            run_monitor(pool["calibration"], s, plan.delta, seed=20_000 + 100 * k + i)
            for i, s in enumerate(delay_streams[k - 1])
        ]
        severities.append({"severity": k, "shift": pool["shift_desc"][k], "ours": _delays(alarms, plan)})
        log(f"[drift] {dataset} severity {k}: ours median delay {severities[-1]['ours']['median_delay']}")
    return {
        "dataset": dataset,
        "id_pool": pool["id_desc"],
        "calibration_size": len(pool["calibration"]),
        "calibration_check_max_abs": pool["calibration_check"],
        "ours_false_alarms": {
            "streams": len(fa),
            "rows_per_stream": plan.id_rows,
            "alarms": int(sum(fa)),
            "frequency": float(np.mean(fa)),
            "alarm_rows": [a for a in id_alarms + cal_alarms if a is not None],
        },
        "served_p_false_alarms": {
            "streams": len(served_p_alarms),
            "alarms": int(sum(a is not None for a in served_p_alarms)),
            "frequency": float(np.mean([a is not None for a in served_p_alarms])),
        },
        "long_streams": {
            "streams": plan.long_streams,
            "rows_per_stream": plan.long_rows,
            "ours_alarms": int(sum(a is not None for a in long_ours)),
            "served_p_alarms": int(sum(a is not None for a in long_served)),
            "served_p_alarm_rows": [a for a in long_served if a is not None],
        },
        "severities": severities,
    }


def _delays(alarms: list[int | None], plan: DriftPlan) -> dict[str, Any]:
    """Delays (shifted rows up to and including the alarm) from first-alarm rows; prefix alarms = false."""
    early = sum(a is not None and a < plan.prefix for a in alarms)
    delays = [a - plan.prefix + 1 if a is not None else None for a in alarms if a is None or a >= plan.prefix]
    found = [d for d in delays if d is not None]
    missed = sum(d is None for d in delays)
    # a missed stream counts as beyond max_after (the median is then a lower bound if half are missed)
    ranked = sorted(found) + [plan.max_after + 1] * missed
    median = float(np.median(ranked)) if ranked else None
    return {
        "streams": len(alarms),
        "false_alarms_in_prefix": int(early),
        "missed_within_max_after": int(missed),
        "median_delay": None if median is None or median > plan.max_after else median,
        "q25_delay": float(np.quantile(ranked, 0.25)) if ranked else None,
        "q75_delay": float(np.quantile(ranked, 0.75)) if ranked else None,
    }


def run_alibi(out_dir: Path, plan: DriftPlan, log: Callable[[str], None]) -> dict[str, Any]:
    if not ALIBI_PYTHON.exists():
        raise RuntimeError(f"{ALIBI_PYTHON} missing: run `make alibi-venv` (alibi-detect in its own venv)")
    result_path = out_dir / "alibi.json"
    cmd = [
        str(ALIBI_PYTHON),
        str(REPO_ROOT / "bench" / "alibi_cvm.py"),
        "--streams",
        str(out_dir),
        "--out",
        str(result_path),
        "--delta",
        str(plan.delta),
        "--prefix",
        str(plan.prefix),
        "--windows",
        ",".join(map(str, plan.windows)),
    ]
    log("[drift] alibi-detect: " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    alibi: dict[str, Any] = json.loads(result_path.read_text())
    return alibi


def run(preset: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    plan = PLANS[preset]
    out_dir = DRIFT_BUILD / "streams"
    datasets = [run_dataset(name, plan, out_dir, log) for name in ("mnist1d", "digits")]
    alibi = run_alibi(out_dir, plan, log)
    for entry in datasets:
        a = alibi[entry["dataset"]]
        entry["alibi"] = {k: v for k, v in a.items() if k != "severities"}
        for sev, alibi_sev in zip(entry["severities"], a["severities"], strict=True):
            sev["alibi"] = _delays(alibi_sev["alarms"], plan)
    return {"plan": asdict(plan), "datasets": datasets, "targets": targets(datasets, plan)}


def targets(datasets: list[dict[str, Any]], plan: DriftPlan) -> dict[str, Any]:
    def le(a: float | None, b: float | None) -> bool:
        if a is None:  # ours missed in more than half the streams
            return False
        return b is None or a <= b

    digits = next(d for d in datasets if d["dataset"] == "digits")
    clear = digits["severities"][-1]["ours"]["median_delay"]
    return {
        "false_alarms_le_delta": all(d["ours_false_alarms"]["frequency"] <= plan.delta for d in datasets),
        # a severity that neither detects within max_after decides nothing (reported as such)
        "median_delay_le_alibi_every_severity": all(
            le(s["ours"]["median_delay"], s["alibi"]["median_delay"])
            for d in datasets
            for s in d["severities"]
            if s["ours"]["median_delay"] is not None or s["alibi"]["median_delay"] is not None
        ),
        "digits_clear_shift_alarm_within_1500_rows": clear is not None and clear <= 1500,
    }


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def section(result: dict[str, Any] | None) -> str:
    """The BENCHMARKS.md section of bench/results/drift.json."""
    title = "## 5. Drift alarm: false alarms and detection delay (vs alibi-detect CVMDriftOnline)"
    if not result:
        return f"{title}\n\nNot run yet: `make bench-drift` (`python -m bench drift`)."
    plan = result["plan"]
    meta = result.get("machine", {})
    lines = [
        title,
        "",
        f"`{meta.get('command', 'python -m bench drift')}` on {meta.get('cpu', 'this machine')}, "
        f"{meta.get('date_utc', '')}, {result.get('seconds', '?')} s. δ = {plan['delta']} (alarm at "
        "martingale 100). The martingale is `service.drift.DriftMonitor` itself, fed the OOD scores the "
        "served code computes (`OnnxModelRuntime` + `inference.summarise`) in batches of 64 rows. "
        "alibi-detect 0.13 "
        f"`CVMDriftOnline` (windows {plan['windows']}, the calibration scores as reference) runs in its own "
        "venv (`make alibi-venv`) on the same score streams; its threshold is set so that δ of "
        f"{plan['alibi_calibration_streams']} separate clean streams of {plan['id_rows']:,} rows alarm: the "
        "same false-alarm rate per stream as δ (an ERT of ~10^6 rows, which its own bootstrap "
        "configuration cannot reach: it needs ≥ 10 × ERT simulations). Method: bench/drift.py.",
        "",
        "False alarms on clean streams (resampled with replacement from the clean pool):",
        "",
        "| dataset | clean pool | streams × rows | ours | on the *served* p-values "
        "| alibi CVM (held-out streams) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for d in result["datasets"]:
        o, s, a = d["ours_false_alarms"], d["served_p_false_alarms"], d["alibi"]
        cells = [
            d["dataset"],
            d["id_pool"],
            f"{o['streams']} × {o['rows_per_stream']:,}",
            f"{o['alarms']} ({o['frequency']:.3f})",
            f"{s['alarms']} of {s['streams']} ({s['frequency']:.3f})",
            f"{a['eval_false_alarms']} of {a['eval_streams']} ({a['eval_false_alarm_frequency']:.3f})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if all("long_streams" in d for d in result["datasets"]):
        lines += ["", "Long clean streams (false alarms):", ""]
        lines += [
            "| dataset | streams × rows | ours | on the *served* p-values |",
            "| --- | --- | --- | --- |",
        ]
        for d in result["datasets"]:
            g = d["long_streams"]
            lines.append(
                f"| {d['dataset']} | {g['streams']} × {g['rows_per_stream']:,} | {g['ours_alarms']} | "
                f"{g['served_p_alarms']} |"
            )
    lines += [
        "",
        f"Detection delay (shifted rows up to and including the alarm, after {plan['prefix']:,} clean rows; "
        f"median [q25, q75] over {plan['delay_streams']} streams; '>' = not within {plan['max_after']:,}):",
        "",
        "| dataset | severity | shift | ours | alibi CVM | ours ≤ alibi |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for d in result["datasets"]:
        for s in d["severities"]:
            o, a = s["ours"], s["alibi"]
            if o["median_delay"] is None and a["median_delay"] is None:
                verdict = f"neither within {plan['max_after']:,}"
            else:
                ours, theirs = o["median_delay"], a["median_delay"]
                verdict = "yes" if ours is not None and (theirs is None or ours <= theirs) else "**no**"
            lines.append(
                f"| {d['dataset']} | {s['severity']} | {s['shift']} | {_fmt_delay(o, plan)} | "
                f"{_fmt_delay(a, plan)} | {verdict} |"
            )
    t = result["targets"]
    lines += [
        "",
        f"Targets: false-alarm frequency ≤ δ on every dataset: {_met(t['false_alarms_le_delta'])}; median "
        "delay ≤ alibi's on every severity that either detects: "
        f"{_met(t['median_delay_le_alibi_every_severity'])}; clearly shifted digits (λ = 0.5) alarmed within "
        f"1,500 rows: {_met(t['digits_clear_shift_alarm_within_1500_rows'])}.",
    ]
    return "\n".join(lines)


def _fmt_delay(d: dict[str, Any], plan: dict[str, Any]) -> str:
    if d["median_delay"] is None:
        return f"> {plan['max_after']:,}"
    q75 = d["q75_delay"]
    q75s = f"> {plan['max_after']:,}" if q75 > plan["max_after"] else f"{q75:.0f}"
    extra = f"; {d['false_alarms_in_prefix']} prefix alarms" if d["false_alarms_in_prefix"] else ""
    return f"{d['median_delay']:.0f} [{d['q25_delay']:.0f}, {q75s}]{extra}"
