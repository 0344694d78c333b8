"""Schema-2 packages with density outputs, against a real server: `density_score` and
`input_density_score` in every protocol's answers (and only for such models), the combined OOD
statistic of three components and its p-values equal an offline computation with
service.uncertainty on the raw graph outputs, the body density catches rows in the wrong unit that
mutual information alone lets through, the two-sided input typicality catches rows shrunk towards
the training mean that both let through, metrics, metadata, and bad manifests refused.
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

from service.metrics import DENSITY_BUCKETS, INPUT_DENSITY_BUCKETS
from tests import oracle
from tests.service.support import (
    CLF_FEATURES,
    REG_FEATURES,
    InProcessClient,
    RawModel,
    ReferenceModel,
    Server,
    component_scores,
    in_process,
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
    "expected_entropy", "total_entropy", "epkl", "density_score", "input_density_score", "ood_score",
    "ood_p_value", "ood_flag", "ood_alpha",
]  # fmt: skip
DENSITY_REGRESSION_FIELDS = [
    "mean", "variance", "aleatoric_variance", "epistemic_variance", "total_variance", "disagreement",
    "density_score", "input_density_score", "interval_lower", "interval_upper", "interval_level",
    "ood_score", "ood_p_value", "ood_flag", "ood_alpha",
]  # fmt: skip
GRAPH_SCORE_FIELDS = ("density_score", "input_density_score")


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


def _request(target: str | InProcessClient, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """`path` of a real server's base URL, or of the app in process."""
    if isinstance(target, InProcessClient):
        return target.request(method, path, **kwargs)
    return httpx.request(method, f"{target}{path}", timeout=10, **kwargs)


def predict(
    url: str | InProcessClient, model: str, rows: np.ndarray, **parameters: Any
) -> list[dict[str, Any]]:
    body = {"instances": rows.tolist(), "parameters": parameters}
    response = _request(url, "POST", f"/v1/models/{model}:predict", json=body)
    assert response.status_code == 200, response.text
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


def offline_ood(directory: Path, rows: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    """The combined statistic, p-value and flag computed here: ORT on the graph, then the manifest's
    normalisers and calibration scores (read from the JSON) through the independent test oracle."""
    ood = json.loads((directory / "manifest.json").read_text())["ood"]
    assert ood["score"] == "combined" and ood["combination"] == "sum_pos_log_z"
    raw = RawModel(directory / "model.onnx").raw(rows)
    scores = component_scores(raw, ood["components"][0]["score"])
    assert list(scores) == [c["score"] for c in ood["components"]]
    statistic = oracle.ood_score(ood, scores)
    p_value = oracle.p_values(ood["calibration_scores"], statistic)
    return {
        "density": scores["density"],
        "input_density": scores["input_density"],
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
    assert not set(GRAPH_SCORE_FIELDS) & set(plain[0]) and "ood_score" in plain[0]


@pytest.mark.parametrize("model", ["dens_clf", "dens_reg"])
def test_combined_ood_equals_the_offline_computation(
    model: str, density_server: Server, density_repository: Path
) -> None:
    # in-distribution rows, rows in a wider spread, in the wrong unit, shrunk towards the training
    # mean (the input typicality's lower tail): p-values across (0, 1]
    rows = np.concatenate([rows_for(model, 40, seed=2, scale=s) for s in (1.0, 2.0, 10.0, 0.3, 0.01)])
    alpha = 0.1
    predictions = predict(density_server.url, model, rows, alpha=alpha)
    expected = offline_ood(density_repository / model / "1", rows, alpha)
    got = {name: np.asarray([p[name] for p in predictions]) for name in (*GRAPH_SCORE_FIELDS, "ood_score")}
    np.testing.assert_allclose(got["density_score"], expected["density"], rtol=1e-5)
    np.testing.assert_allclose(got["input_density_score"], expected["input_density"], rtol=1e-5)
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


def test_rows_shrunk_towards_the_training_mean_are_flagged_by_input_typicality(
    density_server: Server, references: dict[str, ReferenceModel]
) -> None:
    """The test models' "training" rows are centred N(0, 1), so rows ×0.01 sit almost on the training
    mean: a ReLU body maps them next to its bias, as ordinary as any ID row to the heads and to the
    body density, and MI-only `clf/1` lets them through. For 8 features ‖z‖² ≈ χ²_8 concentrates
    around 7, far from 0: the two-sided input typicality sees rows that are atypically *close*."""
    rows = rows_for("clf", 200, seed=8, scale=0.01)
    combined = predict(density_server.url, "dens_clf", rows)
    mi_only = predict(density_server.url, "clf", rows)
    assert all(p["ood_flag"] for p in combined)
    assert np.mean([p["ood_flag"] for p in mi_only]) <= 0.1
    components = {c.score: c.normaliser() for c in references["dens_clf"].manifest.ood.components}
    z = {score: norm(np.array([p[f"{score}_score" if "density" in score else score] for p in combined]))
         for score, norm in components.items()}  # fmt: skip
    # the low side did it: input typicality far below its ID median, its z the largest of the three
    assert components["input_density"].tails == "both"
    input_density = np.array([p["input_density_score"] for p in combined])
    assert (np.log(input_density) < components["input_density"].log_median).all()
    assert (z["input_density"] > np.maximum(z["mutual_information"], z["density"])).all()
    assert (z["density"] < 2.0).all()  # the body density sees nothing unusual
    # the regression package: the same lower tail on its own 5 features
    regression = predict(density_server.url, "dens_reg", rows_for("dens_reg", 100, seed=8, scale=0.01))
    assert all(p["ood_flag"] for p in regression)


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


def test_v2_infer_json_and_binary_carry_the_density_scores(
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
                    assert not set(GRAPH_SCORE_FIELDS) & set(names)
                    continue
                assert names.index("density_score") < names.index("input_density_score")
                assert names.index("input_density_score") < names.index("ood_score")
                for name in GRAPH_SCORE_FIELDS:
                    value = everything.as_numpy(name)
                    assert value.dtype == np.float32 and value.shape == (5,), name
                    np.testing.assert_allclose(value, expected[name], rtol=1e-6)
                # asked for by name, alone
                only = client.infer(
                    model,
                    [tensor],
                    outputs=[triton.InferRequestedOutput("input_density_score", binary_data=binary)],
                )
                assert [o["name"] for o in only.get_response()["outputs"]] == ["input_density_score"]
                np.testing.assert_allclose(
                    only.as_numpy("input_density_score"), expected["input_density_score"], rtol=1e-6
                )
    finally:
        client.close()
    # asking a v1 model for a density is asking for an output it does not have
    for name in GRAPH_SCORE_FIELDS:
        body = {
            "inputs": [{"name": "input", "shape": [1, CLF_FEATURES], "datatype": "FP32", "data": [0.0] * 8}],
            "outputs": [{"name": name}],
        }
        refused = httpx.post(f"{density_server.url}/v2/models/clf/infer", json=body, timeout=10)
        assert refused.status_code == 400 and name in refused.json()["error"], name


def test_metadata_lists_the_density_scores_and_the_ood_components(density_server: Server) -> None:
    url = density_server.url
    for model, head_score in HEAD_SCORE.items():
        v2 = httpx.get(f"{url}/v2/models/{model}", timeout=10).json()
        outputs = {o["name"]: o for o in v2["outputs"]}
        for name in GRAPH_SCORE_FIELDS:
            assert outputs[name] == {"name": name, "datatype": "FP32", "shape": [-1]}
        parameters = v2["parameters"]
        assert parameters["ood_score"] == "combined"
        assert parameters["ood_components"] == [head_score, "density", "input_density"]
        assert parameters["ood_combination"] == "sum_pos_log_z"  # the rule the manifest names
        v1 = httpx.get(f"{url}/v1/models/{model}", timeout=10).json()
        assert v1["ood"]["score"] == "combined"
        assert v1["ood"]["components"] == [head_score, "density", "input_density"]
        assert set(GRAPH_SCORE_FIELDS) <= {o["name"] for o in v1["outputs"]}
    plain = httpx.get(f"{url}/v2/models/clf", timeout=10).json()
    assert not set(GRAPH_SCORE_FIELDS) & {o["name"] for o in plain["outputs"]}
    assert plain["parameters"]["ood_score"] == "mutual_information"
    assert plain["parameters"]["ood_components"] == [] and plain["parameters"]["ood_combination"] is None


def test_openapi_documents_the_prediction_fields(density_server: Server) -> None:
    spec = httpx.get(f"{density_server.url}/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    predictions = schemas["PredictResponse"]["properties"]["predictions"]
    prediction = schemas[predictions["items"]["$ref"].rsplit("/", 1)[1]]
    for name in (*GRAPH_SCORE_FIELDS, "ood_score", "ood_p_value", "ood_flag", "mutual_information"):
        assert prediction["properties"][name]["description"], name
    for name in GRAPH_SCORE_FIELDS:
        assert "Mahalanobis" in prediction["properties"][name]["description"], name


# ------------------------------------------------------------------------------------------ metrics


def _density_histogram(
    url: str | InProcessClient, model: str, family_name: str = "hydra_density_score"
) -> dict[str, float]:
    """One histogram's samples of one model version: {"le=<bound>": count, "count": n, "sum": s}."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(_request(url, "GET", "/metrics").text):
        if family.name != family_name:
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
    raw = references["dens_reg"].raw(rows)
    families = {
        "hydra_density_score": (raw["density"].astype(np.float64), DENSITY_BUCKETS),
        "hydra_input_density_score": (raw["input_density"].astype(np.float64), INPUT_DENSITY_BUCKETS),
    }
    before = {f: _density_histogram(url, "dens_reg", f) for f in families}
    predict(url, "dens_reg", rows)
    predict(url, "clf", rows_for("clf", 10, seed=6))
    after = {f: _density_histogram(url, "dens_reg", f) for f in families}
    for family, (values, buckets) in families.items():
        was, now = before[family], after[family]
        assert was, family  # exported at zero from the load on, like the density histogram
        assert now["count"] - was["count"] == len(rows), family
        assert now["sum"] - was["sum"] == pytest.approx(values.sum(), rel=1e-5), family
        for bound in buckets:
            added = now[f"le={bound!r}"] - was[f"le={bound!r}"]
            # float32 ties: none this near a bound
            assert added == int((values <= bound).sum()), (family, bound)
        assert np.ptp(np.log10(values)) > 3, family  # the rows spread over several decades of buckets
        assert not _density_histogram(url, "clf", family)  # a v1 model has no density series at all


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
    "input_density_component_without_its_output": (
        {"outputs.input_density": None},
        "ood score 'input_density' reads the input_density graph output: outputs.input_density is not set",
    ),
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
    with in_process(repo, api_key=KEY) as server:  # load errors: no socket needed
        for i, (change, words) in enumerate(BAD_MANIFESTS.values()):
            name = f"bad{i}"
            directory = write_model(repo, name, 1, "classification", density=True)
            _rewrite_manifest(directory, change)
            refused = server.post(f"/v2/repository/models/{name}/load", headers={"X-API-Key": KEY})
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert f"model {name!r} version 1: invalid manifest" in error and words in error, error
        # a valid schema-2 manifest beside a graph without the density output
        directory = write_model(repo, "no_density_graph", 1, "classification", density=True)
        onnx.save(make_classifier(0), directory / "model.onnx")
        refused = server.post("/v2/repository/models/no_density_graph/load", headers={"X-API-Key": KEY})
        refusal = refused.json()["error"]
        assert refused.status_code == 400 and "graph lacks outputs ['density', 'input_density']" in refusal
        # the good model keeps serving
        body = {"instances": rows_for("clf", 2, seed=7).tolist()}
        served = server.post("/v1/models/clf:predict", json=body, headers={"X-API-Key": KEY})
        assert served.status_code == 200, served.text


def test_a_two_sided_component_without_its_side_scales_falls_back_to_the_log_iqr(tmp_path: Path) -> None:
    """`log_lower_scale` / `log_upper_scale` are optional: without them a `both` component scores
    |log s − median| / log_iqr on either side, and the package loads and serves."""
    repo = tmp_path / "models"
    directory = write_model(repo, "no_scales", 1, "classification", density=True)
    path = directory / "manifest.json"
    document = json.loads(path.read_text())
    (component,) = [c for c in document["ood"]["components"] if c["tails"] == "both"]
    assert component["score"] == "input_density" and component["log_lower_scale"] > 0
    scaled = dict(component)  # as fitted, before the scales go
    for key in ("log_lower_scale", "log_upper_scale"):
        del component[key]
    path.write_text(json.dumps(document))
    rows = np.concatenate([rows_for("clf", 20, seed=9, scale=s) for s in (1.0, 0.01, 0.3, 10.0)])
    with in_process(repo) as server:  # the manifest's reading and the scores: no socket needed
        for family in ("hydra_density_score", "hydra_input_density_score"):  # at zero before traffic
            assert _density_histogram(server, "no_scales", family)["count"] == 0, family
        predictions = predict(server, "no_scales", rows)
    raw = RawModel(directory / "model.onnx").raw(rows)
    scores = component_scores(raw, "mutual_information")
    log_input, median, iqr = np.log(scores["input_density"]), component["log_median"], component["log_iqr"]
    fallback = component | {"log_lower_scale": iqr, "log_upper_scale": iqr}
    np.testing.assert_allclose(
        oracle.log_z(fallback, scores["input_density"]), np.abs(log_input - median) / iqr
    )
    head_and_body = document["ood"]["components"][:2]
    expected = oracle.ood_score({"components": [*head_and_body, fallback]}, scores)
    np.testing.assert_allclose([p["ood_score"] for p in predictions], expected, rtol=1e-5, atol=1e-5)
    low = log_input < median
    assert low.sum() >= 20 and (~low).sum() >= 20  # both sides of the median are exercised
    # the side scales it lost would have answered otherwise: the fallback is what served
    assert np.abs(oracle.ood_score({"components": [*head_and_body, scaled]}, scores) - expected).max() > 0.1
    p_values = oracle.p_values(document["ood"]["calibration_scores"], expected)
    np.testing.assert_allclose([p["ood_p_value"] for p in predictions], p_values, rtol=1e-6)
