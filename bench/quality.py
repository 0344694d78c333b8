"""Part 1 — quality: ensemble vs KD vs Hydra, through the training pipeline's own API.

Main comparison: for each dataset and seed, `training.pipeline.run_all` trains the teachers, distils
Hydra (phase 2) and KD (= its phase-1 student), exports the three graphs and evaluates them on ONNX
Runtime; we collect its report (accuracy/RMSE, NLL, ECE, Brier, coverage, OOD AUROC/AUPR/FPR95 per
OOD set, retention, MI fidelity, conformal false alarms) and aggregate mean ± std over seeds.

Ablations (one dataset): the teachers are trained once per seed (16 members; the M = 4 and M = 8
variants use the first M of them, which are exactly the members an M-member run trains, because
member seeds depend only on (seed, index)); each variant re-runs distil -> export -> evaluate with
one `DistilConfig`/`ArchConfig` change. Two-layer heads change the split between body and head, so
that variant trains its own 8 teachers (same seeds).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.flops import count_flops
from bench.workloads import BUILD

QUALITY = BUILD / "quality"


@dataclass(frozen=True)
class QualityPlan:
    datasets: tuple[str, ...] = ("mnist1d", "digits", "toy", "diabetes")
    seeds: tuple[int, ...] = (0, 1, 2)
    members: int = 8
    # per-dataset epoch override (every stage) — None keeps the preset's epochs
    epochs: dict[str, int | None] = field(default_factory=dict)
    ablation_dataset: str = "digits"
    ablation_seeds: tuple[int, ...] = (0, 1)
    ablation_epochs: int | None = None
    ablations: tuple[str, ...] = (
        "M=4",
        "M=16",
        "2-layer heads",
        "phase 1 off",
        "body frozen",
        "body full lr",
        "T=1",
        "T=4",
        "diversity 0.1",
        "diversity 1.0",
        "transfer: train only",
        "transfer: near only",
        "radial temperature off",
    )
    shift_dataset: str = "mnist1d"
    shift_levels: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    shift_rows: int = 1000


def run_folders(root: Path, name: str, tag: str) -> tuple[Path, Path]:
    """(checkpoints, package) of the run of `name` tagged `tag` (e.g. "s0") under `root`. Quality's
    and the suites' runs are kept here, and the OOD bench (bench/ood.py) finds their checkpoints here."""
    return root / "runs" / f"{name}-{tag}", root / "models" / name / tag


def builtin_config(dataset: str, seed: int, members: int, epochs: int | None) -> Any:
    """The preset's run of a built-in dataset (`epochs`: None keeps the preset's)."""
    from training.config import DataConfig
    from training.presets import make_config

    return make_config(DataConfig(dataset=dataset), name=dataset, members=members, seed=seed, epochs=epochs)


def _variant(name: str, cfg: Any, members: int) -> tuple[int, Any]:
    """(members, config) of one ablation variant; the default config is the preset's."""
    from training.config import DistilConfig
    from training.transfer import near_only, train_only

    d: DistilConfig = cfg.distil
    if name.startswith("M="):
        return int(name[2:]), cfg
    if name == "2-layer heads":
        return members, replace(cfg, arch=replace(cfg.arch, head_layers=2))
    if name == "phase 1 off":
        # no phase 1: its epochs go to phase 2, and the untrained body learns at the full rate
        return members, replace(
            cfg,
            distil=replace(
                d, phase1_epochs=0, phase2_epochs=d.phase1_epochs + d.phase2_epochs, phase2_body_lr_scale=1.0
            ),
        )
    if name == "body frozen":
        return members, replace(cfg, distil=replace(d, phase2_body_lr_scale=0.0))
    if name == "body full lr":
        return members, replace(cfg, distil=replace(d, phase2_body_lr_scale=1.0))
    if name.startswith("T="):
        return members, replace(cfg, distil=replace(d, temperature=float(name[2:])))
    if name.startswith("diversity "):
        return members, replace(cfg, distil=replace(d, diversity_weight=float(name.split()[1])))
    if name == "transfer: train only":
        return members, replace(cfg, distil=train_only(d))
    if name == "transfer: near only":
        return members, replace(cfg, distil=near_only(d))
    if name == "radial temperature off":
        return members, replace(cfg, distil=replace(d, radial_temperature=False))
    raise ValueError(f"unknown ablation {name!r}")


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers we tabulate from one pipeline report."""
    methods = report["methods"]
    out: dict[str, Any] = {"methods": {}}
    for m, v in methods.items():
        ood = v["ood"]
        out["methods"][m] = {
            "test": v["test"],
            "ood_score": v["ood_score"],
            "ood": {k: {kk: vv for kk, vv in o.items()} for k, o in ood.items()},
            "ood_auroc_mean": float(np.mean([o["auroc"] for o in ood.values()])) if ood else None,
        }
    hydra_ood = methods["hydra"]["ood"]
    out["retention_mean"] = (
        float(np.mean([o["retention"] for o in hydra_ood.values()])) if hydra_ood else None
    )
    out["fidelity"] = report["fidelity"]
    out["conformal"] = report["conformal"]
    out["runtime_seconds"] = report.get("runtime_seconds", {})
    return out


def run_main(plan: QualityPlan, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    from training.pipeline import run_all

    runs = []
    for dataset in plan.datasets:
        for seed in plan.seeds:
            cfg = builtin_config(dataset, seed, plan.members, plan.epochs.get(dataset))
            run_dir, out = run_folders(QUALITY, dataset, f"s{seed}")
            t0 = time.perf_counter()
            report = run_all(cfg, run_dir, out)
            seconds = time.perf_counter() - t0
            runs.append(
                {
                    "dataset": dataset,
                    "seed": seed,
                    "seconds": round(seconds, 1),
                    "config": cfg.to_json(),
                    "package": str(out),
                    **_summary(report),
                }
            )
            log(f"[quality] {dataset} seed {seed}: {seconds:.0f}s")
    return runs


def _subset_teachers(source: Path, target: Path, members: int) -> None:
    import torch

    ckpt = torch.load(source, weights_only=True)
    if len(ckpt["states"]) < members:
        raise ValueError(f"{source} has {len(ckpt['states'])} teachers, {members} needed")
    ckpt = {
        "states": ckpt["states"][:members],
        "summary": ckpt["summary"][:members],
        "seconds": ckpt["seconds"],
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, target)


def run_ablations(plan: QualityPlan, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    from training.config import DataConfig
    from training.data import load_data
    from training.pipeline import stage_distil, stage_evaluate, stage_export, stage_teachers
    from training.presets import make_config

    data = load_data(DataConfig(dataset=plan.ablation_dataset))
    results = []
    max_members = max([plan.members, *(int(a[2:]) for a in plan.ablations if a.startswith("M="))])
    for seed in plan.ablation_seeds:
        base = make_config(
            DataConfig(dataset=plan.ablation_dataset),
            name=plan.ablation_dataset,
            members=plan.members,
            seed=seed,
            epochs=plan.ablation_epochs,
        )
        root = QUALITY / "ablations" / f"{plan.ablation_dataset}-s{seed}"
        pool = root / "teachers" / "teachers.pt"
        pool_cfg = replace(base, teacher=replace(base.teacher, members=max_members))
        # always trained afresh: a pool left by another preset would silently change every variant
        pool.parent.mkdir(parents=True, exist_ok=True)
        pool_cfg.save(pool.parent / "config.json")
        stage_teachers(pool_cfg, data, pool.parent)
        for name in ("default", *plan.ablations):
            members, cfg = (plan.members, base) if name == "default" else _variant(name, base, plan.members)
            cfg = replace(cfg, teacher=replace(cfg.teacher, members=members))
            slug = name.replace(" ", "_").replace(":", "").replace("=", "").replace(".", "p")
            run_dir, out = root / "runs" / slug, root / "models" / slug
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.json")
            t0 = time.perf_counter()
            if cfg.arch != base.arch:
                stage_teachers(cfg, data, run_dir)
            else:
                _subset_teachers(pool, run_dir / "teachers.pt", members)
            stage_distil(cfg, data, run_dir)
            stage_export(cfg, data, run_dir, out)
            report = stage_evaluate(cfg, data, run_dir, out)
            results.append(
                {
                    "variant": name,
                    "seed": seed,
                    "members": members,
                    "hydra_flops_per_row": count_flops(out / "model.onnx").total,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "distil": dataclasses.asdict(cfg.distil),
                    "arch": dataclasses.asdict(cfg.arch),
                    **_summary(report),
                }
            )
            hydra_test = report["methods"]["hydra"]["test"]
            log(f"[ablation] {name} seed {seed}: Hydra {hydra_test}")
    return results


def shifted_mnist1d(level: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D from its own generator with growing shift: at level k the correlated noise is
    (1 + 0.3k)x and the shear (1 + 0.1k)x the defaults (the `shifted` OOD set of training/data.py is
    4x noise and 2x shear, beyond level 5); another seed per level. Level 0 is the unshifted
    generator, i.e. fresh in-distribution data."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = rows
    args.train_split = 0.0  # everything lands in x_test
    args.seed = 9000 + level
    args.corr_noise_scale *= 1.0 + 0.3 * level
    args.shear_scale *= 1.0 + 0.1 * level
    raw = make_dataset(args)
    x = np.concatenate([raw["x"], raw["x_test"]])[:rows].astype(np.float32)
    y = np.concatenate([raw["y"], raw["y_test"]])[:rows].astype(np.int64)
    return x, y


def run_shift(package: Path, plan: QualityPlan) -> dict[str, Any]:
    from service.manifest import ModelManifest
    from service.uncertainty import ClassificationUncertainty, ConformalOODCalibrator
    from training.evaluate import GRAPH_FILES, classification_metrics, run_graph, summarise

    manifest = ModelManifest.load(package / "manifest.json")
    calibrator = ConformalOODCalibrator(manifest.ood.calibration_scores)
    levels = []
    for level in plan.shift_levels:
        x, y = shifted_mnist1d(level, plan.shift_rows)
        entry: dict[str, Any] = {"level": level}
        for method, graph in GRAPH_FILES.items():
            u = summarise("classification", run_graph(package / graph, x, "classification"))
            assert isinstance(u, ClassificationUncertainty)
            entry[method] = {
                **classification_metrics(u, y),
                "mutual_information": float(np.mean(u.mutual_information)),
                "total_entropy": float(np.mean(u.total_entropy)),
            }
            if method == "hydra":
                score = u.score(manifest.ood.score)
                entry[method]["flag_rate"] = float(calibrator.flags(score, manifest.ood.default_alpha).mean())
        levels.append(entry)
    return {"package": str(package), "alpha": manifest.ood.default_alpha, "levels": levels}


def well_posed_retention(run: dict[str, Any]) -> float | None:
    """Mean Hydra retention over the OOD sets the ensemble itself detects (AUROC >= 0.7).

    Retention divides by (AUROC_ensemble - 0.5): where the ensemble is near chance (digits
    `rotated`, ~0.6) the ratio swings by whole units between seeds and says nothing about Hydra."""
    ens = run["methods"]["ensemble"]["ood"]
    hydra = run["methods"]["hydra"]["ood"]
    from training.selfcheck import WELL_POSED_AUROC  # one threshold for the bench and the self-check

    kept = [hydra[k]["retention"] for k in hydra if ens[k]["auroc"] >= WELL_POSED_AUROC]
    return float(np.mean(kept)) if kept else None


def derive(result: dict[str, Any]) -> dict[str, Any]:
    """Derived per-run numbers, recomputed from the recorded runs (no re-run), then re-aggregated."""
    for runs_key, agg_key, by in (
        ("runs", "aggregate", "dataset"),
        ("ablations", "ablation_aggregate", "variant"),
    ):
        if runs_key not in result:
            continue
        for run in result[runs_key]:
            run["retention_well_posed"] = well_posed_retention(run)
        result[agg_key] = aggregate(result[runs_key], by)
    return result


def aggregate(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """mean and std over seeds of every numeric leaf, grouped by `key` (dataset or variant)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r[key], []).append(r)

    def leaves(d: Any, prefix: str = "") -> dict[str, float]:
        out: dict[str, float] = {}
        if isinstance(d, dict):
            for k, v in d.items():
                out |= leaves(v, f"{prefix}{k}.")
        elif isinstance(d, (int, float)) and not isinstance(d, bool):
            out[prefix[:-1]] = float(d)
        return out

    agg = {}
    for name, rs in groups.items():
        flat = [
            leaves(
                {
                    "methods": r["methods"],
                    "retention_mean": r["retention_mean"],
                    "retention_well_posed": r.get("retention_well_posed"),
                    "fidelity": r["fidelity"],
                    "conformal": r["conformal"],
                }
            )
            for r in rs
        ]
        keys = set.intersection(*(set(f) for f in flat))
        agg[name] = {
            k: {
                "mean": float(np.mean([f[k] for f in flat])),
                "std": float(np.std([f[k] for f in flat])),
                "n": len(flat),
            }
            for k in sorted(keys)
        }
    return agg


def save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float) + "\n")
