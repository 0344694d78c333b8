"""report.json, report.md and PNG plots for one evaluated package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from service.uncertainty import ClassificationUncertainty, RegressionUncertainty
from training.data import TaskData
from training.evaluate import METHODS, Evaluation, ReliabilityBins

COLORS = {"ensemble": "tab:blue", "kd": "tab:gray", "hydra": "tab:orange"}


def _pyplot() -> Any:
    """matplotlib's pyplot, headless, imported when a plot is drawn: at the top it cost every process
    that imports the pipeline (a training CLI start, each test worker's collection) 0.3 s."""
    import matplotlib

    matplotlib.use("Agg")  # headless; set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)  # pyplot keeps every open figure alive until closed


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _retention(o: dict[str, Any]) -> str:
    if "retention" not in o:
        return "—"
    lo, hi = o["retention_ci95"]
    return f"{o['retention']:.3f} [{lo:.2f}, {hi:.2f}]"


def markdown(report: dict[str, Any]) -> str:
    methods = report["methods"]
    lines = [f"# Evaluation: {report['dataset']} ({report['task']})", ""]
    lines += ["Every number comes from the exported ONNX graphs run in onnxruntime.", ""]
    lines += ["Split sizes: " + ", ".join(f"{k} {v}" for k, v in report["sizes"].items()), ""]
    quality_keys = list(methods["hydra"]["test"])
    lines += ["## Test-set quality", "", "| method | heads | " + " | ".join(quality_keys) + " |"]
    lines += ["| --- " * (len(quality_keys) + 2) + "|"]
    for m in METHODS:
        row = methods[m]["test"]
        lines.append(
            f"| {m} | {methods[m]['heads']} | " + " | ".join(_fmt(row[k]) for k in quality_keys) + " |"
        )
    lines += ["", "## OOD detection (OOD positive; score per method in brackets)", ""]
    lines += [
        "| OOD set | method [score] | AUROC | AUPR-out | FPR@95TPR | retention [bootstrap 95% CI] |",
        "| --- " * 6 + "|",
    ]
    for name in report["ood_sets"]:
        for m in METHODS:
            o = methods[m]["ood"][name]
            lines.append(
                f"| {name} | {m} [{methods[m]['ood_score']}] | {o['auroc']:.4f} | {o['aupr_out']:.4f} | "
                f"{o['fpr_at_95tpr']:.4f} | {_retention(o)} |"
            )
    lines += ["", "OOD sets: " + "; ".join(f"**{k}** — {v}" for k, v in report["ood_sets"].items()), ""]
    f = report["fidelity"]
    lines += ["## Fidelity to the ensemble (ID test ∪ OOD sets)", ""]
    lines += [
        f"- {f['score']}: Spearman {f['spearman']:.4f}, RMSE {f['rmse']:.4g} "
        f"(ensemble mean {f['ensemble_mean']:.4g})"
    ]
    if "label_agreement" in f:
        lines += [
            f"- labels: Hydra's is the ensemble's on {100 * f['label_agreement']:.1f} % of test rows "
            f"({f['labels_flipped']} flipped; widest ensemble margin among them "
            f"{f['widest_flipped_margin']:.3f})"
        ]
    lines += self_check_markdown(report["self_check"])
    lines += ood_statistic_markdown(report)
    c = report["conformal"]
    lines += ["", "## Conformal OOD flag (Hydra, calibration split)", ""]
    lines += [
        f"- score {c['score']} ({' + '.join(c.get('components', [c['score']]))}), "
        f"n = {c['n_calibration']} calibration rows"
    ]
    lines += [f"- false-alarm rate on ID test at α = {a}: {r:.4f}" for a, r in c["false_alarm_rate"].items()]
    lines += [
        f"- flag rate at α = {c['default_alpha']} on {k}: {r:.4f}" for k, r in c["ood_flag_rate"].items()
    ]
    lines += ["", "## Mean uncertainty per set", ""]
    keys = list(methods["hydra"]["uncertainty"]["test"])
    lines += ["| method | set | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 2) + "|"]
    for m in METHODS:
        for s, vals in methods[m]["uncertainty"].items():
            lines.append(f"| {m} | {s} | " + " | ".join(f"{vals[k]:.4g}" for k in keys) + " |")
    if "runtime_seconds" in report:
        lines += ["", "## Runtime (seconds)", ""]
        lines += [f"- {k}: {v:.1f}" for k, v in report["runtime_seconds"].items()]
    return "\n".join(lines) + "\n"


def ood_statistic_markdown(report: dict[str, Any]) -> list[str]:
    """Hydra's AUROC per set by its uncertainty score, by the feature density and by the combination."""
    # the dataset's own OOD sets are in the self-check as `ood:<name>`, beside the probe families
    rows = {k: f["hydra_ood"] for k, f in report["self_check"]["families"].items() if "hydra_ood" in f}
    if not rows:
        return []
    keys = list(next(iter(rows.values())))
    lines = ["", "## Hydra's OOD statistic: uncertainty score, feature densities, combined (AUROC)", ""]
    lines += ["| set | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{v[k]:.4f}" for k in keys) + " |" for name, v in rows.items()]
    lines += [
        "",
        "The served `ood_score` is `combined`: Σ max(z, 0) over the components' log-scale z-values (input "
        "typicality two-sided), each normalised on the validation split, with the count of unseen discrete "
        "values (where the table has discrete columns) ranked ahead; its p-value is conformal on the "
        "calibration split.",
    ]
    return lines


def self_check_markdown(sc: dict[str, Any]) -> list[str]:
    t = sc["thresholds"]
    verdict = "**passed**" if sc["passed"] else "**FAILED**: " + "; ".join(sc["problems"])
    seen = [k for k, f in sc["families"].items() if f.get("in_transfer")]
    seen_note = "; † other draws of a transfer family, the rows rescaled about the origin"
    title = "generic probe families" + (seen_note if seen else ", none in the transfer set")
    lines = ["", f"## Fidelity self-check ({title})", ""]
    lines += [
        f"- {verdict} (Spearman ≥ {t['spearman_min']}, retention ≥ {t['retention_min']} where the "
        f"ensemble's AUROC ≥ {t['well_posed_auroc']})",
        f"- {sc['score']} Spearman, Hydra vs ensemble, over test ∪ probes: {sc['spearman']:.4f}",
        f"- {sc['rows_per_family']} rows per family, seed {sc['seed']}; ID = the test split",
        "",
        "| family | ensemble AUROC | KD AUROC | Hydra AUROC | Hydra retention | counted |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, f in sc["families"].items():
        lines.append(
            f"| {name}{' †' if f.get('in_transfer') else ''} | {f['ensemble']:.4f} | {f['kd']:.4f} | "
            f"{f['hydra']:.4f} | "
            f"{f['hydra_retention']:.3f} | {'yes' if f['well_posed'] else 'no'} |"
        )
    lines += ["", "Families: " + "; ".join(f"**{k}** — {v}" for k, v in sc["notes"].items())]
    return lines


def _reliability(ev: Evaluation, data: TaskData, path: Path) -> None:
    fig, ax = _pyplot().subplots(figsize=(5, 5))
    for m in METHODS:
        u = ev.summaries[m]["test"]
        assert isinstance(u, ClassificationUncertainty)
        bins = ReliabilityBins.of(u.confidence, u.label == data.test.y)
        ax.plot(
            bins.confidence,
            bins.accuracy,
            "o-",
            color=COLORS[m],
            label=f"{m} (ECE {ev.report['methods'][m]['test']['ece']:.3f})",
        )
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="confidence (max p̄)", ylabel="accuracy", title=f"Reliability — {data.name} test")
    ax.legend()
    _save(fig, path)


def _scatter(ev: Evaluation, data: TaskData, path: Path) -> None:
    score = ev.report["fidelity"]["score"]
    fig, ax = _pyplot().subplots(figsize=(5, 5))
    for name in ["test", *data.ood]:
        e = ev.summaries["ensemble"][name].score(score)
        h = ev.summaries["hydra"][name].score(score)
        ax.scatter(e, h, s=6, alpha=0.5, label=name)
    hi = max(float(ax.get_xlim()[1]), float(ax.get_ylim()[1]))
    ax.plot([0, hi], [0, hi], "k--", lw=1)
    f = ev.report["fidelity"]
    ax.set(xlabel=f"ensemble {score}", ylabel=f"Hydra {score}", title=f"Spearman {f['spearman']:.3f}")
    ax.legend(markerscale=3)
    _save(fig, path)


def _histograms(ev: Evaluation, data: TaskData, path: Path) -> None:
    fig, axes = _pyplot().subplots(1, 3, figsize=(13, 3.6))
    for ax, m in zip(axes, METHODS, strict=True):
        score = ev.report["methods"][m]["ood_score"]
        values = {name: ev.summaries[m][name].score(score) for name in ["test", *data.ood]}
        top = max(float(np.quantile(v, 0.995)) for v in values.values()) or 1.0
        bins = np.linspace(0, top, 40)
        for name, v in values.items():
            # np.histogram + stairs draws the same PNG, byte for byte, as ax.hist (one filled
            # outline instead of a patch per bin): 0.3 s a report instead of 0.8 s
            heights, _ = np.histogram(np.clip(v, 0, top), bins=bins, density=True)
            ax.stairs(heights, bins, fill=True, alpha=0.5, label=name)
        ax.set(title=f"{m}: {score}", xlabel=score)
        ax.legend()
    _save(fig, path)


def _band(ev: Evaluation, data: TaskData, package_dir: Path, path: Path) -> None:
    from training.evaluate import GRAPH_FILES, run_graph, summarise

    grid = np.linspace(-7, 7, 400, dtype=np.float32)[:, None]
    fig, axes = _pyplot().subplots(1, 3, figsize=(14, 4), sharey=True)
    for ax, m in zip(axes, METHODS, strict=True):
        u = summarise("regression", run_graph(package_dir / GRAPH_FILES[m], grid, "regression"))
        assert isinstance(u, RegressionUncertainty)
        lo, hi = u.interval(0.95)
        ax.scatter(data.train.x[:, 0], data.train.y, s=3, c="k", alpha=0.3, label="train")
        ax.fill_between(grid[:, 0], lo, hi, alpha=0.3, color=COLORS[m], label="95% interval (total)")
        epi = 1.96 * np.sqrt(u.epistemic_variance)
        ax.fill_between(
            grid[:, 0], u.mean - epi, u.mean + epi, alpha=0.5, color="tab:red", label="± 1.96 epistemic sd"
        )
        ax.plot(grid[:, 0], u.mean, color=COLORS[m])
        ax.set(title=m, xlabel="x", ylim=(-5, 5))
    axes[0].legend(loc="lower right", fontsize=7)
    _save(fig, path)


def write_report(ev: Evaluation, data: TaskData, package_dir: Path) -> list[Path]:
    package_dir.mkdir(parents=True, exist_ok=True)
    written = [package_dir / "report.json", package_dir / "report.md"]
    written[0].write_text(json.dumps(ev.report, indent=2) + "\n")
    written[1].write_text(markdown(ev.report))
    plots = {"ood_histograms.png": _histograms}
    if data.task == "classification":
        plots |= {"reliability.png": _reliability, "mi_scatter.png": _scatter}
    else:
        plots |= {"variance_scatter.png": _scatter}
    for name, fn in plots.items():
        fn(ev, data, package_dir / name)
        written.append(package_dir / name)
    if data.name == "toy":
        _band(ev, data, package_dir, package_dir / "predictive_band.png")
        written.append(package_dir / "predictive_band.png")
    return written


def results_table(reports: list[dict[str, Any]]) -> str:
    """The side-by-side results table of docs/TRAINING.md (ensemble / KD / Hydra) for report.json files."""
    lines = [
        "| dataset | method | heads | accuracy | NLL | ECE | OOD AUROC per set (retention [95% CI]) "
        "| MI Spearman vs ensemble | false alarms α=0.05 / 0.01 |",
        "| --- " * 9 + "|",
    ]
    for report in reports:
        if report["task"] != "classification":
            continue
        for m in METHODS:
            r = report["methods"][m]
            t = r["test"]
            ood = ", ".join(
                f"{k} {v['auroc']:.3f}"
                + (
                    f" ({v['retention']:.2f} [{v['retention_ci95'][0]:.2f}, {v['retention_ci95'][1]:.2f}])"
                    if "retention" in v
                    else ""
                )
                for k, v in r["ood"].items()
            )
            rho = f"{report['fidelity']['spearman']:.3f}" if m == "hydra" else "—"
            far = report["conformal"]["false_alarm_rate"]
            alarms = f"{far['0.05']:.3f} / {far['0.01']:.3f}" if m == "hydra" else "—"
            lines.append(
                f"| {report['dataset']} | {m} [{r['ood_score']}] | {r['heads']} | {t['accuracy']:.4f} | "
                f"{t['nll']:.4f} | {t['ece']:.4f} | {ood} | {rho} | {alarms} |"
            )
    return "\n".join(lines) + "\n"
