"""bench/recipes.py: variants are parsed into DistilConfig overrides, refused when misspelt, and
tabulated side by side."""

from __future__ import annotations

import pytest

from bench.recipes import parse_variant, table


def test_variants_parse_into_distil_overrides() -> None:
    assert parse_variant("none:rescale_copies=0") == ("none", {"rescale_copies": 0})
    name, o = parse_variant("wide:student_hidden=512|512,noise_std=0.5,radial_temperature=false")
    assert name == "wide"
    assert o == {"student_hidden": (512, 512), "noise_std": 0.5, "radial_temperature": False}
    with pytest.raises(ValueError, match="no field 'rescale_copie'"):
        parse_variant("x:rescale_copie=2")
    with pytest.raises(ValueError, match="no name"):
        parse_variant(":rescale_copies=2")


def test_table_puts_variants_side_by_side() -> None:
    def row(variant: str, spearman: float, kept: float | None) -> dict[str, object]:
        return {
            "table": "fresh4/friedman1_20d",
            "seed": 1,
            "variant": variant,
            "spearman": spearman,
            "min_retention": kept,
            "test": {"hydra": {"rmse": 1.41}},
        }

    md = table([row("none", 0.9496, 0.06), row("rescaled", 0.9752, 1.0)])
    lines = md.splitlines()
    assert lines[0].startswith("| table | seed | none: Spearman") and "rescaled: Spearman" in lines[0]
    assert lines[2] == "| fresh4/friedman1_20d | 1 | 0.950 / 0.06 / 1.4100 | 0.975 / 1.00 / 1.4100 |"
    assert "— / 1.4100" in table([row("none", 0.9, None)])
