"""The pipeline as four restartable stages over a run directory.

    teachers  -> <run>/teachers.pt          (M members, early-stopped)
    distil    -> <run>/distil.pt            (Hydra student + the KD baseline)
    export    -> <out>/{model,ensemble,kd}.onnx   (parity-checked against PyTorch)
    evaluate  -> <out>/{manifest.json, report.json, report.md, *.png}   (on the exported ONNX)

`<run>/config.json` holds the `RunConfig`, so every stage can be re-run alone.

With the user's own ONNX teachers (`cfg.external`, `--teachers`) the teachers stage inspects the
files instead of training (`<run>/teachers.json`: paths, hashes, detected outputs), distillation
labels the transfer set with them through onnxruntime, and `ensemble.onnx` is their graphs stacked
into one with our output contract (training/onnx_teachers/); everything downstream is the same.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.manifest import ModelManifest
from training.config import RunConfig
from training.data import TaskData, load_data
from training.density import fit_feature_density, fit_input_density, fit_unseen_values
from training.determinism import setup
from training.distill import distil
from training.distributed import from_main, gather_members, rank_members, save_on_main, world_size
from training.evaluate import evaluate
from training.export import INPUT_NAME, export_onnx, graph_summary
from training.models import HydraNet, PackagedModel
from training.report import write_report
from training.run_manifest import run_manifest
from training.selfcheck import self_check
from training.teachers import build_network, load_members, target_scaling, train_member
from training.transfer import families_in_transfer

Progress = Callable[[str, int, int, str], None]  # (stage, done, total, note)


def _noop(stage: str, done: int, total: int, note: str) -> None:
    return None


def load_task_data(cfg: RunConfig) -> TaskData:
    """The run's data; with external teachers, checked against them (features, classes), shaped
    like their input, and labelled by them when the file has no target column."""
    if not cfg.external.used:
        return load_data(cfg.data)
    from training.external import fit_to_teachers, label_function, teacher_specs

    specs = teacher_specs(cfg)
    label_fn = label_function(specs, cfg.data.task or "") if cfg.data.target is None else None
    data = fit_to_teachers(load_data(cfg.data, label_fn), specs)
    if cfg.arch.kind == "cnn2d" and len(data.row_shape) != 2:
        raise ValueError(
            "--arch cnn2d needs teachers with a [batch, height, width] input; "
            f"theirs is [batch, {', '.join(map(str, data.row_shape))}]"
        )
    return data


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
    unseen = fit_unseen_values(data.train.x, data.val.x)  # None on a table without discrete columns
    return {
        "model.onnx": PackagedModel(
            [hydra], data.task, y_mean, y_std, density=density, input_density=typicality, unseen_values=unseen
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


def stage_evaluate(
    cfg: RunConfig, data: TaskData, run_dir: Path, out: Path, progress: Progress = _noop
) -> dict[str, Any]:
    setup(cfg)
    ev = evaluate(out, data, cfg.ood_score, cfg.default_alpha)
    scores = {m: v["ood_score"] for m, v in ev.report["methods"].items()}
    ev.report["self_check"] = self_check(
        out,
        data,
        scores,
        seed=cfg.seed,
        rows=cfg.probe_rows,
        combined=ev.combined,
        in_transfer=families_in_transfer(cfg.distil),
    )
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

    manifest = run_manifest(cfg, data, ev, distil_ckpt, teachers_info, seconds)
    # validate the round trip exactly as the server will read it
    manifest.dump(out / "manifest.json")
    ModelManifest.load(out)
    progress("evaluate", 3, 3, "manifest")
    return ev.report


def run_all(
    cfg: RunConfig, run_dir: Path, out: Path, progress: Progress = _noop, data: TaskData | None = None
) -> dict[str, Any]:
    """Every stage; `data`: the run's data when the caller has loaded it already (else loaded here)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    from_main(lambda: cfg.save(run_dir / "config.json"))  # one writer
    data = load_task_data(cfg) if data is None else data
    stage_teachers(cfg, data, run_dir, progress)
    stage_distil(cfg, data, run_dir, progress)

    def package() -> dict[str, Any]:
        stage_export(cfg, data, run_dir, out, progress)
        return stage_evaluate(cfg, data, run_dir, out, progress)

    return from_main(package)  # under torchrun rank 0 exports and evaluates; the others wait for it
