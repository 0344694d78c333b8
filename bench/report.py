# ruff: noqa: E501  (long lines here are Markdown prose and table cells, kept whole for readability)
"""docs/BENCHMARKS.md from bench/results/*.json: every table from a recorded run, with its machine,
date and command. Parts that have not been run say so instead of showing numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bench import batching_rule

REPO_ROOT = Path(__file__).resolve().parents[1]
# BENCH_OUTPUT_DIR sends results and the document elsewhere (a trial run that must not overwrite the
# published ones): <dir>/results/*.json and <dir>/docs/BENCHMARKS.md + figures
_OUT = Path(os.environ["BENCH_OUTPUT_DIR"]) if os.environ.get("BENCH_OUTPUT_DIR") else None
RESULTS = _OUT / "results" if _OUT else REPO_ROOT / "bench" / "results"
DOC = _OUT / "docs" / "BENCHMARKS.md" if _OUT else REPO_ROOT / "docs" / "BENCHMARKS.md"
# hand-written reading of the latest published run (targets missed and why), appended verbatim
ANALYSIS = REPO_ROOT / "bench" / "analysis.md"


def load(part: str) -> dict[str, Any] | None:
    path = RESULTS / f"{part}.json"
    if not path.exists():
        return None
    result: dict[str, Any] = json.loads(path.read_text())
    if part == "quality":
        from bench.quality import derive

        result = derive(result)
    return result


def _pm(agg: dict[str, Any], key: str, digits: int = 3) -> str:
    if key not in agg:
        return "—"
    v = agg[key]
    if v["n"] > 1:
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"
    return f"{v['mean']:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _provenance(meta: dict[str, Any]) -> str:
    load_ = meta.get("loadavg_at_start")
    busy = "; ".join(meta.get("busiest_processes_at_start", [])[:3])
    gpu = meta.get("gpu") or "none"
    return (
        f"*Run {meta['date_utc']} on {meta['cpu']} ({meta['cores']} cores, {meta.get('memory_gib')} GiB, GPU: {gpu}), "
        f"commit `{meta.get('git_commit')}`, load average at start {load_} (busiest: {busy}). "
        f"Command: `{meta['command']}`.*"
    )


def _opening(title: str, result: dict[str, Any]) -> list[str]:
    """A section's first lines: its title and where and how its result was measured."""
    return [title, "", _provenance(result["machine"]), ""]


def _not_run(title: str, command: str) -> str:
    return f"{title}\n\nNot run yet: `{command}`.\n"


def _check(met: bool) -> str:
    return "**met**" if met else "**missed**"


# ------------------------------------------------------------------------------------------- suites


def _mean(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def _suite_tables(runs: list[dict[str, Any]]) -> list[str]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["dataset"], []).append(r)
    quality_rows, family_rows = [], []
    families: list[str] = list(runs[0]["self_check"]["families"]) if runs else []
    for name, rs in by.items():
        clf = rs[0]["task"] == "classification"
        key = "accuracy" if clf else "rmse"
        cells = [name, rs[0]["source"], key]
        cells += [_mean([r["test"][m][key] for r in rs], 4) for m in ("ensemble", "kd", "hydra")]
        cells.append(
            "—"
            if clf
            else " / ".join(_mean([r["test"][m]["coverage_95"] for r in rs]) for m in ("ensemble", "hydra"))
        )
        cells.append(_mean([r["self_check"]["spearman"] for r in rs]))
        kept = [
            min(
                (f["hydra_retention"] for f in r["self_check"]["families"].values() if f["well_posed"]),
                default=None,
            )
            for r in rs
        ]
        cells.append(_mean([k for k in kept if k is not None], 2))
        cells.append(str(sum(f["well_posed"] for r in rs for f in r["self_check"]["families"].values())))
        cells.append(f"{np.mean([r['transfer_size'] for r in rs]):,.0f}")
        cells.append(f"{np.mean([r['seconds'] for r in rs]):.0f}")
        quality_rows.append(cells)
        fam_cells = [name]
        for fam in families:
            fam_cells.append(
                " / ".join(
                    f"{np.mean([r['self_check']['families'][fam][m] for r in rs]):.2f}"
                    for m in ("ensemble", "kd", "hydra")
                )
                + (" ✓" if all(r["self_check"]["families"][fam]["well_posed"] for r in rs) else "")
            )
        family_rows.append(fam_cells)
    header = [
        "dataset",
        "source",
        "metric",
        "ensemble",
        "KD",
        "Hydra",
        "95% coverage ens / Hydra",
        "MI Spearman (test ∪ probes)",
        "min retention (families ens ≥ 0.7)",
        "families counted",
        "transfer rows",
        "run s",
    ]
    # † : a transfer family draws from this probe family too (the rows rescaled about the origin)
    seen = {f for r in runs for f, e in r["self_check"]["families"].items() if e.get("in_transfer")}
    marked = [f"{f} †" if f in seen else f for f in families]
    return [
        _table(header, quality_rows),
        "",
        "OOD AUROC per probe family, ensemble / KD / Hydra (✓: the ensemble detects it, AUROC ≥ 0.7, so "
        "retention counts"
        + ("; †: other draws of a transfer family, the rows rescaled about the origin" if seen else "")
        + "):",
        "",
        _table(["dataset", *marked], family_rows),
    ]


def suites_section(su: dict[str, Any] | None) -> str:
    title = "## 1b. Datasets nobody tuned on: tuning, confirmation and fresh suites"
    if su is None:
        return _not_run(title, "make bench-suites")
    from bench.suites import SUITES

    plan = su["plan"]
    out = _opening(title, su)
    out.append(
        f"Preset `{su['preset']}`: seeds {plan['seeds']} (mean ± std over seeds), {plan['members']} teachers, epochs "
        f"{plan['epochs'] or 'of the `file` preset'}; wall time {su['seconds']:.0f} s. Every dataset is written to a CSV "
        "and trained with `python -m training run --data FILE --target target --task …` (the `file` preset, the default "
        "recipe, no per-dataset setting). The **tuning** suite is where the recipe's settings were chosen. The "
        "**confirmation** suite was fixed before tuning began; one run of an intermediate recipe on it motivated one "
        'change (sparse far noise; docs/TRAINING.md, "How the recipe was chosen"). The **fresh** suite was added '
        "after that run; its miss and the confirmation suite's remaining one chose the `file` preset's wider student "
        "(2× the teachers' widths), and the **fresh2** suite was added with it, before its first run: it is the "
        "untouched evidence for that recipe. Since then the `file` preset's student is one 1024-wide layer with "
        "linear heads and the self-check probes 4,000 rows per family, both chosen on `tuning_wide` "
        '(docs/TRAINING.md, "Wide tables, measured with 4,000 probe rows"), and its transfer set has two copies of '
        "the rows rescaled about the origin, chosen on fresh4's seen miss (docs/TRAINING.md, \"Rows rescaled about "
        'the origin"); every table below was re-run with them. '
        "OOD families: the generic probe families of `training/probes.py`, scored by the run's own fidelity self-check "
        "on the exported graphs (ID = the test split; each method's own OOD score)."
    )
    for suite in plan["suites"]:
        runs = [r for r in su["runs"] if r["suite"] == suite]
        v = su["verdict"][suite]
        out += ["", f"### {suite.capitalize()} suite ({', '.join(d.name for d in SUITES[suite])})", ""]
        out += _suite_tables(runs)
        out += ["", _suite_criteria(v)]
    return "\n".join(out)


def _suite_criteria(v: dict[str, Any]) -> str:
    return (
        f"Criteria over every (dataset, seed): median MI Spearman {v['median_spearman']:.3f} ≥ 0.9 — "
        f"{_check(v['spearman_met'])}; retention ≥ 0.9 on every family the ensemble detects — "
        f"{_check(not v['low_retention'])}{(' (' + ', '.join(v['low_retention']) + ')') if v['low_retention'] else ''}; "
        f"no family inverted — {_check(not v['inverted'])}{(' (' + ', '.join(v['inverted']) + ')') if v['inverted'] else ''}; "
        f"accuracy within 1 pt of the ensemble — {_check(not v['accuracy_misses'])}"
        f"{(' (' + ', '.join(v['accuracy_misses']) + ')') if v['accuracy_misses'] else ''}; "
        f"regression coverage within 2 pts — {_check(not v['coverage_misses'])}"
        f"{(' (' + ', '.join(v['coverage_misses']) + ')') if v['coverage_misses'] else ''}."
    )


def fresh3_section(f3: dict[str, Any] | None) -> str:
    """The later suites (`--output suites_fresh3`): fresh3, defined before the two-layer student's
    last run, and fresh4, defined before the one-layer student's first run, its untouched evidence."""
    if f3 is None:
        return ""
    from bench.suites import SUITES

    plan = f3["plan"]
    names = ", ".join(sorted(plan["suites"], key=list(SUITES).index))
    out = [
        *_opening(f"### Later suites, on the recipe above ({names})", f3),
        f"Preset `{f3['preset']}`, seeds {plan['seeds']}, {plan['members']} teachers; wall time {f3['seconds']:.0f} s "
        f"(`python -m bench suites --only {','.join(plan['suites'])} --output suites_fresh3`). **fresh3** was defined "
        "and committed before the last run of the two-layer student, whose misses there (and fresh2's) sent us back "
        "to the wide tables: it is seen. **fresh4** was defined and committed before any run of the one-layer "
        'student chosen on `tuning_wide` (docs/TRAINING.md, "Wide tables, measured with 4,000 probe rows"); its one '
        "miss (friedman1 20d, rows ×0.1) chose the rescaled rows, so it is seen too. **fresh5** was defined and "
        "committed before any run of the recipe with the rescaled rows; its misses (caschool, Mroz) chose the "
        "heads' spread loss and the product-of-marginals copies, so it is seen too. **fresh6** was defined and "
        "committed before any run of that recipe: the untouched evidence for the recipe as it stands.",
    ]
    for suite in sorted(plan["suites"], key=list(SUITES).index):  # in definition order, however run
        runs = [r for r in f3["runs"] if r["suite"] == suite]
        out += ["", f"#### {suite.capitalize()} ({', '.join(d.name for d in SUITES[suite])})", ""]
        out += _suite_tables(runs)
        out += ["", _suite_criteria(f3["verdict"][suite])]
    return "\n".join(out)


def _ood_cells(rows: list[dict[str, Any]], families: list[str]) -> list[list[str]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["dataset"], []).append(r)
    table = []
    for name, rs in by.items():
        score = rs[0]["score"]
        cells = [name]
        for fam in families:
            present = [r["families"][fam] for r in rs if fam in r["families"]]
            if not present:
                cells.append("—")
                continue
            keys = [k for k in (score, "density", "input_density", "combined") if k in present[0]]
            mean = {k: float(np.mean([f[k] for f in present])) for k in keys}
            oracle = [f["oracle"] for f in present if "oracle" in f]
            mark = " ·" if oracle and np.mean(oracle) < 0.95 else ""
            cells.append(
                " / ".join(f"{mean[k]:.2f}" for k in keys[:-1]) + f" / **{mean['combined']:.2f}**{mark}"
            )
        table.append(cells)
    return table


def _band_note(v: dict[str, Any]) -> str:
    """What an exact conformal flag would show against the per-dataset band at these split sizes."""
    b = v.get("false_alarm_band_by_chance")
    if not b or not b["runs"]:
        return ""
    return (
        f"; an exact conformal flag at these calibration and test sizes leaves the band in "
        f"{b['expected_outside']:.1f} of {b['runs']} runs by chance alone (bench/ood.py `chance_outside_band`); "
        f"observed {b['observed_outside']}, P(≥ {b['observed_outside']}) = {b['p_at_least_observed']:.2f}"
    )


def _bound_note(v: dict[str, Any]) -> str:
    """How many best-score misses are worse than any symmetric rule must be (bench/ood.py)."""
    misses, beyond = v["best_of_two_misses"], v.get("best_of_two_misses_beyond_symmetric_bound")
    if not misses or beyond is None:
        return ""
    return (
        f" — of these {len(misses)}, {len(beyond)} lose more than the best *symmetric* rule would (+0.02) "
        "with one informative score and the others at chance (`symmetric_rule_auroc`)"
        + (": " + "; ".join(beyond) if beyond else "")
    )


OOD_CURRENT_TITLE = "### 1c, re-run on the current recipe"


def ood_current_section(od: dict[str, Any] | None) -> str:
    """`bench ood --output ood_current`: §1c's groups re-run after a recipe change, the rest kept."""
    if od is None:
        return ""
    suites = ", ".join(od["plan"]["suites"]) or "none"
    note = (
        f"The groups below were re-run (`{od['machine'].get('command', '')}`; suites {suites}) after the "
        "`--data` recipe gained the heads' spread loss and three marginals copies (docs/TRAINING.md), on its "
        "packages; fresh6 (defined after every OOD setting was fixed) joins fresh_ood2 as untouched evidence. The "
        "tables above them are the last full run, on the packages of an earlier recipe."
    )
    return ood_section(od, title=OOD_CURRENT_TITLE, level="####", note=note)


def ood_section(
    od: dict[str, Any] | None,
    title: str = "## 1c. The OOD flag beyond the ensemble: MI, feature densities, combined",
    level: str = "###",
    note: str = "",
) -> str:
    """Part 1c: what the ensemble's MI cannot see, what the feature density adds, and the served flag."""
    if od is None:
        return _not_run(title, "make bench-ood")
    from bench.ood import GROUPS, TUNED_ON, is_unit_error, verdict

    plan = od["plan"]
    out = _opening(title, od)
    if note:
        out += [note, ""]
    out.append(
        f"Preset `{od['machine'].get('preset', '?')}`: seeds {plan['seeds']} (cells: mean over seeds), the packages of "
        f"§1 and §1b (their checkpoints reused; export and evaluation re-run); wall time {od['seconds']:.0f} s. "
        "Cells: Hydra's OOD AUROC by **MI** (epistemic variance for regression) / by the **feature density** "
        "(class-conditional Mahalanobis on the shared body, `training/density.py`) / by **input typicality** "
        "(Mahalanobis of the standardised row, scored two-sided) / by the **combined** statistic the server flags on "
        "(Σ max(z, 0) over the three log-scale z-scores, each normalised on the validation split; conformal p-value on "
        "the calibration split). ID = the test split, each package's self-check probe rows per family "
        "(`training/probes.py`). "
        "· marks a family that even a supervised classifier *shown* its rows separates from ID rows with AUROC "
        "< 0.95 (3-fold CV, gradient boosting on raw features): not distinguishable, by anything. "
        f"Which data chose what: the body density's form and the rule were chosen on {', '.join(TUNED_ON)} "
        "(**tuning**); the first run of that statistic on every other built-in and suite table (**seen**) showed it "
        "blind to rows scaled ×0.1 on centred tables and chose the third component, two-sided input typicality "
        "(`training/density.py`, `InputDensity`); the **fresh** tables (`fresh_ood` in bench/suites.py) were fixed "
        "before that component first ran: they are the untouched evidence."
    )
    from bench.ood import symmetric_rule_auroc

    grid = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
    out += [
        "",
        "**What no fixed combination can avoid.** A rule that treats its scores alike cannot know which one a family "
        "will move. With one informative score (AUROC below) and the others at chance, the best such rule — the "
        "Neyman–Pearson test logsumexp(μz), even told μ — reaches only (independent Gaussian scores, Monte Carlo; "
        "`bench/ood.py`, `symmetric_rule_auroc`):",
        "",
        _table(
            ["scores", *[f"single {a:.2f}" for a in grid]],
            [[str(k), *[f"{symmetric_rule_auroc(a, k):.3f}" for a in grid]] for k in (2, 3)],
        ),
        "",
        'So "within 0.02 of the better of MI and density on every family" is out of reach of any row-wise rule '
        "wherever one score is moderately informative (≈ 0.57–0.97) and the other is not; a rule that favours one "
        "score meets it on that score's families and loses more on the other's. Misses that lose more than this "
        "bound (+0.02) are listed apart below: those a better rule could still recover.",
    ]
    titles = {
        "tuning": "Tuning datasets",
        "seen": "Seen datasets (chose the third component and the unseen-value count's thresholds)",
        "fresh": "Fresh datasets (fixed before the third component; randhie motivated the count)",
        "untouched": "Untouched datasets (mixed tables, fixed before the unseen-value count first ran)",
    }
    for group in GROUPS:
        rows = [r for r in od["rows"] if r.get("group") == group]
        if not rows:
            continue
        families = list(dict.fromkeys(f for r in rows for f in r["families"]))
        unit = [f for f in families if is_unit_error(f)]
        other = [f for f in families if not is_unit_error(f) and not f.startswith("ood:")]
        own = [f for f in families if f.startswith("ood:")]
        v = verdict(rows)  # recomputed from the rows: the criteria live in bench/ood.py only
        out += [
            "",
            f"{level} {titles[group]}",
            "",
            "Unit errors (a training row, every feature or one, × k):",
            "",
        ]
        out.append(_table(["dataset", *unit], _ood_cells(rows, unit)))
        out += ["", "Other probe families, and the datasets' own OOD sets (built-ins):", ""]
        out.append(_table(["dataset", *other, *own], _ood_cells(rows, other + own)))
        fa = v["false_alarm_pooled"]
        out += [
            "",
            f"Criteria over every (dataset, seed): combined AUROC ≥ 0.95 on unit-error families where MI ≤ 0.5 — "
            f"{_check(not v['unit_blind_misses'])}"
            f"{(' (' + '; '.join(v['unit_blind_misses']) + ')') if v['unit_blind_misses'] else ''}"
            f"{(' — and on families no classifier separates (· above): ' + '; '.join(v['unit_blind_misses_unseparable'])) if v['unit_blind_misses_unseparable'] else ''}; "
            f"combined within 0.02 of the best single score (MI, density or typicality) on every other family — "
            f"{_check(not v['best_of_two_misses'])}"
            f"{(' (' + '; '.join(v['best_of_two_misses']) + ')') if v['best_of_two_misses'] else ''}"
            f"{_bound_note(v)}; "
            f"in the issue's own words, within 0.02 of the better of MI and density — "
            f"{_check(not v.get('better_of_mi_and_density_misses', []))}"
            f"{(' (' + '; '.join(v['better_of_mi_and_density_misses']) + ')') if v.get('better_of_mi_and_density_misses') else ''}; "
            f"realised false-alarm rate at α = 0.05 on unseen ID test rows, pooled: {fa['flagged']}/{fa['rows']} = "
            f"{100 * fa['rate']:.2f} % — {_check(abs(fa['rate'] - 0.05) <= 0.02)}; per dataset with ≥ 300 test rows "
            f"within 5 ± 2 % — {_check(not v['false_alarm_off'])}"
            f"{(' (' + ', '.join(v['false_alarm_off']) + ')') if v['false_alarm_off'] else ''}"
            f"{_band_note(v)}.",
        ]
        out += [
            "",
            "False alarms at α = 0.05 on the held-out test rows (served code), and over 400 random "
            "re-partitions of calibration ∪ test rows (what the guarantee is about: mean, 5th–95th percentile):",
            "",
        ]
        fa_rows = []
        for r in rows:
            fa = r["false_alarm"]
            if "resampled" not in fa:
                continue
            rs = fa["resampled"]
            fa_rows.append(
                [
                    f"{r['dataset']} s{r['seed']}",
                    str(fa.get("n_cal", "")),
                    str(fa["n_test"]),
                    f"{100 * fa['served_rate']:.1f} %",
                    f"{100 * rs['mean']:.1f} % [{100 * rs['p05']:.1f}, {100 * rs['p95']:.1f}]",
                ]
            )
        if fa_rows:
            out.append(
                _table(["dataset", "calibration rows", "test rows", "realised", "re-partitioned"], fa_rows)
            )
    return "\n".join(out)


def external_section(ex: dict[str, Any] | None) -> str:
    """Part 1d: the user's own ONNX teachers distilled with `--teachers`."""
    title = "## 1d. The user's own ONNX teachers (`training run --teachers`)"
    if ex is None:
        return _not_run(title, "make bench-external")
    from bench.external import verdict

    out = _opening(title, ex)
    out.append(
        f"Preset `{ex['preset']}`, wall time {ex['seconds']:.0f} s. Each ensemble is made as a user would make it, "
        "outside our code: scikit-learn pipelines (StandardScaler + model) fitted on the table's training split and "
        "exported with skl2onnx — **mlp5**: five `MLPClassifier`s (widths 32, 64, 128, 64×64, 32×32); **mixed**: three "
        "of them and two `GradientBoostingClassifier`s. Then `python -m training run --data FILE --target target "
        "--task classification --teachers FOLDER` (the `file` preset, no per-dataset setting). MI Spearman: Hydra vs "
        "the teachers run one by one in onnxruntime (`OnnxTeachers`), over test ∪ probe rows. Retention: on every "
        "probe family the teachers detect (AUROC ≥ 0.7)."
    )
    rows = []
    for r in ex["runs"]:
        acc = r["accuracy"]
        worst = min(r["families"].items(), key=lambda kv: kv[1]["hydra_retention"], default=None)
        rows.append(
            [
                r["dataset"],
                r["ensemble"],
                " / ".join(f"{acc[m]:.4f}" for m in ("ensemble", "kd", "hydra")),
                f"{r['spearman_vs_teachers']:.3f}",
                str(len(r["families"])),
                "—" if worst is None else f"{worst[1]['hydra_retention']:.2f} ({worst[0]})",
                f"{r['seconds']:.0f}",
            ]
        )
    header = ["dataset", "ensemble", "accuracy ens / KD / Hydra", "MI Spearman vs teachers", "families counted",
              "min retention (family)", "run s"]  # fmt: skip
    out += ["", _table(header, rows)]
    v = verdict(ex["runs"])
    out += [
        "",
        "Criteria (accuracy within 2 pts, MI Spearman ≥ 0.9, retention ≥ 0.9 on every family the teachers detect): "
        + _check(v["met"])
        + (f" — misses: {'; '.join(v['misses'])}" if v["misses"] else "")
        + ".",
    ]
    return "\n".join(out)


def splits_section(sp: dict[str, Any] | None) -> str:
    """How much one table's result moves when other rows fall into training and test."""
    if sp is None:
        return ""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in sp["runs"]:
        by.setdefault(r["dataset"], []).append(r)
    rows = []
    for name, rs in by.items():
        key = "accuracy" if rs[0]["task"] == "classification" else "rmse"
        gaps = [abs(f["ensemble"] - f["hydra"]) for r in rs for f in r["self_check"]["families"].values()]
        spearman = [r["self_check"]["spearman"] for r in rs]
        rows.append(
            [
                name,
                ", ".join(str(k) for k in sorted({r["split_seed"] for r in rs})),
                " / ".join(_mean([r["test"][m][key] for r in rs]) for m in ("ensemble", "hydra")),
                f"{min(spearman):.3f} – {max(spearman):.3f}",
                f"{sum(r['self_check']['passed'] for r in rs)} of {len(rs)}",
                f"{max(gaps):.3f}",
            ]
        )
    header = [
        "dataset",
        "split seeds",
        "accuracy / RMSE ensemble / Hydra",
        "MI Spearman",
        "self-check passed (runs)",
        "largest AUROC gap, ensemble vs Hydra, over families",
    ]
    return "\n".join(
        [
            *_opening("### Split stability", sp),
            "The same tables with other train / validation / calibration / test splits (`split_seed`), each "
            f"with teacher seeds {sorted({r['seed'] for r in sp['runs']})}: a recipe that held by luck of the "
            "split would move here (with the recipe before, moving one row from training to test flipped Hydra's "
            "AUROC on a family from 0.00 to 0.99).",
            "",
            _table(header, rows),
        ]
    )


# ------------------------------------------------------------------------------------------ quality


def quality_section(q: dict[str, Any] | None) -> str:
    if q is None:
        return _not_run("## 1. Quality: ensemble vs KD vs Hydra", "make bench-quality")
    out = _opening("## 1. Quality: ensemble vs KD vs Hydra", q)
    plan = q["plan"]
    wall = (
        f"{q['seconds']:.0f} s" if "seconds" in q else "— (a partial result: the run is going on or stopped)"
    )
    out.append(
        f"Preset `{q['preset']}`: datasets {', '.join(plan['datasets'])}; seeds {plan['seeds']} (mean ± std over "
        f"seeds, population std); {plan['members']} teachers; epochs per stage: "
        + ", ".join(f"{d} {plan['epochs'].get(d) or 'preset'}" for d in plan["datasets"])
        + f' ("preset" = training/presets.py PRESETS; the full RunConfig of every run is in bench/results/quality.json). Wall time {wall}. Every number is '
        "from `training.pipeline.run_all` (evaluation on the exported ONNX graphs). OOD: positive class, "
        "each method's own score (ensemble/Hydra: mutual information or variance of means; KD, one head: "
        "total entropy / total variance). Retention = (AUROC_Hydra − 0.5) / (AUROC_ensemble − 0.5)."
    )
    out.append("")
    agg = q["aggregate"]
    for dataset, a in agg.items():
        run = next(r for r in q["runs"] if r["dataset"] == dataset)
        oods = list(run["methods"]["hydra"]["ood"])
        classification = "methods.hydra.test.accuracy" in a
        quality_keys = (
            ["accuracy", "nll", "ece", "brier"]
            if classification
            else ["rmse", "nll", "coverage_95", "mean_interval_width"]
        )
        header = ["method", *quality_keys, *[f"AUROC {o}" for o in oods], *[f"FPR95 {o}" for o in oods]]
        rows = []
        for m in ("ensemble", "kd", "hydra"):
            rows.append(
                [
                    m,
                    *[_pm(a, f"methods.{m}.test.{k}") for k in quality_keys],
                    *[_pm(a, f"methods.{m}.ood.{o}.auroc") for o in oods],
                    *[_pm(a, f"methods.{m}.ood.{o}.fpr_at_95tpr", 2) for o in oods],
                ]
            )
        out += [f"### {dataset}", "", _table(header, rows), ""]
        fid = [
            ["MI/variance Spearman vs ensemble", _pm(a, "fidelity.spearman")],
            ["MI/variance RMSE vs ensemble", _pm(a, "fidelity.rmse", 4)],
            *[[f"AUROC retention, {o}", _pm(a, f"methods.hydra.ood.{o}.retention")] for o in oods],
            [
                "AUROC retention, mean over sets the ensemble detects (AUROC ≥ 0.7)",
                _pm(a, "retention_well_posed"),
            ],
            *[[f"KD AUROC retention, {o}", _pm(a, f"methods.kd.ood.{o}.retention")] for o in oods],
            ["conformal false-alarm rate at α = 0.01 (ID test)", _pm(a, "conformal.false_alarm_rate.0.01")],
            ["conformal false-alarm rate at α = 0.05 (ID test)", _pm(a, "conformal.false_alarm_rate.0.05")],
            *[[f"flag rate at α = 0.05, {o}", _pm(a, f"conformal.ood_flag_rate.{o}")] for o in oods],
        ]
        out += [_table(["Hydra fidelity", "value"], fid), ""]
    out += [
        "![MI scatter](quality_mi_scatter.png)",
        "",
        "![OOD ROC](quality_ood_roc.png)",
        "",
        "![reliability](quality_reliability.png)",
        "",
    ]
    out += [
        "Figures: seed 0 of each dataset. MI scatter: Hydra's vs the ensemble's knowledge uncertainty per input "
        "(test and OOD sets); ROC: each method's own OOD score; reliability: 15 equal-width bins (bins with ≥ 5 rows).",
        "",
    ]
    if q.get("ablations"):
        out.append(ablation_section(q))
    if q.get("shift"):
        out.append(shift_section(q["shift"]))
    return "\n".join(out)


def ablation_section(q: dict[str, Any]) -> str:
    plan = q["plan"]
    agg = q["ablation_aggregate"]
    first = next(iter(q["ablations"]))
    oods = list(first["methods"]["hydra"]["ood"])
    header = [
        "variant",
        "M",
        "Hydra FLOPs/row",
        "Hydra acc",
        "NLL",
        "ECE",
        *[f"AUROC {o}" for o in oods],
        "retention (ens. AUROC ≥ 0.7)",
        "MI Spearman",
        "false alarm α=.05",
        "distil+export+eval s",
    ]
    members = {r["variant"]: r["members"] for r in q["ablations"]}
    flops = {r["variant"]: r.get("hydra_flops_per_row") for r in q["ablations"]}
    seconds: dict[str, list[float]] = {}
    for r in q["ablations"]:
        seconds.setdefault(r["variant"], []).append(r["seconds"])
    rows = []
    for name, a in agg.items():
        rows.append(
            [
                name,
                str(members[name]),
                f"{flops[name]:,}" if flops.get(name) else "—",
                _pm(a, "methods.hydra.test.accuracy"),
                _pm(a, "methods.hydra.test.nll"),
                _pm(a, "methods.hydra.test.ece"),
                *[_pm(a, f"methods.hydra.ood.{o}.auroc") for o in oods],
                _pm(a, "retention_well_posed"),
                _pm(a, "fidelity.spearman"),
                _pm(a, "conformal.false_alarm_rate.0.05"),
                f"{sum(seconds[name]) / len(seconds[name]):.0f}",
            ]
        )
    d = next(r["distil"] for r in q["ablations"] if r["variant"] == "default")
    transfer = f"train + {d['mixup_copies']} mixup + {d['noise_copies']} noisy"
    for key, label in (
        ("far_copies", "far multi-scale noise"),
        ("marginal_copies", "product-of-marginals"),
        ("extrapolate_copies", "extrapolated"),
        ("shift_copies", "shifted"),
    ):
        if d.get(key):
            transfer += f" + {d[key]} {label}"
    transfer += " copies" + (", radial temperature" if d.get("radial_temperature") else "")
    notes = (
        f"Variants change one thing against `default` (the dataset's preset with this run's epochs: "
        f"{next(r['members'] for r in q['ablations'] if r['variant'] == 'default')} teachers, linear heads, "
        f"phase 1 ({d['phase1_epochs']} epochs) then phase 2 ({d['phase2_epochs']} epochs) with the body at "
        f"{d['phase2_body_lr_scale']}× the learning rate, T = {d['temperature']}, transfer set = {transfer}, "
        f"diversity penalty {d['diversity_weight']}). `M=4/16`: teachers and heads. `2-layer heads`: the last two dense "
        "layers per head (own teachers, same seeds). `phase 1 off`: phase 2 from an untrained body for the same total "
        "epochs, body at full rate (heads start identical). `body frozen` / `body full lr`: phase-2 body rate 0 / 1×. "
        "`T=1/4`: distillation temperature. `diversity w`: Hydra+-style penalty w × mean pairwise cosine similarity of "
        "head weights. `transfer: train only`: distil on the training inputs alone. `transfer: near only`: without the far "
        "noise, product-of-marginals and extrapolated copies (the recipe before the far families). `radial temperature off`: one "
        "temperature for every row."
    )
    return "\n".join(
        [
            f"### Ablations ({plan['ablation_dataset']}, seeds {plan['ablation_seeds']}, epochs "
            f"{plan['ablation_epochs'] or 'preset'})",
            "",
            notes,
            "",
            _table(header, rows),
            "",
            "![ablations](quality_ablations.png)",
            "",
        ]
    )


def shift_section(shift: dict[str, Any]) -> str:
    header = [
        "severity k",
        "acc ens",
        "acc KD",
        "acc Hydra",
        "MI ens",
        "MI Hydra",
        "entropy KD",
        "Hydra flag rate",
    ]
    rows = []
    for e in shift["levels"]:
        rows.append(
            [
                str(e["level"]),
                f"{e['ensemble']['accuracy']:.3f}",
                f"{e['kd']['accuracy']:.3f}",
                f"{e['hydra']['accuracy']:.3f}",
                f"{e['ensemble']['mutual_information']:.4f}",
                f"{e['hydra']['mutual_information']:.4f}",
                f"{e['kd']['total_entropy']:.3f}",
                f"{e['hydra']['flag_rate']:.3f}",
            ]
        )
    return "\n".join(
        [
            "### Uncertainty vs shift severity (MNIST-1D)",
            "",
            "MNIST-1D regenerated by its own generator (another seed per level) with correlated noise × (1 + 0.3k) and "
            f"shear × (1 + 0.1k) (the `shifted` OOD set of training/data.py is 4× noise, 2× shear). Package: seed 0 of the main run. Flag rate: "
            f"Hydra's conformal OOD flag at α = {shift['alpha']} (calibrated on unshifted data: ≈ α at k = 0).",
            "",
            _table(header, rows),
            "",
            "![shift](quality_shift.png)",
            "",
        ]
    )


# --------------------------------------------------------------------------------------------- cost


def cost_section(
    c: dict[str, Any] | None,
    title: str = "## 2. Serving cost: Hydra vs the ensemble",
    figure: str = "cost.png",
) -> str:
    if c is None:
        return _not_run(title, "make bench-cost")
    versions = c["machine"]["versions"]
    out = [
        *_opening(title, c),
        f"In-process ONNX Runtime {versions.get('onnxruntime') or versions.get('onnxruntime-gpu')}, "
        f"provider {c['provider']}{' with IO binding' if c['io_binding'] else ''}, session options as the server's "
        f"({c.get('intra_op_threads') or 'default (one per core)'} intra-op threads, no spin-waiting). Each graph ran ≈ {c['seconds_per_cell']} s per batch size, the "
        "three graphs interleaved in 5 slices so that background load hits them alike. FLOPs are counted from each "
        "graph by `bench/flops.py` (2 per multiply-accumulate; element-wise ops 1 per element; see its docstring). "
        "`member` is one teacher cut out of `ensemble.onnx` (`bench/members.py`).",
        "",
    ]
    for name, w in c["workloads"].items():
        f = w["flops_per_row"]
        out += [
            f"### {name} (`{w['package']}`)",
            "",
            f"FLOPs per row: Hydra {f['hydra']:,}, ensemble {f['ensemble']:,}, one member {f['member']:,}. "
            f"FLOP ratio ensemble / Hydra = **{w['flop_ratio_ensemble_over_hydra']:.2f}**; Hydra / member = "
            f"{w['flop_ratio_hydra_over_member']:.3f}.",
            "",
        ]
        header = [
            "batch",
            "Hydra rows/s",
            "ensemble rows/s",
            "member rows/s",
            "Hydra p50 / p99 ms",
            "ensemble p50 / p99 ms",
            "speedup",
            "speedup / FLOP ratio",
            "target ≥ 0.9",
        ]
        rows = []
        for cell in w["cells"]:
            t = cell["timings"]
            rows.append(
                [
                    str(cell["batch"]),
                    f"{t['hydra']['rows_per_s']:,.0f}",
                    f"{t['ensemble']['rows_per_s']:,.0f}",
                    f"{t['member']['rows_per_s']:,.0f}",
                    f"{t['hydra']['p50_ms']:.3f} / {t['hydra']['p99_ms']:.3f}",
                    f"{t['ensemble']['p50_ms']:.3f} / {t['ensemble']['p99_ms']:.3f}",
                    f"{cell['speedup_vs_ensemble']:.2f}×",
                    f"{cell['speedup_over_flop_ratio']:.2f}",
                    _check(cell["target_met"]),
                ]
            )
        out += [_table(header, rows), ""]
    out += [f"![cost]({figure})", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- server


def server_section(
    s: dict[str, Any] | None, title: str = "## 3. The server under load", figure: str = "server.png"
) -> str:
    if s is None:
        return _not_run(title, "make bench-server")
    out = [
        *_opening(title, s),
        f"V2 JSON `infer` requests (the same bytes for every server; no `outputs`, so every default answer tensor) "
        f"from `wrk` (Debian's package, `bench/wrk_post.lua`) in its own process on loopback: {s['seconds_per_cell']} s "
        f"per cell after a 1 s warm-up. (a) `hydra`: our server, max batch {s['max_batch_size']} rows, queue delay "
        f"{s['max_queue_delay_ms']} ms; (b) `hydra-b1`: our server with max batch size 1 (every row its own model "
        "run; a 32-row request is split into 32 runs); (a') `hydra-delay`: (a) with `run_when_idle=false`, "
        "Triton's rule — a partial batch waits out the delay even when the model is idle; (a) runs what is "
        "queued as soon as the model is free; (c) `triton`: Triton through PyTriton 0.7.0 (Debian "
        f"python3.11 venv), dynamic batcher with the same max batch and delay, its Python backend running the same "
        "ONNX graph in ONNX Runtime and the same `service.inference` answer code; (d) in-process ORT on `model.onnx` "
        "at the batch the cell could form, min(rows × clients, max batch), timed for 1 s right after each cell with "
        "the server idle (the machine's speed drifts over a run). Latencies are wrk's, per request. "
        "`batch` is the mean rows per model run during the cell (from each server's own counters). "
        f'"four outputs": the same request naming {", ".join(s.get("lean_outputs", []))} in `outputs`, so both '
        "servers encode the same answer (Triton's full answer carries BYTES label names and float32 printed as "
        "doubles). (e) / (f): no model at all — a bare ASGI app on the same uvicorn (httptools, uvloop) that "
        "parses the body with orjson and answers our server's four-output answer bytes, and the same as a FastAPI "
        "route (`bench/ceilings.py`): the web stack's floor on this machine.",
        "",
    ]
    configs = s["configs"]
    for name, w in s["workloads"].items():
        out += [f"### {name}", ""]
        for failure in w.get("failures", []):
            out += [f"**Not measured** (the server failed): {failure}", ""]
        for n_rows in sorted({c["rows_per_request"] for c in w["cells"]}):
            header = [
                "clients",
                "server",
                "rows/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "mean batch",
                "bytes/answer",
                "(d) ORT rows/s",
                "÷ (d)",
            ]
            rows = []
            for conc in sorted({c["concurrency"] for c in w["cells"] if c["rows_per_request"] == n_rows}):
                for cfg in configs:
                    cell = next(
                        (
                            c
                            for c in w["cells"]
                            if c["config"] == cfg
                            and c["rows_per_request"] == n_rows
                            and c["concurrency"] == conc
                        ),
                        None,
                    )
                    if cell is None:
                        continue
                    # (d) timed right after the cell where the run did so, else at the workload's start
                    d = cell.get("ceiling_adjacent", w["ceiling"][str(cell["ceiling_batch"])])["rows_per_s"]
                    rows.append(
                        [
                            str(conc),
                            LABELS.get(cfg, cfg),
                            f"{cell['rows_per_s']:,.0f}",
                            f"{cell['p50_ms']:.1f}",
                            f"{cell['p99_ms']:.1f}",
                            str(cell["errors"]),
                            "—" if cell["mean_batch_rows"] is None else str(cell["mean_batch_rows"]),
                            f"{cell.get('bytes_per_response', 0):,.0f}",
                            f"{d:,.0f} (b={cell['ceiling_batch']})",
                            # the web-stack ceilings run no model: a share of ORT's rate says nothing
                            "—" if cfg.startswith("ceiling") else f"{100 * cell['rows_per_s'] / d:.1f}%",
                        ]
                    )
            out += [f"**{n_rows}-row requests**", "", _table(header, rows), ""]
        if w.get("paired"):
            p = w["paired"]
            out += [
                f"**The batching rule in paired rounds** (`bench/batching_rule.py`): {p['rounds']} rounds; in each, "
                "every config's server alone on the machine, started afresh, its cells back to back, the order "
                f"reversed each round; {p['seconds_per_cell']} s per cell; medians over rounds, and each round's "
                "rows/s. These judge the batching rule's targets below: the grid above runs each server minutes "
                "apart.",
                "",
                _table(
                    ["rows × clients", "server", "rows/s", "p50 ms", "p99 ms", "errors", "rows/s per round"],
                    batching_rule.table(p),
                ),
                "",
            ]
            if p.get("same_server_twice"):
                twins = p["same_server_twice"]["instances_in_start_order"]
                out += [
                    "A/A control, same run: two identical servers (batch 64, run when idle) kept up together, "
                    "one client, measured alternately: "
                    + "; ".join(
                        f"started {i + 1}{'st' if i == 0 else 'nd'}: median {t['median_rows_per_s']:,.0f} rows/s "
                        f"({', '.join(f'{x:,.0f}' for x in t['rows_per_s'])})"
                        for i, t in enumerate(twins)
                    )
                    + ". Their gap is what separate server instances differ by on this machine with no "
                    "difference in code or settings.",
                    "",
                ]
        out += [
            "Targets:",
            "",
            _table(
                ["target", "measured", ""],
                [[t["target"], t["value"], _check(t["met"])] for t in w["targets"]],
            ),
            "",
        ]
        for cell, prof in w.get("profiles", {}).items():
            leaf = ", ".join(f"{k} {v}%" for k, v in prof["leaf_percent"][:8])
            out += [
                f"py-spy, (a) at {cell.replace('x', ' rows × ')} clients ({prof['samples']} samples, all threads, "
                f"% of samples by leaf function): {leaf}.",
                "",
            ]
    out += [f"![server]({figure})", ""]
    return "\n".join(out)


GRPC_LABELS = {"v2_json": "V2 JSON (wrk)", "v2_binary": "V2 binary (wrk)", "grpc": "gRPC (h2load)"}


def grpc_section(g: dict[str, Any] | None) -> str:
    """§3c from bench/results/grpc.json (`python -m bench grpc`)."""
    title = "## 3c. Open Inference Protocol over gRPC vs V2 JSON vs V2 binary"
    if g is None:
        return _not_run(title, "python -m bench grpc")
    out = [
        *_opening(title, g),
        f"One server process ({g['model']}, max batch {g['max_batch_size']}, delay {g['max_queue_delay_ms']} ms) "
        f"answering all three protocols; every default answer tensor; {g['in_flight']} requests in flight: wrk "
        f"with {g['in_flight']} keep-alive connections for V2 JSON and V2 binary (tritonclient.http's default "
        f"encoding), h2load (nghttp2) with {g['h2load_connections']} connections × "
        f"{g['in_flight'] // g['h2load_connections']} streams for gRPC, sending the `ModelInferRequest` "
        "tritonclient.grpc builds (raw_input_contents). "
        f"{g['seconds_per_cell']} s per cell after a 1 s warm-up, {g['rounds']} interleaved rounds, median shown "
        "(all rounds in bench/results/grpc.json). Client and server CPU are per request (server: warm-up "
        "included, so an upper bound). gRPC errors are counted by the server (`hydra_requests_total`), not "
        "counting the streams h2load resets (CANCELLED) when its timed warm-up and run end.",
        "",
    ]
    header = [
        "rows/request",
        "protocol",
        "rows/s",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "client CPU µs/req",
        "server CPU µs/req",
    ]
    rows = []
    for n, cells in g["cells"].items():
        for protocol in ("v2_json", "v2_binary", "grpc"):
            c = cells[protocol]
            errors = c.get("grpc_non_ok", c.get("errors", 0) + c.get("non_2xx", 0) + c.get("http_failed", 0))
            rows.append(
                [
                    n,
                    GRPC_LABELS[protocol],
                    f"{c['rows_per_s']:,.0f}",
                    f"{c['requests_per_s']:,.0f}",
                    f"{c['p50_ms']:.1f}",
                    f"{c['p99_ms']:.1f}",
                    f"{errors:.0f}",
                    f"{c['client_cpu_us_per_request']:.0f}",
                    f"{c['server_cpu_us_per_request']:.0f}",
                ]
            )
    out += [_table(header, rows), ""]
    ratio_rows = [
        [
            n,
            f"{c['ratios']['grpc_over_v2_json']:.2f}×",
            f"{c['ratios']['grpc_over_v2_binary']:.2f}×",
            f"{c['ratios']['v2_binary_over_v2_json']:.2f}×",
        ]
        for n, c in g["cells"].items()
    ]
    out += [
        _table(["rows/request", "gRPC ÷ V2 JSON", "gRPC ÷ V2 binary", "V2 binary ÷ V2 JSON"], ratio_rows),
        "",
    ]
    ceiling_rows = []
    for n, c in g["ceiling"].items():
        h = g.get("http_ceiling", {}).get(n)
        ceiling_rows.append(
            [
                n,
                f"{c['requests_per_s']:,.0f}",
                f"{c['client_cpu_us_per_request']:.0f}",
                f"{g['cells'][n]['grpc']['requests_per_s'] / c['requests_per_s']:.0%}",
                f"{h['requests_per_s']:,.0f}" if h else "-",
                f"{h['client_cpu_us_per_request']:.0f}" if h else "-",
                f"{g['cells'][n]['v2_json']['requests_per_s'] / h['requests_per_s']:.0%}" if h else "-",
            ]
        )
    out += [
        "Ceilings, same run: the same requests against servers that answer the captured answer bytes and do "
        "nothing else (`bench.grpc_echo`): gRPC = a grpc.aio server on uvloop, as ours, driven by h2load; "
        "HTTP = uvicorn + a FastAPI route, as ours, driven by wrk. They bound what each transport and its "
        "load generator can carry on this machine, and show the load generator is not the bottleneck:",
        "",
        _table(
            [
                "rows/request",
                "gRPC echo req/s",
                "h2load CPU µs/req",
                "ours gRPC ÷ echo",
                "HTTP echo req/s",
                "wrk CPU µs/req",
                "ours V2 JSON ÷ echo",
            ],
            ceiling_rows,
        ),
        "",
    ]
    one = g["cells"].get("1")
    if one is not None:
        met = one["ratios"]["grpc_over_v2_json"] >= 1.5
        out += [
            f"Issue 14's target, gRPC one-row ≥ 1.5 × V2 JSON: {_check(met)} "
            f"({one['ratios']['grpc_over_v2_json']:.2f}×).",
            "",
        ]
    for cell, prof in g.get("profiles", {}).items():
        leaf = ", ".join(f"{k} {v}%" for k, v in prof["leaf_percent"][:8])
        incl = ", ".join(f"{k} {v}%" for k, v in prof["inclusive_percent"][:14])
        out += [
            f"py-spy of the server, {cell.replace('_', ' ')} ({prof['samples']} samples, all threads): by leaf "
            f"{leaf}; inclusive {incl}.",
            "",
        ]
    return "\n".join(out)


LABELS = {
    "hydra": "(a) ours, batching",
    "hydra-lean": "(a) ours, four outputs",
    "hydra-b1": "(b) ours, batch 1",
    "hydra-delay": "(a') ours, Triton's delay rule",
    "triton": "(c) Triton",
    "triton-lean": "(c) Triton, four outputs",
    "ceiling-asgi": "(e) bare ASGI ceiling",
    "ceiling-fastapi": "(f) FastAPI-route ceiling",
}


def write(extra: dict[str, str] | None = None) -> Path:
    q, c, s = load("quality"), load("cost"), load("server")
    gpu_cost, gpu_server = load("gpu_cost"), load("gpu_server")
    c1, su, sp = load("cost_1thread"), load("suites"), load("suites_splits")
    parts = [HEADER, headline(q, c, s, su, load("suites_fresh3")), quality_section(q), suites_section(su)]
    if load("suites_fresh3"):
        parts.append(fresh3_section(load("suites_fresh3")))
    if sp:
        parts.append(splits_section(sp))
    parts.append(ood_section(load("ood")))
    if load("ood_current"):
        parts.append(ood_current_section(load("ood_current")))
    parts.append(external_section(load("external")))
    parts.append(cost_section(c))
    if c1:
        parts.append(
            cost_section(c1, "### 2b. Serving cost with one ORT thread per session", "cost_1thread.png")
        )
    parts.append(server_section(s))
    parts.append(grpc_section(load("grpc")))
    from bench.workers import section as workers_section

    parts.append(workers_section(load("workers")))
    parts.append(gpu_section(RESULTS / "gpu"))
    if gpu_cost or gpu_server:  # bench/gpu.sh on a connected GPU machine (project venv, wrk)
        parts += [
            cost_section(gpu_cost, "### 4a. GPU (bench/gpu.sh): serving cost", "gpu_cost.png"),
            server_section(gpu_server, "### 4b. GPU (bench/gpu.sh): server", "gpu_server.png"),
        ]
    from bench.drift import section as drift_section
    from bench.shadow import section as shadow_section

    parts.append(drift_section(load("drift")))
    parts.append(shadow_section(load("shadow")))
    if ANALYSIS.exists():
        parts.append(ANALYSIS.read_text())
    for title, text in (extra or {}).items():
        parts.append(f"## {title}\n\n{text}\n")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n\n".join(p.rstrip() for p in parts) + "\n")
    return DOC


HEADER = """# Benchmarks

Generated by `python -m bench report` from `bench/results/*.json` (each part rewrites its JSON and this file:
`make bench` runs all parts; `make bench-quality` (with the suites of §1b), `make bench-suites`, `make bench-cost`, `make bench-server` one each; `bench/gpu.sh`
on a GPU machine). Every table and figure below comes from the run whose machine, date, load and command head
its section — no number in them is typed in by hand; only the closing "Reading the results" is written by hand
(`bench/analysis.md`). Measurements on a shared 2-core machine: compare numbers *within* a section (same run),
not across sections. Tests of the bench code itself: `pytest tests/bench` (FLOP counter on hand-built graphs,
member extraction, targets, report)."""

GPU_NOT_RUN = "Not run yet: no GPU lent to this session (2026-12-01)."

GPU_METHOD = """On an air-gapped GPU host (python3.12, nothing of ours): `python -m bench.offline_prep --out build/offline-gpu`
on a connected machine (cp312 wheelhouse, onnxruntime-gpu in ≤ 58 MiB parts with SHA-256); carry the repository
and that folder; on the host `python3 -m bench.gpu_run --wheelhouse build/offline-gpu --target /tmp/hydra-site
--out gpu-out` (reassembles and checks the parts, installs into the private target, stops with exit 2 unless a
CUDA session really runs on CUDA, then cost and server within `--budget-s`, default 420 s; ≤ 4 files); copy
`gpu-out/*.json` into `bench/results/gpu/` and run `python -m bench report`. On a connected GPU machine with
the project venv and wrk, `bench/gpu.sh` runs parts 2 and 3 as sections 4a/4b instead."""


def _load_folder(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def gpu_section(folder: Path) -> str:
    """§4 from bench.gpu_run's files (gpu_env.json, gpu_cost.json, gpu_server.json) in `folder`."""
    env, cost, server = (_load_folder(folder, n) for n in ("gpu_env", "gpu_cost", "gpu_server"))
    out = ["## 4. GPU", ""]
    if env is None:
        return "\n".join([*out, GPU_NOT_RUN, "", GPU_METHOD, ""])
    smi = env.get("nvidia_smi") or {}
    gpus = ", ".join(
        f"{g['name']} (driver {g.get('driver', '?')}, {g.get('memory', '?')})" for g in smi.get("gpus", [])
    )
    label = env.get("label") or ("CUDA" if env.get("cuda") else "CPU")
    out += [
        f"*Run {env['date_utc']} by `bench.gpu_run` on {gpus or 'no GPU seen by nvidia-smi'}; {env.get('cpu')} "
        f"({env.get('cores')} cores), Python {env.get('python')}, ONNX Runtime {env.get('onnxruntime')} "
        f"(providers available: {', '.join(env.get('available_providers', []))}), commit `{env.get('git_commit')}`, "
        f"{env.get('elapsed_s')} s of a {env.get('budget_s')} s budget. Command: `{env.get('command')}`.*",
        "",
        f"Provider: **{label}** (a session asked for CUDA came up on {', '.join(env.get('session_providers', []))}).",
        "",
    ]
    if not env.get("cuda"):
        out += [f"{env.get('reason', 'CUDA was not in use.')}", ""]
    if cost is None:
        out += ["No cost results (the run stopped before them).", ""]
    else:
        out += [
            f"### Serving cost: Hydra vs the ensemble (`{cost['package']}`, {label})",
            "",
            f"{cost['timing']}; seeded rows shaped {cost['row_shape']}; the two graphs interleaved in "
            f"{cost['slices']} slices, ≈ {cost['seconds_per_cell']:.2f} s per graph and batch; median over runs.",
            "",
        ]
        rows = [
            [
                str(c["batch"]),
                f"{c['timings']['hydra']['median_ms']:.3f}",
                f"{c['timings']['ensemble']['median_ms']:.3f}",
                f"{c['timings']['hydra']['rows_per_s']:,.0f}",
                f"{c['timings']['ensemble']['rows_per_s']:,.0f}",
                f"{c['speedup_vs_ensemble']:.2f}×",
            ]
            for c in cost["cells"]
        ]
        header = ["batch", "Hydra ms", "ensemble ms", "Hydra rows/s", "ensemble rows/s", "speedup"]
        out += [_table(header, rows), ""]
    if server is None:
        out += ["No server results (the run stopped before them).", ""]
        return "\n".join(out)
    out += [f"### The server: CUDA vs CPU ({label})", ""]
    if "skipped" in server:
        return "\n".join([*out, f"**Not measured**: {server['skipped']}", ""])
    ceiling = {c["concurrency"]: c for c in server.get("ceiling", {}).get("cells", [])}
    out += [
        f"`python -m service` on 127.0.0.1 (max batch {server['max_batch_size']}), {server['rows_per_request']}-row V2 "
        f"JSON requests from the {server['client']}; {server['seconds_per_cell']} s per cell. The client's own ceiling "
        "is measured against a trivial stdlib HTTP server in the same run (`client ceiling`).",
        "",
    ]
    rows = []
    for name, cfg in server["configs"].items():
        if "cells" not in cfg:
            rows.append([name, "—", "—", "—", "—", "—", cfg.get("skipped") or cfg.get("failed", "")])
            continue
        for c in cfg["cells"]:
            top = ceiling.get(c["concurrency"])
            share = (
                f"{100 * c['requests_per_s'] / top['requests_per_s']:.0f}%"
                if top and top["requests_per_s"]
                else "—"
            )
            rows.append(
                [
                    name,
                    str(c["concurrency"]),
                    f"{c['requests_per_s']:,.0f}",
                    _ms(c["p50_ms"]),
                    _ms(c["p99_ms"]),
                    str(c["errors"]),
                    f"{cfg.get('provider_reported')}; {share} of client ceiling",
                ]
            )
    for c in ceiling.values():
        rows.append(
            [
                "client ceiling",
                str(c["concurrency"]),
                f"{c['requests_per_s']:,.0f}",
                _ms(c["p50_ms"]),
                _ms(c["p99_ms"]),
                str(c["errors"]),
                "trivial stdlib server",
            ]
        )
    out += [_table(["server", "clients", "req/s", "p50 ms", "p99 ms", "errors", "provider / note"], rows), ""]
    return "\n".join(out)


def headline(
    q: dict[str, Any] | None,
    c: dict[str, Any] | None,
    s: dict[str, Any] | None,
    su: dict[str, Any] | None = None,
    later: dict[str, Any] | None = None,
) -> str:
    lines = ["## Headline", ""]
    verdicts = {**(su or {}).get("verdict", {}), **(later or {}).get("verdict", {})}
    for suite in ("confirmation", "fresh", "fresh2", "fresh3", "fresh4", "fresh5", "fresh6"):
        if suite in verdicts:
            v = verdicts[suite]
            misses = v["low_retention"] + v["inverted"] + v["accuracy_misses"] + v["coverage_misses"]
            lines.append(
                f"- **Distillation on data nobody tuned on ({suite} suite, §1b)**: median MI Spearman "
                f"{v['median_spearman']:.3f}; "
                + (
                    "every criterion met."
                    if v["met"]
                    else f"missed in {len(misses)} cell(s): {', '.join(misses)}."
                )
            )
    if c:
        for name, w in c["workloads"].items():
            sp = ", ".join(f"{x['speedup_vs_ensemble']:.2f}× at batch {x['batch']}" for x in w["cells"])
            lines.append(
                f"- **Serving cost ({name})**: Hydra runs {sp} faster than the {w['flop_ratio_ensemble_over_hydra']:.2f}×-FLOP "
                f"ensemble it replaces; target ≥ 0.9 × FLOP ratio {'met at every batch' if all(x['target_met'] for x in w['cells']) else 'missed at some batch (see §2)'}."
            )
    if q:
        for dataset, a in q["aggregate"].items():
            if "methods.hydra.test.accuracy" in a:
                lines.append(
                    f"- **Quality ({dataset})**: accuracy ensemble {_pm(a, 'methods.ensemble.test.accuracy')}, "
                    f"KD {_pm(a, 'methods.kd.test.accuracy')}, Hydra {_pm(a, 'methods.hydra.test.accuracy')}; "
                    f"Hydra keeps {_pm(a, 'retention_well_posed', 2)} of the ensemble's OOD AUROC margin (mean over the OOD sets the ensemble detects, AUROC ≥ 0.7), "
                    f"MI Spearman {_pm(a, 'fidelity.spearman', 2)}."
                )
            else:
                lines.append(
                    f"- **Quality ({dataset})**: RMSE ensemble {_pm(a, 'methods.ensemble.test.rmse')}, Hydra "
                    f"{_pm(a, 'methods.hydra.test.rmse')}; 95% coverage {_pm(a, 'methods.ensemble.test.coverage_95', 2)} vs "
                    f"{_pm(a, 'methods.hydra.test.coverage_95', 2)}; retention {_pm(a, 'retention_well_posed', 2)}."
                )
    if s:
        for name, w in s["workloads"].items():
            for t in w["targets"]:
                lines.append(f"- **Server ({name})**: {t['target']}: {t['value']} — {_check(t['met'])}.")
    if len(lines) == 2:
        lines.append("No part has been run yet.")
    return "\n".join(lines)
