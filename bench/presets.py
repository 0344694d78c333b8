"""Named sizes of a benchmark run. `reduced` produced the published numbers (docs/BENCHMARKS.md says
which preset each table came from); `full` is the same suite with more seeds, the presets' own
epochs and longer cells; `smoke` checks that everything runs, in a few minutes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.external import ExternalPlan
from bench.ood import OODPlan
from bench.quality import QualityPlan
from bench.suites import SuitePlan


@dataclass(frozen=True)
class Preset:
    name: str
    quality: QualityPlan
    cost_seconds: float  # per graph and batch size, interleaved
    server_seconds: float  # per load cell (after a 1 s warm-up)
    server: dict[str, Any] = field(default_factory=dict)
    suites: SuitePlan = field(default_factory=SuitePlan)
    ood: OODPlan = field(default_factory=OODPlan)
    external: ExternalPlan = field(default_factory=ExternalPlan)


PRESETS = {
    "smoke": Preset(
        "smoke",
        QualityPlan(
            datasets=("digits", "toy"),
            seeds=(0,),
            epochs={"digits": 2, "toy": 2},
            ablation_seeds=(0,),
            ablation_epochs=2,
            ablations=("M=4", "body frozen"),
            shift_dataset="mnist1d",
            shift_levels=(0, 5),
            shift_rows=200,
        ),
        cost_seconds=0.3,
        server_seconds=1.0,
        server={"concurrencies": (1, 8), "extra_one_row": (), "paired_rounds": 1, "aa_rounds": 0},
        suites=SuitePlan(seeds=(0,), members=3, epochs=2),
        ood=OODPlan(
            builtins=("toy",),
            builtin_epochs=(("toy", 2),),
            suites=("tuning",),
            members=3,
            suite_epochs=2,
        ),
        external=ExternalPlan(datasets=("wine",), ensembles=("mixed",), epochs=2),
    ),
    "reduced": Preset(
        "reduced",
        QualityPlan(
            datasets=("mnist1d", "digits", "toy", "diabetes"),
            seeds=(0, 1, 2),
            epochs={"mnist1d": 12, "digits": None, "toy": 80, "diabetes": 100},
            ablation_seeds=(0, 1),
            ablation_epochs=20,
        ),
        cost_seconds=2.0,
        server_seconds=5.0,
        suites=SuitePlan(seeds=(0, 1)),
        ood=OODPlan(seeds=(0, 1)),
    ),
    "full": Preset(
        "full",
        QualityPlan(seeds=(0, 1, 2, 3, 4), ablation_seeds=(0, 1, 2)),
        cost_seconds=5.0,
        server_seconds=10.0,
        suites=SuitePlan(seeds=(0, 1, 2)),
    ),
}
