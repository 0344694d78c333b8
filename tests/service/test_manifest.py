"""service/manifest.py: the package contract validates what the server relies on, and round-trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.manifest import MANIFEST_FILENAME, ModelManifest
from tests.service.support import build_density_repository, build_test_repository


def _classifier(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": "clf",
        "version": 1,
        "task": "classification",
        "input": {"name": "input", "shape": [-1, 2, 3]},
        "labels": ["a", "b", "c"],
        "heads": 4,
        "outputs": {"log_probs": "log_probs"},
        "ood": {"score": "mutual_information", "calibration_scores": [0.1, 0.2, 0.4]},
        "provenance": {"dataset": "synthetic"},
    }
    return document | changes


def _refused(document: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        ModelManifest.model_validate(document)
    return str(caught.value)


def test_a_minimal_classifier_is_read_with_its_defaults_and_derived_shapes() -> None:
    manifest = ModelManifest.model_validate(_classifier())
    assert manifest.schema_version == 3 and manifest.ood.default_alpha == 0.05
    assert manifest.row_shape == (2, 3) and manifest.num_classes == 3
    assert not manifest.has_density and not manifest.has_input_density
    assert manifest.ood.combiner is None and manifest.ood.score_names == ("mutual_information",)


def test_the_test_packages_round_trip_through_dump_and_load(tmp_path: Path) -> None:
    build_test_repository(tmp_path / "plain")
    build_density_repository(tmp_path / "density")
    for directory in [*tmp_path.glob("plain/*/1"), *tmp_path.glob("density/*/1")]:
        manifest = ModelManifest.load(directory)
        assert ModelManifest.load(directory / MANIFEST_FILENAME) == manifest  # a file or its folder
        copy = tmp_path / "copy" / directory.parent.parent.name / directory.parent.name
        copy.mkdir(parents=True)
        manifest.dump(copy)
        assert ModelManifest.load(copy) == manifest
    combined = ModelManifest.load(tmp_path / "density" / "dens_clf" / "1")
    assert combined.has_density and combined.has_input_density and combined.ood.combiner is not None
    assert combined.ood.score_names == ("mutual_information", "density", "input_density")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"labels": ["only"]}, "at least two labels"),
        ({"outputs": {"mean": "mean"}}, "needs outputs.log_probs"),
        ({"input": {"name": "input", "shape": [4, 6]}}, "variable batch dimension -1"),
        ({"input": {"name": "input", "shape": [-1, 0]}}, "dims > 0 or -1"),
        ({"name": "bad name!"}, "name"),
        ({"version": 0}, "version"),
        ({"heads": 0}, "heads"),
        ({"feature_names": ["x", "y"]}, "2 feature_names for an input of 6 features"),
        ({"ood": {"score": "epistemic_variance", "calibration_scores": [0.1]}}, "not in"),
        ({"ood": {"score": "density", "calibration_scores": [0.1]}}, "outputs.density is not set"),
        ({"ood": {"score": "mutual_information", "calibration_scores": [0.3, 0.1]}}, "sorted ascending"),
        ({"ood": {"score": "mutual_information", "calibration_scores": []}}, "calibration_scores"),
        ({"ood": {"score": "combined", "calibration_scores": [0.1]}}, "need ood.components"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_a_manifest_the_server_could_not_serve_is_refused_with_the_reason(
    changes: dict[str, Any], words: str
) -> None:
    assert words in _refused(_classifier(**changes))


def test_non_finite_calibration_scores_are_refused() -> None:
    # JSON has no NaN or Infinity literals, but Python's json module writes and reads them
    document = json.loads(json.dumps(_classifier()).replace("0.4", "Infinity"))
    assert "finite" in _refused(document)


def test_schema_1_cannot_carry_density_outputs_or_components() -> None:
    outputs = {"log_probs": "log_probs", "density": "density"}
    assert "need schema_version 2" in _refused(_classifier(schema_version=1, outputs=outputs))


def test_a_regressor_needs_both_gaussian_outputs_and_a_regression_score() -> None:
    regression = _classifier(
        task="regression",
        labels=None,
        outputs={"mean": "mean", "variance": "variance"},
        ood={"score": "epistemic_variance", "calibration_scores": [0.1]},
    )
    assert ModelManifest.model_validate(regression).num_classes is None
    assert "outputs.mean and outputs.variance" in _refused(regression | {"outputs": {"mean": "mean"}})
    wrong = regression | {"ood": {"score": "mutual_information", "calibration_scores": [0.1]}}
    assert "not in" in _refused(wrong)


def test_combined_components_must_be_distinct_and_named_combined() -> None:
    component = {"score": "mutual_information", "log_median": -3.0, "log_iqr": 1.0}
    combined = {
        "score": "combined",
        "combination": "sum_pos_log_z",
        "components": [component, component],
        "calibration_scores": [0.1],
    }
    assert "repeat a score" in _refused(_classifier(ood=combined))
    single = combined | {"score": "mutual_information", "components": [component]}
    assert "need ood.score 'combined'" in _refused(_classifier(ood=single))
    bad_iqr = combined | {"components": [component | {"log_iqr": 0.0}]}
    assert "log_iqr" in _refused(_classifier(ood=bad_iqr))
