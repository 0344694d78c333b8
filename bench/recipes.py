"""Distillation variants side by side on suite tables, the teachers of each (table, seed) shared.

How a change to the transfer set or the student is chosen (docs/TRAINING.md, "How the recipe was
chosen"): train the teachers once per (table, seed), then distil, export and self-check each
variant on those same teachers, so the comparison measures the variant and not a teacher draw.
Run it on seen tables only; the verdict belongs to a suite defined before the change first ran.

    python -m bench recipes --tables fresh4/friedman1_20d,tuning/penguins --seeds 0,1 \\
        --variant none:rescale_copies=0 --variant rescaled:rescale_copies=2
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`name:field=value,field=value` → (name, DistilConfig overrides); values parsed as int, float
    or a comma-free tuple of ints written `a|b`."""
    from training.config import DistilConfig

    name, _, body = text.partition(":")
    fields = {f.name: f for f in DistilConfig.__dataclass_fields__.values()}
    overrides: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        if key not in fields:
            raise ValueError(f"variant {name!r}: DistilConfig has no field {key!r}")
        if "|" in raw or key == "student_hidden":
            overrides[key] = tuple(int(v) for v in raw.split("|") if v)
        elif raw.lower() in ("true", "false"):
            overrides[key] = raw.lower() == "true"
        else:
            overrides[key] = float(raw) if "." in raw or "e" in raw.lower() else int(raw)
    if not name:
        raise ValueError(f"variant {text!r} has no name (write name:field=value)")
    return name, overrides


def compare(
    tables: list[str],
    seeds: list[int],
    variants: dict[str, dict[str, Any]],
    root: Path,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per (table, seed, variant): self-check Spearman and families, test metrics."""
    from bench.suites import SUITES, suite_config, write_csv
    from training import pipeline

    rows = []
    for spec in tables:
        suite, _, name = spec.partition("/")
        matches = [d for d in SUITES.get(suite, ()) if d.name == name]
        if not matches:
            raise ValueError(f"no table {name!r} in suite {suite!r} (write suite/table)")
        ds = matches[0]
        csv = write_csv(ds, root / "data")
        for seed in seeds:
            base = suite_config(ds, csv, seed=seed, members=8, epochs=None)
            data = pipeline.load_task_data(base)
            teachers = root / "runs" / f"{name}-s{seed}-teachers"
            if not (teachers / "teachers.pt").exists():
                teachers.mkdir(parents=True, exist_ok=True)
                pipeline.stage_teachers(base, data, teachers)
            for vname, overrides in variants.items():
                cfg = replace(base, distil=replace(base.distil, **overrides))
                run_dir = root / "runs" / f"{name}-s{seed}-{vname}"
                out = root / "models" / name / f"s{seed}-{vname}"
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(teachers / "teachers.pt", run_dir / "teachers.pt")
                t0 = time.perf_counter()
                pipeline.stage_distil(cfg, data, run_dir)
                pipeline.stage_export(cfg, data, run_dir, out)
                report = pipeline.stage_evaluate(cfg, data, run_dir, out)
                sc = report["self_check"]
                detected = [f["hydra_retention"] for f in sc["families"].values() if f["well_posed"]]
                row = {
                    "table": spec,
                    "seed": seed,
                    "variant": vname,
                    "overrides": overrides,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "transfer_size": report["transfer_size"],
                    "spearman": sc["spearman"],
                    "min_retention": min(detected) if detected else None,
                    "problems": sc["problems"],
                    "families": sc["families"],
                    "test": {m: v["test"] for m, v in report["methods"].items()},
                }
                rows.append(row)
                kept = "—" if row["min_retention"] is None else f"{row['min_retention']:.2f}"
                log(
                    f"[recipes] {spec} s{seed} {vname}: Spearman {row['spearman']:.3f}, "
                    f"lowest retention {kept}, {row['seconds']:.0f} s"
                )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (table, seed), the variants side by side."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["table"], r["seed"]), {})[r["variant"]] = r

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "—"
        kept = "—" if r["min_retention"] is None else f"{r['min_retention']:.2f}"
        metric = "accuracy" if "accuracy" in r["test"]["hydra"] else "rmse"
        return f"{r['spearman']:.3f} / {kept} / {r['test']['hydra'][metric]:.4f}"

    head = ["table", "seed", *(f"{v}: Spearman / lowest retention / Hydra test" for v in variants)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (t, seed), rs in by.items():
        lines.append("| " + " | ".join([t, str(seed), *(cell(rs.get(v)) for v in variants)]) + " |")
    return "\n".join(lines)
