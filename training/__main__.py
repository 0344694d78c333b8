"""CLI: `python -m training run --dataset digits --out models/digits/1`, or stage by stage.

python -m training run      --dataset digits --out models/digits/1 [--members 8 --seed 0 ...]
python -m training run      --data rows.csv --target y --task regression --out models/rows/1 [--ood x.csv]
python -m training run      --dataset digits --out models/digits/1 --config-only   (writes config.json)
python -m training teachers --run-dir runs/digits-s0
python -m training distil   --run-dir runs/digits-s0
python -m training export   --run-dir runs/digits-s0 --out models/digits/1
python -m training evaluate --run-dir runs/digits-s0 --out models/digits/1
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from training.config import DataConfig, ExternalTeachersConfig, RunConfig, Task
from training.data import BUILTIN_DATASETS
from training.distributed import from_main, is_main, process_group
from training.pipeline import (
    load_task_data,
    run_all,
    stage_distil,
    stage_evaluate,
    stage_export,
    stage_teachers,
)
from training.presets import make_config
from training.report import results_table

StrictOption = Annotated[
    bool,
    typer.Option(help="Exit non-zero (3) when the fidelity self-check fails; the package is still written"),
]
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)


@contextmanager
def bars() -> Iterator[Any]:
    """One rich progress bar per stage; yields the pipeline's progress callback."""
    console.quiet = not is_main()  # under torchrun only rank 0 draws bars and prints summaries
    with Progress(
        TextColumn("[bold]{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
    ) as progress:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int, note: str) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, note="")
            progress.update(tasks[stage], completed=done, total=total, note=note)

        yield update


def _summary(report: dict[str, Any]) -> None:
    for m, v in report["methods"].items():
        q = ", ".join(f"{k} {x:.4f}" for k, x in v["test"].items())
        ood = ", ".join(f"{k} {o['auroc']:.3f}" for k, o in v["ood"].items())
        console.print(f"{m:<9} {q} | AUROC {ood}")
    f, c = report["fidelity"], report["conformal"]
    ret = ", ".join(f"{k} {o['retention']:.3f}" for k, o in report["methods"]["hydra"]["ood"].items())
    console.print(
        f"fidelity Spearman {f['spearman']:.3f}  retention {ret}  false alarms {c['false_alarm_rate']}"
    )
    sc = report["self_check"]
    families = ", ".join(
        f"{k} {v['ensemble']:.2f}/{v['hydra']:.2f}" for k, v in sc["families"].items() if v["well_posed"]
    )
    console.print(
        f"self-check: {sc['score']} Spearman {sc['spearman']:.3f}; AUROC ensemble/Hydra where the "
        f"ensemble detects: {families or 'none'}"
    )
    ood = {k: f["hydra_ood"] for k, f in sc["families"].items() if "hydra_ood" in f}
    if ood:
        line = ", ".join(f"{k} {v[sc['score']]:.2f}→{v['combined']:.2f}" for k, v in ood.items())
        console.print(f"OOD flag, Hydra AUROC by {sc['score']} → combined with the feature densities: {line}")
    if not sc["passed"]:
        console.print(
            "[bold yellow]WARNING[/]: Hydra does not follow its teachers on the self-check probes: "
            + "; ".join(sc["problems"])
            + ". Its uncertainty may not be the ensemble's on your data "
            "(see report.md, 'Fidelity self-check'). Levers: a wider shared body (--student-hidden, "
            "e.g. 2048 on tables; --student-width 2 for conv students), more members or epochs; "
            "docs/TRAINING.md."
        )


def _widths(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--student-hidden: comma-separated integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise typer.BadParameter(f"--student-hidden: widths must be >= 1, got {text!r}")
    return widths


def _verdict(report: dict[str, Any], strict: bool) -> None:
    """`--strict`: a failed self-check is a failed run (non-zero exit), after the package is written."""
    if strict and not report["self_check"]["passed"]:
        console.print("[bold red]--strict[/]: the fidelity self-check failed; exiting with status 3")
        raise typer.Exit(code=3)


@app.command()
def run(
    out: Annotated[Path, typer.Option(help="Model package directory, e.g. models/digits/1")],
    dataset: Annotated[str, typer.Option(help=f"Built-in dataset: {', '.join(BUILTIN_DATASETS)}")] = "digits",
    data: Annotated[Path | None, typer.Option(help="Your own CSV / Parquet / NPZ file")] = None,
    target: Annotated[str | None, typer.Option(help="Target column (with --data)")] = None,
    task: Annotated[str | None, typer.Option(help="classification | regression (with --data)")] = None,
    ood: Annotated[Path | None, typer.Option(help="Optional OOD file, same columns (with --data)")] = None,
    members: Annotated[int, typer.Option(min=1)] = 8,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    epochs: Annotated[int | None, typer.Option(help="Override every stage's epoch count")] = None,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads (1 is fastest on a shared CPU)")] = 1,
    name: Annotated[str | None, typer.Option(help="Model name in the manifest")] = None,
    version: Annotated[
        int | None, typer.Option(help="Model version (default: the --out folder name)")
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Checkpoints (default runs/<name>-s<seed>)")] = None,
    smoke: Annotated[
        bool,
        typer.Option(help="Seconds-long run (few members and epochs, 500 self-check rows per probe family)"),
    ] = False,
    config_only: Annotated[
        bool, typer.Option(help="Only write <run-dir>/config.json; then run the stages one by one")
    ] = False,
    strict: StrictOption = False,
    student_width: Annotated[
        float | None,
        typer.Option(min=0.25, help="Student dense widths = the teachers' x this (default: the preset's)"),
    ] = None,
    student_hidden: Annotated[
        str | None,
        typer.Option(
            help="The student's dense hidden widths, comma-separated, e.g. 2048 or 512,256 "
            "(default: the preset's; tables: one layer of 1024)"
        ),
    ] = None,
    teachers: Annotated[
        list[Path] | None,
        typer.Option(help="Your own ONNX teachers: .onnx files or folders (repeat the option); with --data"),
    ] = None,
    teacher_output: Annotated[
        str | None, typer.Option(help="logits | probs (classification teachers; default: detected)")
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="Student body with --teachers: mlp (default) | cnn1d | cnn2d")
    ] = None,
) -> None:
    """Teachers -> Hydra distillation -> ONNX export -> evaluation on the exported graphs.

    With --teachers, the ONNX files are the ensemble (from any framework); --data gives the rows to
    distil on, --target is optional (without it the report measures fidelity to the teachers)."""
    if teachers and data is None:
        raise typer.BadParameter("--teachers needs --data (the rows to distil on)", param_hint="--data")
    if data is not None:
        if task not in ("classification", "regression"):
            raise typer.BadParameter("--task must be classification or regression", param_hint="--task")
        if target is None and not teachers:
            raise typer.BadParameter(
                "--data needs --target (optional only with --teachers)", param_hint="--target"
            )
        task_value: Task = "classification" if task == "classification" else "regression"
        data_cfg = DataConfig(
            dataset="file", path=str(data), target=target, task=task_value, ood_path=str(ood) if ood else None
        )
    else:
        data_cfg = DataConfig(dataset=dataset)
    if version is None:
        version = int(out.name) if out.name.isdigit() else 1
    cfg = make_config(
        data_cfg,
        name=name,
        version=version,
        members=members,
        seed=seed,
        device=device,
        threads=threads,
        epochs=epochs,
        smoke=smoke,
        student_width=student_width,
        student_hidden=_widths(student_hidden),
        external=ExternalTeachersConfig(paths=tuple(str(p) for p in teachers or ()), output=teacher_output),
        arch_kind=arch,
    )
    run_dir = run_dir or Path("runs") / f"{cfg.name}-s{seed}{'-smoke' if smoke else ''}"
    if config_only:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
        console.print(
            f"wrote {run_dir / 'config.json'}; next: python -m training teachers --run-dir {run_dir}"
        )
        return
    start = time.perf_counter()
    try:  # the data and the user's teachers are checked before anything runs: one line per problem
        task_data = load_task_data(cfg)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[bold red]error[/]: {exc}", soft_wrap=True)  # one line, whatever the width
        raise typer.Exit(2) from exc
    with process_group(cfg.device), bars() as progress:
        report = run_all(cfg, run_dir, out, progress, task_data)
    _summary(report)
    console.print(f"wrote {out} in {time.perf_counter() - start:.1f}s (checkpoints in {run_dir})")
    _verdict(report, strict)


def _load(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    if not path.exists():
        raise typer.BadParameter(
            f"{path} not found: run `python -m training run` (or `run ... --config-only`) first",
            param_hint="--run-dir",
        )
    return RunConfig.load(path)


def _stage(run_dir: Path, stage: Callable[..., Any], *out: Path, rank0_only: bool = False) -> Any:
    """`stage` of the run in `run_dir` (`out`: the package folder of export and evaluate), on the
    run's config and data, in its process group, with progress bars. `rank0_only`: rank 0 runs it
    and hands its result to the other ranks (`from_main`)."""
    cfg = _load(run_dir)
    with process_group(cfg.device), bars() as progress:

        def run() -> Any:
            return stage(cfg, load_task_data(cfg), run_dir, *out, progress)

        return from_main(run) if rank0_only else run()


@app.command()
def teachers(run_dir: Annotated[Path, typer.Option()]) -> None:
    """Stage 1: train the ensemble members."""
    info = _stage(run_dir, stage_teachers)
    console.print(f"teachers: {info['seconds']:.1f}s")


@app.command()
def distil(run_dir: Annotated[Path, typer.Option()]) -> None:
    """Stage 2: Hydra distillation (and the KD baseline)."""
    info = _stage(run_dir, stage_distil)
    console.print(f"distil: {info['seconds']:.1f}s, transfer set {info['transfer_size']} rows")


@app.command()
def export(run_dir: Annotated[Path, typer.Option()], out: Annotated[Path, typer.Option()]) -> None:
    """Stage 3: export model.onnx, ensemble.onnx, kd.onnx (parity-checked)."""
    _stage(run_dir, stage_export, out, rank0_only=True)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Option()],
    out: Annotated[Path, typer.Option()],
    strict: StrictOption = False,
) -> None:
    """Stage 4: evaluate the exported graphs and run the fidelity self-check; write the report and
    manifest.json."""
    report = _stage(run_dir, stage_evaluate, out, rank0_only=True)
    _summary(report)
    _verdict(report, strict)


@app.command()
def table(reports: Annotated[list[Path], typer.Argument(help="report.json files")]) -> None:
    """Print the results table of docs/TRAINING.md (ensemble / KD / Hydra) for evaluated packages."""
    typer.echo(results_table([json.loads(p.read_text()) for p in reports]), nl=False)


if __name__ == "__main__":
    app()
