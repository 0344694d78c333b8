"""PNG figures for docs/BENCHMARKS.md, drawn from real runs (packages and result JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

METHOD_COLORS = {"ensemble": "#1f77b4", "kd": "#ff7f0e", "hydra": "#2ca02c"}
CONFIG_COLORS = {
    "hydra": "#2ca02c",
    "hydra-lean": "#98df8a",
    "hydra-b1": "#9467bd",
    "hydra-delay": "#1f77b4",
    "triton": "#d62728",
    "triton-lean": "#ff9896",
    "ceiling-asgi": "#17becf",
    "ceiling-fastapi": "#bcbd22",
    "ceiling": "#7f7f7f",
}
LINESTYLES = ["-", "--", ":", "-."]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # pyplot keeps every open figure alive until closed
    return path


def _evaluations(packages: dict[str, Path]) -> dict[str, Any]:
    from training.config import DataConfig
    from training.data import load_data
    from training.evaluate import evaluate

    out = {}
    for dataset, package in packages.items():
        data = load_data(DataConfig(dataset=dataset))
        out[dataset] = (data, evaluate(package, data, None, 0.05))
    return out


def quality_figures(packages: dict[str, Path], docs: Path) -> list[Path]:
    """MI scatter, OOD ROC and reliability figures from one package per dataset (seed 0)."""
    evals = _evaluations(packages)
    written = [_mi_scatter(evals, docs / "quality_mi_scatter.png"), _roc(evals, docs / "quality_ood_roc.png")]
    classification = {k: v for k, v in evals.items() if v[0].task == "classification"}
    if classification:
        written.append(_reliability(classification, docs / "quality_reliability.png"))
    return written


def _mi_scatter(evals: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(evals), figsize=(4.2 * len(evals), 4.0), squeeze=False)
    for ax, (dataset, (data, ev)) in zip(axes[0], evals.items(), strict=True):
        score = "mutual_information" if data.task == "classification" else "epistemic_variance"
        for i, name in enumerate(["test", *data.ood]):
            e = ev.summaries["ensemble"][name].score(score)
            h = ev.summaries["hydra"][name].score(score)
            ax.scatter(e, h, s=6, alpha=0.5, label=name, color=f"C{i}")
        lim = max(float(np.max(ax.get_xlim())), float(np.max(ax.get_ylim())))
        ax.plot([0, lim], [0, lim], color="k", lw=0.8)
        if data.task == "regression":
            ax.set_xscale("symlog", linthresh=1e-3)
            ax.set_yscale("symlog", linthresh=1e-3)
        rho = ev.report["fidelity"]["spearman"]
        ax.set(title=f"{dataset}: Spearman {rho:.2f}", xlabel=f"ensemble {score}", ylabel=f"Hydra {score}")
        ax.legend(fontsize=7, markerscale=2)
    return _save(fig, path)


def _roc(evals: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(evals), figsize=(4.2 * len(evals), 4.0), squeeze=False)
    for ax, (dataset, (data, ev)) in zip(axes[0], evals.items(), strict=True):
        methods = ev.report["methods"]
        for method, color in METHOD_COLORS.items():
            score = methods[method]["ood_score"]
            id_scores = ev.summaries[method]["test"].score(score)
            for j, name in enumerate(data.ood):
                ood = ev.summaries[method][name].score(score)
                labels = np.r_[np.zeros(len(id_scores)), np.ones(len(ood))]
                fpr, tpr, _ = roc_curve(labels, np.r_[id_scores, ood])
                auc = methods[method]["ood"][name]["auroc"]
                ax.plot(
                    fpr, tpr, color=color, ls=LINESTYLES[j % 4], lw=1.2, label=f"{method} {name} {auc:.2f}"
                )
        ax.plot([0, 1], [0, 1], color="k", lw=0.5)
        ax.set(title=f"{dataset}: OOD ROC (AUROC)", xlabel="FPR (ID test)", ylabel="TPR (OOD)")
        ax.legend(fontsize=6)
    return _save(fig, path)


def _reliability(evals: dict[str, Any], path: Path, bins: int = 15) -> Path:
    fig, axes = plt.subplots(1, len(evals), figsize=(4.2 * len(evals), 4.0), squeeze=False)
    from training.evaluate import ReliabilityBins

    for ax, (dataset, (data, ev)) in zip(axes[0], evals.items(), strict=True):
        y = data.test.y
        for method, color in METHOD_COLORS.items():
            u = ev.summaries[method]["test"]
            b = ReliabilityBins.of(u.confidence, u.label == y, bins)
            shown = b.count >= 5  # a bin of a handful of rows is noise in a figure
            ece = ev.report["methods"][method]["test"]["ece"]
            ax.plot(
                b.confidence[shown],
                b.accuracy[shown],
                marker="o",
                ms=3,
                color=color,
                label=f"{method} ECE {ece:.3f}",
            )
        ax.plot([0, 1], [0, 1], color="k", lw=0.5)
        ax.set(title=f"{dataset}: reliability (test)", xlabel="confidence", ylabel="accuracy")
        ax.legend(fontsize=7)
    return _save(fig, path)


def shift_figure(shift: dict[str, Any], path: Path) -> Path:
    levels = [e["level"] for e in shift["levels"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method, color in METHOD_COLORS.items():
        axes[0].plot(
            levels, [e[method]["accuracy"] for e in shift["levels"]], marker="o", color=color, label=method
        )
        axes[1].plot(
            levels,
            [e[method]["total_entropy"] for e in shift["levels"]],
            marker="o",
            color=color,
            label=method,
        )
        if method != "kd":
            axes[2].plot(
                levels,
                [e[method]["mutual_information"] for e in shift["levels"]],
                marker="o",
                color=color,
                label=f"{method} MI",
            )
    twin = axes[2].twinx()
    twin.plot(
        levels,
        [e["hydra"]["flag_rate"] for e in shift["levels"]],
        marker="s",
        ls="--",
        color="k",
        label=f"Hydra OOD flag rate (alpha {shift['alpha']})",
    )
    twin.set_ylabel("flag rate")
    twin.set_ylim(0, 1)
    twin.legend(fontsize=7, loc="center right")
    for ax, title in zip(axes, ["accuracy", "mean total entropy", "mean mutual information"], strict=True):
        ax.set_xlabel("shift severity k (noise x(1+0.3k), shear x(1+0.1k))")
        ax.set_title(f"MNIST-1D: {title}")
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def ablation_figure(agg: dict[str, Any], path: Path) -> Path:
    names = list(agg)
    metrics = [
        ("methods.hydra.test.accuracy", "Hydra accuracy"),
        ("retention_well_posed", "OOD AUROC retention (ens. AUROC >= 0.7)"),
        ("fidelity.spearman", "MI Spearman vs ensemble"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        means = [agg[n][key]["mean"] if key in agg[n] else np.nan for n in names]
        stds = [agg[n][key]["std"] if key in agg[n] else 0 for n in names]
        ax.barh(
            range(len(names)),
            means,
            xerr=stds,
            color=["#2ca02c" if n == "default" else "#8c8c8c" for n in names],
        )
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
        lo = np.nanmin(np.array(means) - np.array(stds))
        ax.set_xlim(max(0.0, lo - 0.05), None)
    return _save(fig, path)


def cost_figure(cost: dict[str, Any], path: Path) -> Path:
    workloads = cost["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
    for ax, (name, w) in zip(axes[0], workloads.items(), strict=True):
        batches = [c["batch"] for c in w["cells"]]
        for graph, color in [("hydra", "#2ca02c"), ("ensemble", "#1f77b4"), ("member", "#7f7f7f")]:
            ax.plot(
                batches,
                [c["timings"][graph]["rows_per_s"] for c in w["cells"]],
                marker="o",
                color=color,
                label=graph,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("rows/s")
        ax.set_title(
            f"{name}: FLOP ratio {w['flop_ratio_ensemble_over_hydra']:.2f}, speedup "
            + "/".join(f"{c['speedup_vs_ensemble']:.2f}" for c in w["cells"]),
            fontsize=9,
        )
        ax.legend(fontsize=8)
    return _save(fig, path)


def server_figure(server: dict[str, Any], path: Path) -> Path:
    workloads = server["workloads"]
    sizes = sorted({c["rows_per_request"] for w in workloads.values() for c in w["cells"]})
    fig, axes = plt.subplots(
        len(workloads), len(sizes), figsize=(5.5 * len(sizes), 3.8 * len(workloads)), squeeze=False
    )
    for i, (name, w) in enumerate(workloads.items()):
        for j, n_rows in enumerate(sizes):
            ax = axes[i][j]
            for config in server["configs"]:
                cells = sorted(
                    (c for c in w["cells"] if c["config"] == config and c["rows_per_request"] == n_rows),
                    key=lambda c: c["concurrency"],
                )
                ax.plot(
                    [c["concurrency"] for c in cells],
                    [c["rows_per_s"] for c in cells],
                    marker="o",
                    color=CONFIG_COLORS.get(config),
                    label=config,
                )
            cells = sorted(
                (c for c in w["cells"] if c["config"] == "hydra" and c["rows_per_request"] == n_rows),
                key=lambda c: c["concurrency"],
            )
            ceil = [w["ceiling"][str(c["ceiling_batch"])]["rows_per_s"] for c in cells]
            ax.plot(
                [c["concurrency"] for c in cells],
                ceil,
                ls="--",
                color=CONFIG_COLORS["ceiling"],
                label="in-process ORT (d)",
            )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel("rows/s")
            ax.set_title(f"{name}: {n_rows}-row requests")
            ax.legend(fontsize=7)
    return _save(fig, path)
