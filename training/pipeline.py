"""The pipeline as four restartable stages over a run directory.

    teachers  -> <run>/teachers.pt          (M members, early-stopped)
    distil    -> <run>/distil.pt            (Hydra student + the KD baseline)
    export    -> <out>/{model,ensemble,kd}.onnx   (parity-checked against PyTorch)
    evaluate  -> <out>/{manifest.json, report.json, report.md, *.png}   (on the exported ONNX)

`<run>/config.json` holds the `RunConfig`, so every stage can be re-run alone.

With the user's own ONNX teachers (`cfg.external`, `--teachers`) the teachers stage inspects the
files instead of training (`<run>/teachers.json`: paths, hashes, detected outputs), distillation
labels the transfer set with them through onnxruntime, and `ensemble.onnx` is their graphs stacked
into one with our output contract (training/onnx_teachers.py); everything downstream is the same.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, MutableMapping
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.manifest import (
    COMBINED_SCORE,
    ModelManifest,
    OODCalibration,
    OODComponent,
    OutputNames,
    Provenance,
    TensorSpec,
)
from training.config import (
    ArchConfig,
    DataConfig,
    DistilConfig,
    ExternalTeachersConfig,
    RunConfig,
)
from training.data import TaskData, load_data
from training.density import fit_feature_density, fit_input_density
from training.distill import distil
from training.distributed import from_main, gather_members, rank_members, save_on_main, world_size
from training.evaluate import evaluate
from training.export import (
    DENSITY_OUTPUT,
    INPUT_DENSITY_OUTPUT,
    INPUT_NAME,
    export_onnx,
    graph_summary,
    output_names,
)
from training.models import HydraNet, PackagedModel
from training.presets import PRESETS, STUDENT_BODIES
from training.report import write_report
from training.selfcheck import self_check
from training.teachers import build_network, load_members, target_scaling, train_member

Progress = Callable[[str, int, int, str], None]  # (stage, done, total, note)


def make_config(
    data: DataConfig,
    *,
    name: str | None = None,
    version: int = 1,
    members: int = 8,
    seed: int = 0,
    device: str = "auto",
    threads: int = 1,
    epochs: int | None = None,
    smoke: bool = False,
    student_width: float | None = None,
    external: ExternalTeachersConfig | None = None,
    arch_kind: str | None = None,
) -> RunConfig:
    preset = PRESETS[data.dataset]
    arch: ArchConfig = preset["arch"]
    if arch_kind is not None:
        if arch_kind not in STUDENT_BODIES:
            raise ValueError(f"--arch must be one of {sorted(STUDENT_BODIES)}, got {arch_kind!r}")
        arch = STUDENT_BODIES[arch_kind]
    teacher = replace(preset["teacher"], members=members)
    dc: DistilConfig = preset["distil"]
    if student_width is not None:
        dc = replace(dc, student_width=student_width)
    if epochs is not None:  # one override for every stage's epoch count
        teacher = replace(teacher, epochs=epochs)
        dc = replace(dc, phase1_epochs=epochs, phase2_epochs=epochs)
    if smoke:
        data = replace(data, max_train_rows=256)
        teacher = replace(teacher, members=min(members, 3), epochs=2)
        dc = replace(
            dc, phase1_epochs=2, phase2_epochs=2, mixup_copies=1, noise_copies=1, far_copies=1, shift_copies=0
        )
    if name is None:
        name = Path(data.path).stem if data.dataset == "file" and data.path else data.dataset
    return RunConfig(
        name=name,
        version=version,
        seed=seed,
        device=device,
        threads=threads,
        data=data,
        arch=arch,
        teacher=teacher,
        distil=dc,
        external=external or ExternalTeachersConfig(),
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return torch.device(name)


# cuBLAS is deterministic only with a fixed workspace configuration, read when its first handle is
# created; without it `use_deterministic_algorithms` cannot make CUDA matmuls reproducible.
CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def deterministic_cuda_env(device: torch.device, environ: MutableMapping[str, str]) -> bool:
    """Set CUBLAS_WORKSPACE_CONFIG for a CUDA run unless the user chose one; True when set here."""
    key, value = CUBLAS_WORKSPACE
    if device.type != "cuda" or key in environ:
        return False
    environ[key] = value
    return True


def setup(cfg: RunConfig) -> torch.device:
    """Determinism for a seed: fixed threads, seeded RNGs, deterministic kernels (cuBLAS included)."""
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    deterministic_cuda_env(device, os.environ)  # before the first CUDA matmul creates a handle
    torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def _noop(stage: str, done: int, total: int, note: str) -> None:
    return None


def load_task_data(cfg: RunConfig) -> TaskData:
    """The run's data; with external teachers, checked against them (features, classes), shaped
    like their input, and labelled by them when the file has no target column."""
    if not cfg.external.used:
        return load_data(cfg.data)
    from training.external import label_function, teacher_specs

    specs = teacher_specs(cfg)
    label_fn = label_function(specs, cfg.data.task or "") if cfg.data.target is None else None
    data = fit_to_teachers(load_data(cfg.data, label_fn), specs)
    if cfg.arch.kind == "cnn2d" and len(data.row_shape) != 2:
        raise ValueError(
            "--arch cnn2d needs teachers with a [batch, height, width] input; "
            f"theirs is [batch, {', '.join(map(str, data.row_shape))}]"
        )
    return data


def fit_to_teachers(data: TaskData, specs: list[Any]) -> TaskData:
    """Reshape the (flat) rows to the teachers' input shape; check feature and class counts."""
    shape = tuple(specs[0].row_shape)
    size = int(np.prod(shape))
    if int(np.prod(data.row_shape)) != size:
        raise ValueError(
            f"the teachers take {size} input values per row {list(shape)}, "
            f"--data has {int(np.prod(data.row_shape))} feature columns"
        )
    if data.task == "classification":
        classes = int(specs[0].classes)
        if not data.labelled:
            data = replace(data, labels=[str(i) for i in range(classes)])
        elif len(data.labels or []) != classes:
            raise ValueError(
                f"the teachers predict {classes} classes, the target column has {len(data.labels or [])}"
            )
    if shape == data.row_shape:
        return data

    def reshaped(split: Any) -> Any:
        return replace(split, x=split.x.reshape(len(split.x), *shape))

    return replace(
        data,
        row_shape=shape,
        kind="image" if len(shape) == 2 else data.kind,
        image_hw=(shape[0], shape[1]) if len(shape) == 2 else None,
        train=reshaped(data.train),
        val=reshaped(data.val),
        cal=reshaped(data.cal),
        test=reshaped(data.test),
        ood={k: v.reshape(len(v), *shape) for k, v in data.ood.items()},
        feature_names=None,
    )


def stage_teachers(
    cfg: RunConfig, data: TaskData, run_dir: Path, progress: Progress = _noop
) -> dict[str, Any]:
    if cfg.external.used:  # the user's ONNX teachers: inspect and record them, train nothing
        from training.external import save_specs, teacher_specs

        start = time.perf_counter()
        specs = teacher_specs(cfg)
        progress("teachers", len(specs), len(specs), f"{len(specs)} ONNX teachers checked")
        run_dir.mkdir(parents=True, exist_ok=True)
        return save_specs(specs, run_dir, time.perf_counter() - start)
    device = setup(cfg)
    start = time.perf_counter()
    results = []
    total = cfg.teacher.members * cfg.teacher.epochs
    for m in rank_members(cfg.teacher.members):  # under torchrun: this rank's share

        def tick(epoch: int, val: float, m: int = m) -> None:
            progress("teachers", m * cfg.teacher.epochs + epoch + 1, total, f"member {m} val {val:.3f}")

        results.append(train_member(cfg, data, m, cfg.seed, device, on_epoch=tick))
        progress("teachers", (m + 1) * cfg.teacher.epochs, total, f"member {m} done")
    results = gather_members(results)  # every rank gets every member
    seconds = time.perf_counter() - start
    summary = [
        {
            "member": r.index,
            "seed": r.seed,
            "best_epoch": r.best_epoch,
            "epochs_run": r.epochs_run,
            "best_val_loss": r.best_val_loss,
        }
        for r in results
    ]
    save_on_main(
        {
            "states": [r.state_dict for r in results],
            "summary": summary,
            "seconds": seconds,
            "world_size": world_size(),  # >1: members spread over torchrun ranks
        },
        run_dir / "teachers.pt",
    )
    return {"seconds": seconds, "members": summary}


def _checkpoint(run_dir: Path, name: str) -> dict[str, Any]:
    """`teachers.pt` or `distil.pt` of a run: tensors and plain values only (weights_only)."""
    ckpt: dict[str, Any] = torch.load(run_dir / name, weights_only=True)
    return ckpt


def _load_teachers(cfg: RunConfig, data: TaskData, run_dir: Path) -> list[HydraNet]:
    return load_members(cfg, data, _checkpoint(run_dir, "teachers.pt")["states"])


def _teachers_for_distillation(cfg: RunConfig, data: TaskData, run_dir: Path) -> Any:
    if cfg.external.used:
        from training.external import OnnxLabeller, check_unchanged, teacher_specs
        from training.onnx_teachers import OnnxTeachers

        specs = teacher_specs(cfg)
        check_unchanged(specs, run_dir)
        return OnnxLabeller(OnnxTeachers(specs), data.task, *target_scaling(data))
    # rank 0 reads the checkpoint it wrote and hands the states to the others (no shared disk needed)
    states = from_main(lambda: _checkpoint(run_dir, "teachers.pt")["states"])
    return load_members(cfg, data, states)


def stage_distil(cfg: RunConfig, data: TaskData, run_dir: Path, progress: Progress = _noop) -> dict[str, Any]:
    device = setup(cfg)
    members = _teachers_for_distillation(cfg, data, run_dir)
    start = time.perf_counter()
    dc = cfg.distil
    total = dc.phase1_epochs + dc.phase2_epochs

    def tick(phase: str, epoch: int, loss: float) -> None:
        done = epoch + 1 + (dc.phase1_epochs if phase.startswith("phase 2") else 0)
        progress("distil", done, total, f"{phase} loss {loss:.4f}")

    result = distil(cfg, data, members, device, tick)
    seconds = time.perf_counter() - start
    save_on_main(
        {
            "hydra": result.hydra.state_dict(),
            "kd": result.kd.state_dict(),
            "heads": result.hydra.heads,
            "history": result.history,
            "transfer_size": result.transfer_size,
            "seconds": seconds,
            "world_size": world_size(),  # >1: DDP, each rank on a shard of the transfer set
        },
        run_dir / "distil.pt",
    )
    return {
        "seconds": seconds,
        "transfer_size": result.transfer_size,
        "final_loss": {k: v[-1] if v else None for k, v in result.history.items()},
    }


def _packaged(cfg: RunConfig, data: TaskData, run_dir: Path) -> dict[str, PackagedModel]:
    """The graphs to export from torch (all three; external teachers: not the ensemble)."""
    members = [] if cfg.external.used else _load_teachers(cfg, data, run_dir)
    ckpt = _checkpoint(run_dir, "distil.pt")
    hydra = build_network(cfg, data, heads=int(ckpt["heads"]), student=True)
    hydra.load_state_dict(ckpt["hydra"])
    kd = build_network(cfg, data, heads=1, student=True)
    kd.load_state_dict(ckpt["kd"])
    y_mean, y_std = target_scaling(data)
    # the feature density on Hydra's shared body, fitted on the training rows (deterministic)
    labels = data.train.y if data.task == "classification" else None
    density = fit_feature_density(hydra.eval(), data.train.x, labels)
    typicality = fit_input_density(data.train.x)
    return {
        "model.onnx": PackagedModel(
            [hydra], data.task, y_mean, y_std, density=density, input_density=typicality
        ),
        "kd.onnx": PackagedModel([kd.eval()], data.task, y_mean, y_std),
    } | ({"ensemble.onnx": PackagedModel(members, data.task, y_mean, y_std)} if members else {})


def stage_export(
    cfg: RunConfig, data: TaskData, run_dir: Path, out: Path, progress: Progress = _noop
) -> dict[str, Any]:
    setup(cfg)
    out.mkdir(parents=True, exist_ok=True)
    check_rows = np.concatenate([data.test.x[:64], *[x[:16] for x in data.ood.values()]])
    info = {}
    models = _packaged(cfg, data, run_dir)
    total = len(models) + (1 if cfg.external.used else 0)
    for i, (filename, model) in enumerate(models.items()):
        parity = export_onnx(model, data.row_shape, out / filename, check_rows)
        info[filename] = {"max_abs_diff": parity} | graph_summary(out / filename)
        progress("export", i + 1, total, filename)
    if cfg.external.used:  # the user's graphs stacked into one, checked against each file run alone
        from training.external import check_unchanged, teacher_specs
        from training.onnx_teachers import stack_teachers

        specs = teacher_specs(cfg)
        check_unchanged(specs, run_dir)
        stack_teachers(specs, out / "ensemble.onnx", input_name=INPUT_NAME)
        info["ensemble.onnx"] = {
            "max_abs_diff": {},
            "stacked_from": [s.path.name for s in specs],
        } | graph_summary(out / "ensemble.onnx")
        progress("export", total, total, "ensemble.onnx (stacked)")
    (run_dir / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _packages() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("torch", "numpy", "onnx", "onnxruntime", "scikit-learn", "mnist1d", "hydra-serve"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


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


def stage_evaluate(
    cfg: RunConfig, data: TaskData, run_dir: Path, out: Path, progress: Progress = _noop
) -> dict[str, Any]:
    setup(cfg)
    ev = evaluate(out, data, cfg.ood_score, cfg.default_alpha)
    scores = {m: v["ood_score"] for m, v in ev.report["methods"].items()}
    ev.report["self_check"] = self_check(out, data, scores, seed=cfg.seed, components=ev.components)
    progress("evaluate", 1, 3, "metrics and self-check")
    if cfg.external.used:
        teachers_info = json.loads((run_dir / "teachers.json").read_text())
    else:
        teachers_info = _checkpoint(run_dir, "teachers.pt")
    distil_ckpt = _checkpoint(run_dir, "distil.pt")
    seconds = {"teachers": float(teachers_info["seconds"]), "distil": float(distil_ckpt["seconds"])}
    ev.report["labelled"] = data.labelled
    ev.report["runtime_seconds"] = seconds
    ev.report["transfer_size"] = int(distil_ckpt["transfer_size"])
    ev.report["config"] = cfg.to_json()
    write_report(ev, data, out)
    progress("evaluate", 2, 3, "report")

    names = output_names(data.task)
    if ev.components:  # the combined statistic: MI (or epistemic variance) with the feature density
        ood = OODCalibration(
            score=COMBINED_SCORE,
            components=[
                OODComponent.from_normaliser(c, fitted_on=f"validation split ({len(data.val)} rows)")
                for c in ev.components
            ],
            combination=ev.combination,
            calibration_scores=[float(s) for s in ev.calibration_scores],
            default_alpha=cfg.default_alpha,
        )
    else:
        ood = OODCalibration(
            score=ev.report["methods"]["hydra"]["ood_score"],
            calibration_scores=[float(s) for s in ev.calibration_scores],
            default_alpha=cfg.default_alpha,
        )
    manifest = ModelManifest(
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
            density=DENSITY_OUTPUT if ev.components else None,
            input_density=INPUT_DENSITY_OUTPUT if ev.components else None,
        ),
        temperature=cfg.distil.temperature,
        ood=ood,
        evaluation=evaluation_summary(ev.report),
        provenance=Provenance(
            dataset=data.name,
            data_sha256=data.sha256,
            seed=cfg.seed,
            git_commit=_git_commit(),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            training_seconds=round(sum(seconds.values()), 2),
            packages=_packages(),
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
    # validate the round trip exactly as the server will read it
    manifest.dump(out / "manifest.json")
    ModelManifest.load(out)
    progress("evaluate", 3, 3, "manifest")
    return ev.report


def run_all(cfg: RunConfig, run_dir: Path, out: Path, progress: Progress = _noop) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    from_main(lambda: cfg.save(run_dir / "config.json"))  # one writer
    data = load_task_data(cfg)
    stage_teachers(cfg, data, run_dir, progress)
    stage_distil(cfg, data, run_dir, progress)

    def package() -> dict[str, Any]:
        stage_export(cfg, data, run_dir, out, progress)
        return stage_evaluate(cfg, data, run_dir, out, progress)

    return from_main(package)  # under torchrun rank 0 exports and evaluates; the others wait for it
