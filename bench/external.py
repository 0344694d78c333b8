"""Part 1d: distilling the user's own ONNX teachers (`python -m training run --teachers …`).

A user's ensemble is made here exactly as a user would make it, outside our training code:
scikit-learn models fitted on the training split of a table and exported with skl2onnx.

- `mlp5`: five `MLPClassifier`s of different widths and seeds (probabilities out).
- `mixed`: three `MLPClassifier`s and two `GradientBoostingClassifier`s.

Each ensemble is distilled with the documented command (the `file` preset, no per-dataset
setting), and we report, on the exported graphs: accuracy of the ensemble (the user's files run by
onnxruntime directly) and of Hydra, MI Spearman of Hydra vs the teachers over test ∪ probe rows
(the teachers run by `OnnxTeachers`, not the stacked graph), and Hydra's retention on every probe
family the teachers themselves detect (AUROC ≥ 0.7). Tables: suite tables of bench/suites.py that
the distillation recipe was not tuned on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ENSEMBLES = ("mlp5", "mixed")
ACCURACY_POINTS = 0.02
SPEARMAN_MIN = 0.9
RETENTION_MIN = 0.9


@dataclass(frozen=True)
class ExternalPlan:
    datasets: tuple[str, ...] = ("wine", "anes96", "clf_20d_4c", "blobs")
    ensembles: tuple[str, ...] = ENSEMBLES
    epochs: int | None = None  # None: the `file` preset's (what a user gets)
    seed: int = 0


def _models(kind: str, seed: int) -> list[tuple[str, Any]]:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.neural_network import MLPClassifier

    widths = [(32,), (64,), (128,), (64, 64), (32, 32)]
    mlps = [
        (f"mlp_{'x'.join(map(str, w))}_s{seed + i}", MLPClassifier(w, max_iter=400, random_state=seed + i))
        for i, w in enumerate(widths)
    ]
    if kind == "mlp5":
        return mlps
    trees = [
        (
            f"gbm_d{d}_s{seed + i}",
            GradientBoostingClassifier(n_estimators=60, max_depth=d, random_state=seed + i),
        )
        for i, d in enumerate((2, 3))
    ]
    return mlps[:3] + trees


def export_teachers(kind: str, x: np.ndarray, y: np.ndarray, folder: Path, seed: int = 0) -> list[Path]:
    """Fit the user's ensemble on (x, y) and write one .onnx per model (skl2onnx, ZipMap off)."""
    import warnings

    from skl2onnx import to_onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model in _models(kind, seed):
        pipe = make_pipeline(StandardScaler(), model)  # what a user would ship: scaling inside
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            pipe.fit(x, y)
        onx = to_onnx(pipe, x[:1].astype(np.float32), options={id(model): {"zipmap": False}})
        path = folder / f"{name}.onnx"
        path.write_bytes(onx.SerializeToString())
        paths.append(path)
    return paths


def _evaluate(package: Path, cfg: Any, report: dict[str, Any], specs: list[Any]) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from service.uncertainty import classification_uncertainty
    from training.evaluate import run_graph, summarise
    from training.onnx_teachers import OnnxTeachers
    from training.pipeline import load_task_data
    from training.probes import probe_sets

    data = load_task_data(cfg)
    sc = report["self_check"]
    probes = probe_sets(data.train.x, sc["rows_per_family"], sc["seed"])
    rows = np.concatenate([data.test.x, *probes.values()])
    teachers = classification_uncertainty(OnnxTeachers(specs).log_probs(rows)).mutual_information
    hydra = summarise("classification", run_graph(package / "model.onnx", rows, "classification"))
    rho = float(spearmanr(hydra.mutual_information, teachers).statistic)  # type: ignore[union-attr]
    t = report["methods"]
    counted = {k: f for k, f in sc["families"].items() if f["well_posed"]}
    return {
        "accuracy": {m: t[m]["test"]["accuracy"] for m in ("ensemble", "kd", "hydra")},
        "spearman_vs_teachers": round(rho if np.isfinite(rho) else 0.0, 4),
        "self_check_spearman": sc["spearman"],
        "families": {
            k: {m: f[m] for m in ("ensemble", "hydra", "hydra_retention")} for k, f in counted.items()
        },
        "min_retention": min((f["hydra_retention"] for f in counted.values()), default=None),
        "self_check_passed": sc["passed"],
    }


def run_external(plan: ExternalPlan, root: Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    from bench.suites import SUITES, write_csv
    from training.config import DataConfig, ExternalTeachersConfig
    from training.external import teacher_specs
    from training.pipeline import run_all
    from training.presets import make_config

    tables = {d.name: d for suite in SUITES.values() for d in suite}
    runs = []
    for name in plan.datasets:
        ds = tables[name]
        if ds.task != "classification":
            raise ValueError(f"{name}: part 1d distils classifiers")
        csv = write_csv(ds, root / "data")
        data_cfg = DataConfig(dataset="file", path=str(csv), target="target", task="classification")
        for kind in plan.ensembles:
            from training.data import load_data

            train = load_data(data_cfg).train  # the user fits on the same training split we distil on
            folder = root / "teachers" / f"{name}-{kind}"
            t0 = time.perf_counter()
            export_teachers(kind, train.x, train.y, folder, plan.seed)
            external = ExternalTeachersConfig(paths=(str(folder),))
            cfg = make_config(
                data_cfg, name=f"{name}-{kind}", seed=plan.seed, epochs=plan.epochs, external=external
            )
            out = root / "models" / f"{name}-{kind}" / "1"
            report = run_all(cfg, root / "runs" / f"{name}-{kind}", out)
            row = {"dataset": name, "ensemble": kind, "source": ds.source, "seconds": 0.0}
            row |= _evaluate(out, cfg, report, teacher_specs(cfg))
            row["seconds"] = round(time.perf_counter() - t0, 1)
            runs.append(row)
            acc = row["accuracy"]
            log(
                f"[external] {name}/{kind}: {row['seconds']:.0f}s, accuracy ens {acc['ensemble']:.3f} hydra "
                f"{acc['hydra']:.3f}, MI Spearman {row['spearman_vs_teachers']:.3f}, min retention "
                f"{row['min_retention']}"
            )
    return runs


def verdict(runs: list[dict[str, Any]]) -> dict[str, Any]:
    misses = []
    for r in runs:
        tag = f"{r['dataset']}/{r['ensemble']}"
        gap = r["accuracy"]["ensemble"] - r["accuracy"]["hydra"]
        if gap > ACCURACY_POINTS + 1e-9:
            misses.append(f"{tag} accuracy −{100 * gap:.1f} pts")
        if r["spearman_vs_teachers"] < SPEARMAN_MIN:
            misses.append(f"{tag} MI Spearman {r['spearman_vs_teachers']:.3f}")
        for family, f in r["families"].items():
            if f["hydra_retention"] < RETENTION_MIN:
                misses.append(f"{tag} {family} retention {f['hydra_retention']:.2f}")
    return {"misses": misses, "met": not misses}
