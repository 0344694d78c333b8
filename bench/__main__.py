"""`python -m bench quality|suites|recipes|ood|external|cost|server|workers|grpc|drift|shadow|report|all`.

All write docs/BENCHMARKS.md; most take `--preset smoke|reduced|full`.

Each part writes bench/results/<part>.json (with machine, date, load and command) and regenerates
docs/BENCHMARKS.md and its figures. `--preset smoke` checks everything runs in minutes;
`reduced` produced the published numbers; `full` is the long version.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from bench import report
from bench.machine import describe
from bench.presets import PRESETS, Preset

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
DOCS = report.DOC.parent

PresetOption = Annotated[str, typer.Option(help="smoke | reduced | full")]
WorkloadOption = Annotated[str, typer.Option(help="comma-separated: digits,mnist1d_wide")]


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise typer.BadParameter(
            f"unknown preset {name!r}; one of {', '.join(PRESETS)}", param_hint="--preset"
        )
    return PRESETS[name]


def _command() -> str:
    return "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _save(part: str, result: dict[str, Any]) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    path = report.RESULTS / f"{part}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    typer.echo(f"wrote {path}")


def _workloads(names: str) -> list[Any]:
    from bench.workloads import digits, wide

    makers = {"digits": digits, "mnist1d_wide": wide}
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in makers]
    if unknown:
        raise typer.BadParameter(
            f"unknown workload(s) {unknown}; known: {list(makers)}", param_hint="--workloads"
        )
    return [makers[n]() for n in chosen]


@app.command()
def quality(preset: PresetOption = "reduced", skip_ablations: bool = False, skip_shift: bool = False) -> None:
    """Part 1: ensemble vs KD vs Hydra on the four built-in datasets, ablations, shift severity, figures."""
    from bench import plots
    from bench.quality import aggregate, derive, run_ablations, run_main, run_shift

    p = _preset(preset)
    plan = p.quality
    meta = describe(_command())
    t0 = time.perf_counter()
    runs = run_main(plan, log=typer.echo)
    result: dict[str, Any] = {
        "preset": p.name,
        "plan": dataclasses.asdict(plan),
        "machine": meta,
        "runs": runs,
        "aggregate": aggregate(runs, "dataset"),
    }
    _save("quality", result | {"partial": True})  # the main runs survive a failure further on
    if not skip_ablations:
        ab = run_ablations(plan, log=typer.echo)
        result["ablations"] = ab
        result["ablation_aggregate"] = aggregate(ab, "variant")
    seed0 = {r["dataset"]: Path(r["package"]) for r in runs if r["seed"] == plan.seeds[0]}
    if not skip_shift and plan.shift_dataset in seed0:
        result["shift"] = run_shift(seed0[plan.shift_dataset], plan)
    result["seconds"] = time.perf_counter() - t0
    _save("quality", derive(result))
    plots.quality_figures(seed0, DOCS)
    if "shift" in result:
        plots.shift_figure(result["shift"], DOCS / "quality_shift.png")
    if "ablation_aggregate" in result:
        plots.ablation_figure(result["ablation_aggregate"], DOCS / "quality_ablations.png")
    typer.echo(f"wrote {report.write()}")


@app.command()
def ood(
    preset: PresetOption = "reduced",
    no_oracle: Annotated[bool, typer.Option(help="skip the supervised separability oracle")] = False,
    suites: Annotated[str, typer.Option(help="comma-separated suites (default: the preset's)")] = "",
    builtins: Annotated[str, typer.Option(help="comma-separated built-ins, or none (default: all)")] = "",
    output: Annotated[str, typer.Option(help="results name: ood, or ood_current (a re-run subset)")] = "ood",
) -> None:
    """Part 1c: MI, feature density and the served combined OOD statistic, per family, on the built-ins
    and every suite table; the separability oracle; realised false alarms (bench/ood.py).

    Reuses the teacher/distillation checkpoints of `bench quality` and `bench suites` when their
    config matches (then only export and evaluation run); trains what is missing."""
    from bench.ood import run_ood, save
    from bench.suites import SUITES
    from bench.workloads import BUILD

    p = _preset(preset)
    plan = dataclasses.replace(p.ood, oracle=not no_oracle)
    if suites:
        chosen = tuple(x.strip() for x in suites.split(",") if x.strip())
        unknown = [x for x in chosen if x not in SUITES]
        if unknown:
            raise typer.BadParameter(f"unknown suite(s) {unknown}; known: {list(SUITES)}")
        plan = dataclasses.replace(plan, suites=chosen)
    if builtins:
        chosen = () if builtins == "none" else tuple(x.strip() for x in builtins.split(",") if x.strip())
        unknown = [x for x in chosen if x not in p.ood.builtins]
        if unknown:
            raise typer.BadParameter(f"unknown built-in(s) {unknown}; known: {list(p.ood.builtins)}")
        plan = dataclasses.replace(plan, builtins=chosen)
    meta = describe(_command())
    t0 = time.perf_counter()
    rows = run_ood(plan, BUILD, log=typer.echo)
    path = report.RESULTS / f"{output}.json"
    save(rows, plan, meta | {"preset": p.name}, time.perf_counter() - t0, path)
    typer.echo(f"wrote {path}")
    typer.echo(f"wrote {report.write()}")


@app.command()
def external(preset: PresetOption = "reduced") -> None:
    """Part 1d: the user's own ONNX teachers (scikit-learn MLPs, and MLPs + boosted trees, exported with
    skl2onnx) distilled with `python -m training run --teachers` (bench/external.py)."""
    from bench.external import run_external, verdict
    from bench.workloads import BUILD

    p = _preset(preset)
    meta = describe(_command())
    t0 = time.perf_counter()
    runs = run_external(p.external, BUILD / "external", log=typer.echo)
    result = {
        "preset": p.name,
        "plan": dataclasses.asdict(p.external),
        "machine": meta,
        "runs": runs,
        "verdict": verdict(runs),
        "seconds": time.perf_counter() - t0,
    }
    _save("external", result)
    typer.echo(f"wrote {report.write()}")


@app.command()
def suites(
    preset: PresetOption = "reduced",
    only: Annotated[
        str, typer.Option(help="comma-separated suites: tuning,confirmation,fresh,fresh2")
    ] = "tuning,confirmation,fresh,fresh2",
    datasets: Annotated[str, typer.Option(help="comma-separated dataset names (default: all)")] = "",
    split_seeds: Annotated[str, typer.Option(help="comma-separated split seeds (other splits)")] = "0",
    output: Annotated[str, typer.Option(help="results name: suites, or suites_splits")] = "suites",
) -> None:
    """Part 1b: the tuning, confirmation and fresh suites of tables no preset was tuned on, via `--data`.

    `--datasets wine,breast_cancer --split-seeds 0,1,2,3,4 --output suites_splits` measures how much
    the result moves with the split (the same table, other rows in training and test)."""
    from bench.suites import run_suites, verdict
    from bench.workloads import BUILD

    p = _preset(preset)
    names = tuple(d.strip() for d in datasets.split(",") if d.strip()) or None
    plan = dataclasses.replace(
        p.suites,
        suites=tuple(s.strip() for s in only.split(",") if s.strip()),
        datasets=names,
        split_seeds=tuple(int(s) for s in split_seeds.split(",")),
    )
    meta = describe(_command())
    t0 = time.perf_counter()
    runs = run_suites(plan, BUILD / "suites", log=typer.echo)
    result = {
        "preset": p.name,
        "plan": dataclasses.asdict(plan),
        "machine": meta,
        "runs": runs,
        "verdict": {s: verdict([r for r in runs if r["suite"] == s]) for s in plan.suites},
        "seconds": time.perf_counter() - t0,
    }
    _save(output, result)
    typer.echo(f"wrote {report.write()}")


@app.command()
def recipes(
    tables: Annotated[str, typer.Option(help="comma-separated suite/table, e.g. fresh4/friedman1_20d")],
    variant: Annotated[list[str], typer.Option(help="name:field=value,... (DistilConfig), repeatable")],
    seeds: Annotated[str, typer.Option(help="comma-separated teacher seeds")] = "0,1",
    output: Annotated[str, typer.Option(help="results name")] = "recipes",
) -> None:
    """Distillation variants side by side on seen suite tables, teachers shared per (table, seed)."""
    from bench.recipes import compare, parse_variant, table
    from bench.workloads import BUILD

    try:
        variants = dict(parse_variant(v) for v in variant)
        meta = describe(_command())
        rows = compare(
            [t.strip() for t in tables.split(",") if t.strip()],
            [int(s) for s in seeds.split(",")],
            variants,
            BUILD / "recipes",
            log=typer.echo,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    _save(output, {"machine": meta, "variants": variants, "rows": rows})
    typer.echo(table(rows))


@app.command()
def cost(
    preset: PresetOption = "reduced",
    workloads: WorkloadOption = "digits,mnist1d_wide",
    batches: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,64,256",
    provider: Annotated[str, typer.Option(help="ORT execution provider")] = "CPUExecutionProvider",
    io_binding: bool = False,
    output: Annotated[str, typer.Option(help="results name (gpu_cost on GPU)")] = "cost",
    threads: Annotated[int, typer.Option(help="ORT intra-op threads (0 = ORT's default, the server's)")] = 0,
) -> None:
    """Part 2: rows/s and latency of Hydra, the ensemble and one member, next to their FLOP ratio."""
    from bench import plots
    from bench.cost import run_cost

    p = _preset(preset)
    meta = describe(_command())
    sizes = tuple(int(b) for b in batches.split(","))
    result = run_cost(
        _workloads(workloads),
        sizes,
        p.cost_seconds,
        provider=provider,
        io_binding=io_binding,
        threads=threads,
    )
    result["machine"] = meta
    result["preset"] = p.name
    _save(output, result)
    plots.cost_figure(result, DOCS / f"{output}.png")
    typer.echo(f"wrote {report.write()}")


@app.command()
def server(
    preset: PresetOption = "reduced",
    workloads: WorkloadOption = "digits,mnist1d_wide",
    max_batch_size: int = 64,
    max_queue_delay_ms: float = 2.0,
    configs: Annotated[
        str,
        typer.Option(
            help="comma-separated: hydra,hydra-lean,hydra-b1,hydra-delay,triton,triton-lean,"
            "ceiling-asgi,ceiling-fastapi"
        ),
    ] = "hydra,hydra-lean,hydra-b1,hydra-delay,triton,triton-lean,ceiling-asgi,ceiling-fastapi",
    output: Annotated[str, typer.Option(help="results name (gpu_server on GPU)")] = "server",
    provider: Annotated[str, typer.Option(help="ORT execution provider")] = "CPUExecutionProvider",
) -> None:
    """Part 3: our server (batching on/off) vs Triton vs the web stack's and ORT's ceilings, under wrk."""
    from bench import plots
    from bench.loadgen import wrk_binary
    from bench.server import run_server

    p = _preset(preset)
    wrk_binary()  # fail before any server starts
    meta = describe(_command())
    result = run_server(
        _workloads(workloads),
        seconds=p.server_seconds,
        max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms,
        configs=tuple(configs.split(",")),
        provider=provider,
        log=typer.echo,
        **p.server,
    )
    result["machine"] = meta
    result["preset"] = p.name
    _save(output, result)
    plots.server_figure(result, DOCS / f"{output}.png")
    typer.echo(f"wrote {report.write()}")


def _planned_part(name: str, preset: str, plans: Any, run: Any, wrk: bool = False) -> None:
    """A part whose presets are `plans`: check the preset, run it, save `name`, rewrite the docs."""
    if preset not in plans:
        known = ", ".join(plans)
        raise typer.BadParameter(f"unknown preset {preset!r}; one of {known}", param_hint="--preset")
    if wrk:
        from bench.loadgen import wrk_binary

        wrk_binary()
    meta = describe(_command())
    t0 = time.perf_counter()
    result = run(preset, log=typer.echo)
    result["machine"] = meta
    result["preset"] = preset
    result.setdefault("seconds", round(time.perf_counter() - t0, 1))
    _save(name, result)
    typer.echo(f"wrote {report.write()}")


@app.command()
def workers(preset: PresetOption = "reduced") -> None:
    """Part 3d: `--workers 2` vs `--workers 1` side by side on digits, one-row and 32-row V2 JSON (wrk)."""
    from bench.workers import PLANS, run

    _planned_part("workers", preset, PLANS, run, wrk=True)


@app.command("one-client")
def one_client(
    rounds: Annotated[int, typer.Option(help="paired rounds, each server alone, order reversed")] = 10,
    seconds: Annotated[float, typer.Option(help="seconds per cell")] = 5.0,
) -> None:
    """Part 3's one-client criterion alone, in more paired rounds than `bench server` affords:
    digits, one one-row client, batching on vs off vs the delay rule (bench/batching_rule.py)."""
    import tempfile

    from bench import batching_rule
    from bench.server import _bodies
    from bench.workloads import digits

    meta = describe(_command())
    w = digits()
    work = Path(tempfile.mkdtemp(prefix="one-client-"))
    paired = batching_rule.run_paired(
        w,
        _bodies(w, (1,), work, lean=False),
        rounds=rounds,
        seconds=seconds,
        max_batch_size=64,
        max_queue_delay_ms=2.0,  # bench server's default
        work=work,
        cells=((1, 1),),
        log=typer.echo,
    )
    paired["machine"] = meta
    paired["targets"] = batching_rule.targets(paired)
    for t in paired["targets"]:
        typer.echo(f"{t['target']}: {t['value']} — {'met' if t['met'] else 'missed'}")
    _save("one_client", paired)


@app.command("grpc")
def grpc_part(
    seconds: Annotated[float, typer.Option(help="seconds per load cell (after a 1 s warm-up)")] = 5.0,
    rounds: Annotated[int, typer.Option(help="rounds of each cell, interleaved; the median is reported")] = 3,
) -> None:
    """Part 3c: gRPC vs V2 JSON vs V2 binary (one-row and 32-row requests), client ceiling, profile."""
    from bench.grpc_load import run_grpc

    meta = describe(_command())
    result = run_grpc(seconds=seconds, rounds=rounds, log=typer.echo)
    result["machine"] = meta
    _save("grpc", result)
    typer.echo(f"wrote {report.write()}")


@app.command()
def drift(preset: PresetOption = "reduced") -> None:
    """Part 5: drift alarm false alarms and detection delay vs alibi-detect CVMDriftOnline."""
    from bench.drift import PLANS, run

    _planned_part("drift", preset, PLANS, run)


@app.command()
def shadow(preset: PresetOption = "reduced") -> None:
    """Part 6: shadow teacher fidelity on held-out digits traffic and its throughput cost (wrk)."""
    from bench.shadow import PLANS, run

    _planned_part("shadow", preset, PLANS, run, wrk=True)


@app.command("build-model")
def build_model() -> None:
    """Train and export the compute-bound mnist1d_wide workload (bench/build/models)."""
    from bench.workloads import BUILD, build_wide_model

    typer.echo(f"wrote {build_wide_model(BUILD / 'models')}")


@app.command("report")
def report_cmd() -> None:
    """Regenerate docs/BENCHMARKS.md (and the figures drawn from results alone) from bench/results/*.json."""
    from bench import plots

    q = report.load("quality")
    if q and "ablation_aggregate" in q:
        plots.ablation_figure(q["ablation_aggregate"], DOCS / "quality_ablations.png")
    if q and "shift" in q:
        plots.shift_figure(q["shift"], DOCS / "quality_shift.png")
    typer.echo(f"wrote {report.write()}")


@app.command("all")
def all_parts(preset: PresetOption = "reduced") -> None:
    """Parts 1-3 in order (part 4 is bench/gpu.sh)."""
    # the second with one ORT thread: separates the graphs' cost from how well each uses the thread pool
    for output, threads in (("cost", 0), ("cost_1thread", 1)):
        cost(
            preset=preset,
            workloads="digits,mnist1d_wide",
            batches="1,64,256",
            provider="CPUExecutionProvider",
            io_binding=False,
            output=output,
            threads=threads,
        )
    server(
        preset=preset,
        workloads="digits,mnist1d_wide",
        max_batch_size=64,
        max_queue_delay_ms=2.0,
        configs="hydra,hydra-b1,hydra-delay,triton",
        output="server",
        provider="CPUExecutionProvider",
    )
    quality(preset=preset, skip_ablations=False, skip_shift=False)
    suites(
        preset=preset, only="tuning,confirmation,fresh,fresh2", datasets="", split_seeds="0", output="suites"
    )
    ood(preset=preset, no_oracle=False)  # after quality and suites: reuses their checkpoints
    external(preset=preset)


if __name__ == "__main__":
    app()
