"""bench/ood.py: the issue's criteria as code, the separability oracle, and the rendered section."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.ood import group_of, separability, verdict
from bench.report import ood_section


def _row(
    dataset: str, families: dict[str, dict[str, float]], flagged: int = 15, n: int = 300
) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "task": "classification",
        "group": group_of(dataset),
        "score": "mutual_information",
        "seed": 0,
        "families": families,
        "false_alarm": {"n_test": n, "flagged": flagged, "rate": flagged / n},
    }


def _family(mi: float, density: float, combined: float, oracle: float = 1.0) -> dict[str, float]:
    return {
        "mutual_information": mi,
        "density": density,
        "input_density": 0.5,
        "combined": combined,
        "oracle": oracle,
    }


def test_verdict_applies_each_criterion() -> None:
    good = _row("wine", {"scaled_x4": _family(0.1, 1.0, 1.0), "box": _family(0.9, 0.99, 0.98)})
    assert verdict([good])["met"]
    # MI blind on a unit error and the combination below 0.95: a miss, unless no classifier can separate it
    blind = _row("wine", {"scaled_x0.1": _family(0.1, 0.2, 0.9)})
    assert verdict([blind])["unit_blind_misses"] and not verdict([blind])["met"]
    unseparable = _row("wine", {"one_feature_x0.1": _family(0.45, 0.5, 0.5, oracle=0.6)})
    v = verdict([unseparable])
    assert not v["unit_blind_misses"] and v["unit_blind_misses_unseparable"]
    # elsewhere: within 0.02 of the better of MI and density
    lossy = _row("wine", {"independent": _family(0.9, 0.8, 0.87)})
    assert verdict([lossy])["best_of_two_misses"]
    # false alarms: 30 of 300 at alpha 0.05 is 10 %, outside 5 +- 2
    noisy = _row("wine", {"box": _family(0.9, 0.99, 0.99)}, flagged=30)
    assert verdict([noisy])["false_alarm_off"] and not verdict([noisy])["met"]


def test_separability_oracle_tells_apart_only_what_differs() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 4))
    assert separability(a, a[:100] * 10.0) > 0.95
    assert separability(a[:100], rng.standard_normal((100, 4))) < 0.75


def test_groups_and_section_render() -> None:
    groups = tuple(group_of(name) for name in ("digits", "wine", "moons", "chile", "boston"))
    assert groups == ("tuning", "seen", "fresh", "untouched", "untouched")
    rows = [
        _row("digits", {"scaled_x4": _family(0.2, 1.0, 1.0)}),
        _row("moons", {"scaled_x4": _family(0.2, 1.0, 1.0), "ood:noise": _family(0.9, 1.0, 1.0)}),
    ]
    machine = {"date_utc": "2026-01-01", "cpu": "cpu", "cores": 2, "command": "python -m bench ood"}
    doc = ood_section(
        {
            "plan": {"seeds": [0]},
            "machine": machine | {"preset": "reduced"},
            "rows": rows,
            "verdict": {"tuning": verdict(rows[:1]), "fresh": verdict(rows[1:])},
            "seconds": 1.0,
        }
    )
    assert (
        "### Fresh datasets (fixed before the third component" in doc
        and "| moons |" in doc
        and "**1.00**" in doc
    )
    assert "Seen datasets" not in doc  # no rows in that group
    from bench.report import OOD_CURRENT_TITLE, ood_current_section

    subset = {
        "plan": {"seeds": [0], "suites": ["fresh_ood"]},
        "machine": machine | {"preset": "reduced", "command": "python -m bench ood --output ood_current"},
        "rows": rows[1:],
        "seconds": 1.0,
    }
    again = ood_current_section(subset)
    assert again.startswith(OOD_CURRENT_TITLE) and "#### Fresh datasets" in again and "| moons |" in again
    assert "suites fresh_ood" in again and "Tuning datasets" not in again
    assert ood_current_section(None) == ""


def test_resampled_false_alarm_is_at_most_alpha_for_exchangeable_rows() -> None:
    from bench.ood import resampled_false_alarm

    rng = np.random.default_rng(3)
    cal, test = rng.standard_normal(299), rng.standard_normal(300)
    out = resampled_false_alarm(cal, test, alpha=0.05, draws=300)
    # E[rate] = floor(0.05 * 300) / 300 = 0.05 exactly for continuous exchangeable scores
    assert 0.045 <= out["mean"] <= 0.055 and out["p05"] < out["mean"] < out["p95"]
    # one split's realised rate scatters by about sqrt(0.05 * 0.95 / 300) ~ 1.3 pts per side
    assert 0.01 < out["p95"] - out["p05"] < 0.06


def test_symmetric_rule_bound_is_below_the_single_score_where_it_is_moderate() -> None:
    """The best symmetric rule pays for not knowing which score moves: > 0.02 at AUROC 0.8, more with
    more scores, nothing at chance, little when the informative score is near perfect."""
    from bench.ood import symmetric_rule_auroc

    assert symmetric_rule_auroc(0.5, 2) == 0.5
    two, three = symmetric_rule_auroc(0.8, 2), symmetric_rule_auroc(0.8, 3)
    assert 0.70 < three < two < 0.8 - 0.02
    assert symmetric_rule_auroc(0.999, 2) > 0.99
    # the sum of two unit scores is symmetric, so it cannot beat the bound (Φ(μ/2) with Φ(μ/√2) = 0.8)
    from scipy.stats import norm

    mu = np.sqrt(2) * norm.ppf(0.8)
    assert norm.cdf(mu / 2) <= two + 0.005


def test_verdict_lists_misses_beyond_the_symmetric_bound_apart() -> None:
    from bench.ood import verdict

    def row(combined: float) -> dict:
        fam = {"mutual_information": 0.80, "density": 0.5, "combined": combined, "oracle": 1.0}
        return {
            "dataset": "t",
            "seed": 0,
            "score": "mutual_information",
            "families": {"independent": fam},
            "false_alarm": {"flagged": 5, "n_test": 100, "rate": 0.05},
        }

    near = verdict([row(0.76)])  # a miss, but the best symmetric rule of 2 scores reaches only ≈ 0.745
    assert near["best_of_two_misses"] and not near["best_of_two_misses_beyond_symmetric_bound"]
    far = verdict([row(0.65)])
    assert far["best_of_two_misses_beyond_symmetric_bound"]


def test_the_literal_criterion_compares_with_the_better_of_mi_and_density_only() -> None:
    typicality_best = _family(0.6, 0.7, 0.75) | {"input_density": 0.9}
    rows = [_row("wine", {"independent": typicality_best, "shell": _family(0.6, 0.9, 0.85)})]
    v = verdict(rows)
    # against the best of three scores both miss; in the words (MI and density) only shell
    assert len(v["best_of_two_misses"]) == 2
    assert v["better_of_mi_and_density_misses"] == ["wine s0 shell (combined 0.850 vs 0.900)"]


def test_chance_outside_band_matches_a_simulated_exact_conformal_flag() -> None:
    """The served calibrator on continuous exchangeable scores, over fresh calibration and test
    draws: the share of splits whose realised rate leaves 5 ± 2 % is what the formula says."""
    from bench.ood import chance_outside_band, outside_band
    from service.uncertainty import ConformalOODCalibrator

    rng = np.random.default_rng(11)
    n_cal, n_test, draws = 300, 300, 3000
    outside = 0
    for _ in range(draws):
        calibrator = ConformalOODCalibrator(rng.random(n_cal))
        rate = float(calibrator.flags(rng.random(n_test), 0.05).mean())
        outside += outside_band(rate)
    expected = chance_outside_band(n_cal, n_test)
    # the formula against 3,000 simulated splits (binomial sd ~0.0075 at p ~0.2)
    assert 0.15 < expected < 0.28
    assert abs(outside / draws - expected) < 0.03
    # more rows narrow the spread: at 3,000 calibration and test rows the band is all but certain
    assert chance_outside_band(3000, 3000) < 0.001 < chance_outside_band(1000, 1000) < expected


def test_verdict_counts_band_misses_an_exact_flag_would_show_by_chance() -> None:
    rows = [
        _row(f"d{i}", {"box": _family(0.9, 0.99, 0.99)}, flagged=f, n=400)
        for i, f in enumerate([20, 21, 19, 36, 18])  # 36/400 = 9 %: outside 5 ± 2
    ]
    b = verdict(rows)["false_alarm_band_by_chance"]
    assert b["runs"] == 5 and b["observed_outside"] == 1
    # n_cal defaults to n_test (400): ~18 % each, so about one of five by chance
    assert 0.7 < b["expected_outside"] < 1.1
    assert 0.5 < b["p_at_least_observed"] < 0.75
