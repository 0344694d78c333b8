"""Schema-2 packages with a density output, against a real server: `density_score` in every protocol's
answers (and only for such models), the combined OOD statistic and its p-values equal an offline
computation with service.uncertainty on the raw graph outputs, the density catches rows in the wrong
unit that mutual information alone lets through, metrics, metadata, and bad manifests refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import DENSITY_BUCKETS
from service.uncertainty import CombinedOODScore, ConformalOODCalibrator, LogScaleNormaliser
from tests.service.support import (
    CLF_FEATURES,
    REG_FEATURES,
    RawModel,
    ReferenceModel,
    Server,
    component_scores,
    make_classifier,
    running_server,
    write_model,
)
from tests.service.test_v1 import assert_matches

KEY = "density-key"
FEATURES = {"dens_clf": CLF_FEATURES, "dens_reg": REG_FEATURES, "clf": CLF_FEATURES}
HEAD_SCORE = {"dens_clf": "mutual_information", "dens_reg": "epistemic_variance"}
DENSITY_CLASSIFICATION_FIELDS = [
    "probabilities", "label", "label_name", "confidence", "variance", "disagreement", "mutual_information",
    "expected_entropy", "total_entropy", "epkl", "density_score", "ood_score", "ood_p_value", "ood_flag",
    "ood_alpha",
]  # fmt: skip
DENSITY_REGRESSION_FIELDS = [
    "mean", "variance", "aleatoric_variance", "epistemic_variance", "total_variance", "disagreement",
    "density_score", "interval_lower", "interval_upper", "interval_level", "ood_score", "ood_p_value",
    "ood_flag", "ood_alpha",
]  # fmt: skip


@pytest.fixture(scope="module")
def density_server(density_repository: Path) -> Iterator[Server]:
    with running_server(density_repository) as server:
        yield server


@pytest.fixture(scope="module")
def references(density_repository: Path) -> dict[str, ReferenceModel]:
    return {name: ReferenceModel(density_repository / name / "1") for name in FEATURES}


def rows_for(model: str, n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(0.0, 1.0, (n, FEATURES[model])) * scale
    return rows.astype(np.float32)


def predict(url: str, model: str, rows: np.ndarray, **parameters: Any) -> list[dict[str, Any]]:
    body = {"instances": rows.tolist(), "parameters": parameters}
    response = httpx.post(f"{url}/v1/models/{model}:predict", json=body, timeout=10)
    assert response.status_code == 200, response.text
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


def offline_ood(directory: Path, rows: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    """The combined statistic, p-value and flag computed here: ORT on the graph, then the manifest's
    normalisers and calibration scores (read from the JSON) through service.uncertainty."""
    ood = json.loads((directory / "manifest.json").read_text())["ood"]
    assert ood["score"] == "combined" and ood["combination"] == CombinedOODScore.RULE
    combiner = CombinedOODScore(
        [LogScaleNormaliser(c["score"], c["log_median"], c["log_iqr"]) for c in ood["components"]]
    )
    raw = RawModel(directory / "model.onnx").raw(rows)
    scores = component_scores(raw, ood["components"][0]["score"])
    statistic = combiner(scores)
    p_value = ConformalOODCalibrator(ood["calibration_scores"]).p_values(statistic)
    return {
        "density": scores["density"],
        "ood_score": statistic,
        "ood_p_value": p_value,
        "ood_flag": p_value <= alpha,
    }


# ------------------------------------------------------------------------------------------ answers


def test_v1_answers_carry_density_score_for_density_models_only(
    density_server: Server, references: dict[str, ReferenceModel]
) -> None:
    url = density_server.url
    for model, fields in (
        ("dens_clf", DENSITY_CLASSIFICATION_FIELDS),
        ("dens_reg", DENSITY_REGRESSION_FIELDS),
    ):
        rows = rows_for(model, 6, seed=1)
        predictions = predict(url, model, rows)
        assert list(predictions[0]) == fields, model
        assert_matches(predictions, references[model].answer(rows))
    plain = predict(url, "clf", rows_for("clf", 3, seed=1))
    assert "density_score" not in plain[0] and "ood_score" in plain[0]


@pytest.mark.parametrize("model", ["dens_clf", "dens_reg"])
def test_combined_ood_equals_the_offline_computation(
    model: str, density_server: Server, density_repository: Path
) -> None:
    # in-distribution rows, rows in a wider spread, rows in the wrong unit: p-values across (0, 1]
    rows = np.concatenate([rows_for(model, 40, seed=2, scale=s) for s in (1.0, 2.0, 10.0)])
    alpha = 0.1
    predictions = predict(density_server.url, model, rows, alpha=alpha)
    expected = offline_ood(density_repository / model / "1", rows, alpha)
    got = {name: np.asarray([p[name] for p in predictions]) for name in ("density_score", "ood_score")}
    np.testing.assert_allclose(got["density_score"], expected["density"], rtol=1e-5)
    np.testing.assert_allclose(got["ood_score"], expected["ood_score"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([p["ood_p_value"] for p in predictions], expected["ood_p_value"], rtol=1e-6)
    assert [p["ood_flag"] for p in predictions] == expected["ood_flag"].tolist()
    p_values = expected["ood_p_value"]
    assert p_values.min() < alpha < p_values.max()  # both sides of the flag are exercised


def test_rows_in_the_wrong_unit_are_flagged_by_density_where_mutual_information_is_not(
    density_server: Server, references: dict[str, ReferenceModel]
) -> None:
    """`clf/1` is the same graph without the density, calibrated on mutual information alone (v1).
    On rows ×10 the heads grow confident and MI lets many through; the density sees them all."""
    rows = rows_for("clf", 200, seed=3, scale=10.0)
    combined = predict(density_server.url, "dens_clf", rows)
    mi_only = predict(density_server.url, "clf", rows)
    np.testing.assert_allclose(
        [p["probabilities"] for p in combined], [p["probabilities"] for p in mi_only], rtol=1e-6
    )
    combined_flags = np.array([p["ood_flag"] for p in combined])
    mi_flags = np.array([p["ood_flag"] for p in mi_only])
    assert combined_flags.all()
    missed_by_mi = ~mi_flags
    assert missed_by_mi.sum() >= 40, int(missed_by_mi.sum())
    # on those rows the density is the larger z-score: it, not MI, raised the combined statistic
    components = references["dens_clf"].manifest.ood.components
    density_z = components[1].normaliser()(np.array([p["density_score"] for p in combined]))
    mi_z = components[0].normaliser()(np.array([p["mutual_information"] for p in combined]))
    assert components[1].score == "density" and (density_z[missed_by_mi] > mi_z[missed_by_mi]).all()
    # and ID rows are flagged at about the usual rate (≤ α in expectation: calibration noise only)
    id_flags = [p["ood_flag"] for p in predict(density_server.url, "dens_clf", rows_for("clf", 400, seed=4))]
    assert np.mean(id_flags) <= 0.1


def test_a_density_that_overflows_float32_is_the_largest_float32_not_null(density_server: Server) -> None:
    """Finite rows far enough out overflow the graph's float32 squared distance: the answer is still
    a number (JSON has no inf: it would be null), the combined score finite, the row flagged."""
    rows = np.full((2, CLF_FEATURES), 1e30, dtype=np.float32)
    (far, _) = predict(density_server.url, "dens_clf", rows)
    assert far["density_score"] == pytest.approx(float(np.finfo(np.float32).max), rel=1e-6)
    assert isinstance(far["ood_score"], float) and np.isfinite(far["ood_score"]) and far["ood_flag"] is True
    body = {
        "inputs": [
            {"name": "input", "shape": [2, CLF_FEATURES], "datatype": "FP32", "data": rows.ravel().tolist()}
        ]
    }
    answer = httpx.post(f"{density_server.url}/v2/models/dens_clf/infer", json=body, timeout=10).json()
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    assert None not in outputs["density_score"] + outputs["ood_score"], outputs


def test_v2_infer_json_and_binary_carry_density_score(
    density_server: Server, references: dict[str, ReferenceModel]
) -> None:
    client = triton.InferenceServerClient(density_server.url.removeprefix("http://"), network_timeout=30.0)
    try:
        for model in FEATURES:
            rows = rows_for(model, 5, seed=5, scale=2.0)
            expected = references[model].answer(rows)
            for binary in (False, True):
                tensor = triton.InferInput("input", list(rows.shape), "FP32")
                tensor.set_data_from_numpy(rows, binary_data=binary)
                outputs = [
                    triton.InferRequestedOutput(name, binary_data=binary)
                    for name in ("ood_score", "ood_p_value", "ood_flag")
                ]
                result = client.infer(model, [tensor], outputs=outputs)
                np.testing.assert_allclose(result.as_numpy("ood_score"), expected["ood_score"], rtol=1e-5)
                np.testing.assert_array_equal(result.as_numpy("ood_flag"), expected["ood_flag"])
                everything = client.infer(model, [tensor])  # no `outputs`: every output
                names = [o["name"] for o in everything.get_response()["outputs"]]
                if model == "clf":
                    assert "density_score" not in names
                    continue
                assert names.index("density_score") < names.index("ood_score")
                density = everything.as_numpy("density_score")
                assert density.dtype == np.float32 and density.shape == (5,)
                np.testing.assert_allclose(density, expected["density_score"], rtol=1e-6)
    finally:
        client.close()
    # asking a v1 model for a density is asking for an output it does not have
    body = {
        "inputs": [{"name": "input", "shape": [1, CLF_FEATURES], "datatype": "FP32", "data": [0.0] * 8}],
        "outputs": [{"name": "density_score"}],
    }
    refused = httpx.post(f"{density_server.url}/v2/models/clf/infer", json=body, timeout=10)
    assert refused.status_code == 400 and "density_score" in refused.json()["error"]


def test_metadata_lists_density_score_and_the_ood_components(density_server: Server) -> None:
    url = density_server.url
    for model, head_score in HEAD_SCORE.items():
        v2 = httpx.get(f"{url}/v2/models/{model}", timeout=10).json()
        outputs = {o["name"]: o for o in v2["outputs"]}
        assert outputs["density_score"] == {"name": "density_score", "datatype": "FP32", "shape": [-1]}
        parameters = v2["parameters"]
        assert parameters["ood_score"] == "combined"
        assert parameters["ood_components"] == [head_score, "density"]
        assert parameters["ood_combination"] == "max_log_z"
        v1 = httpx.get(f"{url}/v1/models/{model}", timeout=10).json()
        assert v1["ood"]["score"] == "combined" and v1["ood"]["components"] == [head_score, "density"]
        assert "density_score" in {o["name"] for o in v1["outputs"]}
    plain = httpx.get(f"{url}/v2/models/clf", timeout=10).json()
    assert "density_score" not in {o["name"] for o in plain["outputs"]}
    assert plain["parameters"]["ood_score"] == "mutual_information"
    assert plain["parameters"]["ood_components"] == [] and plain["parameters"]["ood_combination"] is None


def test_openapi_documents_the_prediction_fields(density_server: Server) -> None:
    spec = httpx.get(f"{density_server.url}/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    predictions = schemas["PredictResponse"]["properties"]["predictions"]
    prediction = schemas[predictions["items"]["$ref"].rsplit("/", 1)[1]]
    for name in ("density_score", "ood_score", "ood_p_value", "ood_flag", "mutual_information"):
        assert prediction["properties"][name]["description"], name
    assert "Mahalanobis" in prediction["properties"]["density_score"]["description"]


# ------------------------------------------------------------------------------------------ metrics


def _density_histogram(url: str, model: str) -> dict[str, float]:
    """`hydra_density_score` samples of one model version: {"le=<bound>": count, "count": n, "sum": s}."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name != "hydra_density_score":
            continue
        for s in family.samples:
            if s.labels.get("model") == model and s.labels.get("version") == "1":
                key = f"le={s.labels['le']}" if "le" in s.labels else s.name.rsplit("_", 1)[1]
                out[key] = s.value
    return out


def test_density_histogram_counts_every_row_of_density_models_only(
    density_server: Server, references: dict[str, ReferenceModel]
) -> None:
    url = density_server.url
    # dens_reg: no other test here sends it a float32-overflowing row, whose value would swamp _sum
    rows = np.concatenate([rows_for("dens_reg", 30, seed=6, scale=s) for s in (0.1, 1.0, 30.0)])
    density = references["dens_reg"].raw(rows)["density"].astype(np.float64)
    before = _density_histogram(url, "dens_reg")
    predict(url, "dens_reg", rows)
    predict(url, "clf", rows_for("clf", 10, seed=6))
    after = _density_histogram(url, "dens_reg")
    assert after["count"] - before.get("count", 0.0) == len(rows)
    assert after["sum"] - before.get("sum", 0.0) == pytest.approx(density.sum(), rel=1e-5)
    for bound in DENSITY_BUCKETS:
        added = after[f"le={bound!r}"] - before.get(f"le={bound!r}", 0.0)
        assert added == int((density <= bound).sum()), bound  # float32 ties: none this near a bound
    assert np.ptp(np.log10(density)) > 3  # the rows spread over several decades of the buckets
    assert not _density_histogram(url, "clf")  # a v1 model has no density series at all


# ------------------------------------------------------------------------------------ bad manifests


def _rewrite_manifest(directory: Path, change: dict[str, Any]) -> None:
    path = directory / "manifest.json"
    document = json.loads(path.read_text())
    for key, value in change.items():
        section, _, field = key.partition(".")
        if field:
            if value is None:
                document[section].pop(field, None)
            else:
                document[section][field] = value
        else:
            document[section] = value
    path.write_text(json.dumps(document))


BAD_MANIFESTS: dict[str, tuple[dict[str, Any], str]] = {
    # name: (change to a good dens_clf manifest, words the load error must contain)
    "components_without_density_output": ({"outputs.density": None}, "outputs.density is not set"),
    "components_in_schema_1": ({"schema_version": 1}, "need schema_version 2"),
    "components_without_combined_score": ({"ood.score": "mutual_information"}, "ood.score 'combined'"),
    "unknown_component": (
        {"ood.components": [{"score": "nope", "log_median": 0.0, "log_iqr": 1.0}]},
        "'nope'",
    ),
}


def test_bad_schema_2_manifests_are_refused_with_a_clear_load_error(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "clf", 1, "classification")
    with running_server(repo, api_key=KEY) as server:
        for i, (change, words) in enumerate(BAD_MANIFESTS.values()):
            name = f"bad{i}"
            directory = write_model(repo, name, 1, "classification", density=True)
            _rewrite_manifest(directory, change)
            refused = httpx.post(
                f"{server.url}/v2/repository/models/{name}/load", headers={"X-API-Key": KEY}, timeout=30
            )
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert f"model {name!r} version 1: invalid manifest" in error and words in error, error
        # a valid schema-2 manifest beside a graph without the density output
        directory = write_model(repo, "no_density_graph", 1, "classification", density=True)
        onnx.save(make_classifier(0), directory / "model.onnx")
        refused = httpx.post(
            f"{server.url}/v2/repository/models/no_density_graph/load", headers={"X-API-Key": KEY}, timeout=30
        )
        assert refused.status_code == 400 and "graph lacks outputs ['density']" in refused.json()["error"]
        # the good model keeps serving
        body = {"instances": rows_for("clf", 2, seed=7).tolist()}
        served = httpx.post(f"{server.url}/v1/models/clf:predict", json=body, headers={"X-API-Key": KEY})
        assert served.status_code == 200, served.text
