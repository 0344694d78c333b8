"""The manifest a run writes beside its graphs: names, shapes, calibration, evaluation, provenance."""

from __future__ import annotations

import datetime as dt
from typing import Any

from service.manifest import (
    COMBINED_SCORE,
    ModelManifest,
    OODCalibration,
    OODComponent,
    OutputNames,
    Provenance,
    TensorSpec,
)
from training.config import RunConfig
from training.data import TaskData
from training.evaluate import Evaluation
from training.export import (
    DENSITY_OUTPUT,
    INPUT_DENSITY_OUTPUT,
    INPUT_NAME,
    UNSEEN_VALUES_OUTPUT,
    output_names,
)
from training.provenance import git, versions


def evaluation_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The part of report.json that travels in the manifest."""
    methods = report["methods"]
    return {
        "test": {m: methods[m]["test"] for m in methods},
        "ood_auroc": {m: {k: round(v["auroc"], 4) for k, v in methods[m]["ood"].items()} for m in methods},
        "hydra_auroc_retention": {k: round(v["retention"], 4) for k, v in methods["hydra"]["ood"].items()},
        "fidelity": report["fidelity"],
        "false_alarm_rate": report["conformal"]["false_alarm_rate"],
        "ood_statistic": {k: report["conformal"][k] for k in ("score", "components", "n_calibration")},
        "hydra_ood_scores": report.get("hydra_ood_scores", {}),
        "self_check": {
            k: report["self_check"][k] for k in ("passed", "problems", "score", "spearman", "thresholds")
        }
        | {
            "families": {
                name: {
                    k: f[k]
                    for k in ("ensemble", "hydra", "kd", "hydra_retention", "well_posed", "hydra_ood")
                    if k in f
                }
                for name, f in report["self_check"]["families"].items()
            }
        },
    }


def run_manifest(
    cfg: RunConfig,
    data: TaskData,
    ev: Evaluation,
    distil_ckpt: dict[str, Any],
    teachers_info: dict[str, Any],
    seconds: dict[str, float],
) -> ModelManifest:
    """The manifest of an evaluated run (`distil.pt`'s head count, the teachers' provenance)."""
    names = output_names(data.task)
    combined = ev.combined
    if combined is not None:  # the combined statistic: MI (or epistemic variance) with the densities
        ood = OODCalibration(
            score=COMBINED_SCORE,
            components=[
                OODComponent.from_normaliser(c, fitted_on=f"validation split ({len(data.val)} rows)")
                for c in combined.components
            ],
            combination=combined.rule,  # type: ignore[arg-type]
            priority=combined.priority,  # type: ignore[arg-type]
            calibration_scores=[float(s) for s in ev.calibration_scores],
            default_alpha=cfg.default_alpha,
        )
    else:
        ood = OODCalibration(
            score=ev.report["methods"]["hydra"]["ood_score"],
            calibration_scores=[float(s) for s in ev.calibration_scores],
            default_alpha=cfg.default_alpha,
        )
    return ModelManifest(
        # schema 3 only where it adds the unseen-value count: other packages stay readable by schema-2 servers
        schema_version=3 if combined is not None and combined.priority else 2,
        name=cfg.name,
        version=cfg.version,
        task=data.task,
        description=(
            f"Hydra student ({distil_ckpt['heads']} heads) distilled from "
            + (
                f"{distil_ckpt['heads']} user ONNX teachers"
                if cfg.external.used
                else f"a {cfg.teacher.members}-member {cfg.arch.kind} ensemble"
            )
            + f" on {data.name}"
        ),
        input=TensorSpec(name=INPUT_NAME, shape=[-1, *data.row_shape], dtype="float32"),
        feature_names=data.feature_names,
        labels=data.labels,
        heads=int(distil_ckpt["heads"]),
        outputs=OutputNames(
            log_probs=names[0] if data.task == "classification" else None,
            mean=names[0] if data.task == "regression" else None,
            variance=names[1] if data.task == "regression" else None,
            density=DENSITY_OUTPUT if combined is not None else None,
            input_density=INPUT_DENSITY_OUTPUT if combined is not None else None,
            unseen_values=UNSEEN_VALUES_OUTPUT if combined is not None and combined.priority else None,
        ),
        temperature=cfg.distil.temperature,
        ood=ood,
        evaluation=evaluation_summary(ev.report),
        provenance=Provenance(
            dataset=data.name,
            data_sha256=data.sha256,
            seed=cfg.seed,
            git_commit=git("rev-parse", "HEAD"),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            training_seconds=round(sum(seconds.values()), 2),
            packages=versions(
                ("torch", "numpy", "onnx", "onnxruntime", "scikit-learn", "mnist1d", "hydra-serve")
            ),
            teacher_members=int(distil_ckpt["heads"]),
            architecture=cfg.arch.kind,
            **(
                {
                    "teachers": teachers_info["teachers"],
                    "labels": "target column" if data.labelled else "teachers",
                }
                if cfg.external.used
                else {}
            ),
        ),
    )
