"""The fidelity self-check that ends every training run: does Hydra still speak for its teachers on
inputs nobody tuned for?

Probe families (`training/probes.py`, generated from the training rows with their own seed; each
family is marked `in_transfer` when a transfer family draws from it too, as the rows rescaled about
the origin do for the unit-error families: other draws of a family the student saw), and the
dataset's own OOD sets (`ood:<name>`: the built-ins', or the rows of `--ood FILE`), are run
through the exported `ensemble.onnx`, `kd.onnx` and `model.onnx`; per family we report each
method's OOD AUROC against the held-out test rows, Hydra's and KD's retention, and the Spearman
correlation of Hydra's knowledge uncertainty (mutual information / epistemic variance) with the
ensemble's over test ∪ probes.

A run *passes* when Spearman ≥ `SPEARMAN_MIN` and retention ≥ `RETENTION_MIN` on every family the
ensemble itself detects (AUROC ≥ `WELL_POSED_AUROC`; elsewhere retention divides by a margin near
zero and means nothing). Otherwise the CLI warns with the numbers, and `--strict` fails the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from service.uncertainty import CombinedOODScore
from training.config import PROBE_ROWS
from training.data import TaskData
from training.evaluate import (
    GRAPH_FILES,
    METHODS,
    graph_scores,
    knowledge_score,
    ood_metrics,
    ood_statistics,
    retention,
    run_graph,
    summarise,
)
from training.probes import probe_notes, probe_sets

SPEARMAN_MIN = 0.9
RETENTION_MIN = 0.9
WELL_POSED_AUROC = 0.7


def find_problems(score: str, spearman: float, families: dict[str, dict[str, Any]]) -> list[str]:
    """What fails the check, one readable line each (empty: passed)."""
    problems = []
    if spearman < SPEARMAN_MIN:
        problems.append(f"{score} Spearman vs the ensemble {spearman:.3f} < {SPEARMAN_MIN}")
    for name, entry in families.items():
        if entry["well_posed"] and entry["hydra_retention"] < RETENTION_MIN:
            problems.append(
                f"{name}: Hydra AUROC {entry['hydra']:.3f} vs ensemble {entry['ensemble']:.3f} "
                f"(retention {entry['hydra_retention']:.2f} < {RETENTION_MIN})"
            )
    return problems


def self_check(
    package_dir: Path,
    data: TaskData,
    scores: dict[str, str],
    seed: int,
    rows: int = PROBE_ROWS,
    combined: CombinedOODScore | None = None,
    in_transfer: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Probe the exported graphs; the report's `self_check` section. `scores` names each method's
    OOD score (the evaluation's choice: MI for multi-head graphs, total uncertainty for KD).
    `combined`: the served combined statistic (evaluate.py); then each family also reports
    Hydra's AUROC by its score, by the feature density and by the combination (`hydra_ood`).
    `in_transfer`: the probe families a transfer family also draws from (transfer.py,
    `families_in_transfer`), marked so in each family's entry."""
    task = data.task
    # the dataset's own OOD sets (built-in, or the user's --ood file) are checked like the probes
    probes = probe_sets(data.train.x, rows, seed) | {f"ood:{k}": v for k, v in data.ood.items()}
    sets = {"test": data.test.x} | probes
    bounds = np.cumsum([0, *(len(x) for x in sets.values())])
    summaries = {}
    density: dict[str, dict[str, np.ndarray]] = {}
    for m in METHODS:  # one session run per graph over every set, then split back
        outputs = run_graph(package_dir / GRAPH_FILES[m], np.concatenate(list(sets.values())), task)
        summaries[m] = {
            name: summarise(task, [o[a:b] for o in outputs])
            for name, a, b in zip(sets, bounds[:-1], bounds[1:], strict=True)
        }
        if m == "hydra":
            whole = graph_scores(task, outputs)
            density = {
                name: {k: v[a:b] for k, v in whole.items()}
                for name, a, b in zip(sets, bounds[:-1], bounds[1:], strict=True)
            }
    hydra_stats = {
        name: ood_statistics(summaries["hydra"][name], density.get(name, {}), scores["hydra"], combined)
        for name in sets
    }
    knowledge = knowledge_score(task)
    families: dict[str, Any] = {}
    for name in probes:
        entry: dict[str, Any] = {}
        for m in METHODS:
            id_scores, ood_scores = summaries[m]["test"].score(scores[m]), summaries[m][name].score(scores[m])
            entry[m] = round(ood_metrics(id_scores, ood_scores)["auroc"], 4)
        entry["hydra_retention"] = round(retention(entry["hydra"], entry["ensemble"]), 4)
        entry["kd_retention"] = round(retention(entry["kd"], entry["ensemble"]), 4)
        entry["well_posed"] = entry["ensemble"] >= WELL_POSED_AUROC
        entry["in_transfer"] = name in in_transfer
        if combined is not None:
            entry["hydra_ood"] = {
                k: round(ood_metrics(hydra_stats["test"][k], v)["auroc"], 4)
                for k, v in hydra_stats[name].items()
            }
        families[name] = entry

    h = np.concatenate([summaries["hydra"][s].score(knowledge) for s in sets])
    e = np.concatenate([summaries["ensemble"][s].score(knowledge) for s in sets])
    rho = spearmanr(h, e).statistic
    spearman = float(rho) if np.isfinite(rho) else 0.0

    problems = find_problems(knowledge, spearman, families)
    return {
        "passed": not problems,
        "problems": problems,
        "score": knowledge,
        "spearman": round(spearman, 4),
        "rows_per_family": rows,
        "seed": seed,
        "thresholds": {
            "spearman_min": SPEARMAN_MIN,
            "retention_min": RETENTION_MIN,
            "well_posed_auroc": WELL_POSED_AUROC,
        },
        "families": families,
        "notes": probe_notes() | {f"ood:{k}": v for k, v in data.ood_notes.items()},
    }
