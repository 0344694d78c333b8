"""Schema-3 packages: the unseen-value count of a table's discrete columns, served.

The package is made the way training makes one (an untrained Hydra body, the densities and the
count fitted on a mixed table, `export_onnx`), its manifest written here from the independent test
oracle. Against the served app: `unseen_values` in V1 and V2 answers (INT64), the combined statistic
with the count ranked ahead equals the oracle's, rows holding values no training row has are
flagged, metadata names the priority, and manifests that misuse it are refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.manifest import ModelManifest
from tests import oracle
from tests.service.support import InProcessClient, in_process
from tests.training.packages import classifier_with_scores
from training.config import ArchConfig
from training.export import export_onnx
from training.models import HydraNet

FEATURES = 5
LABELS = ["a", "b", "c"]


def mixed_rows(n: int, seed: int) -> np.ndarray:
    """Columns: continuous, a flag, a code 0..4, a count 0..9, continuous."""
    rng = np.random.default_rng(seed)
    return np.column_stack(
        [
            rng.standard_normal(n),
            rng.integers(0, 2, n),
            rng.integers(0, 5, n),
            rng.integers(0, 10, n),
            rng.normal(3.0, 2.0, n),
        ]
    ).astype(np.float32)


def raw_outputs(session: ort.InferenceSession, rows: np.ndarray) -> dict[str, np.ndarray]:
    names = ["log_probs", "density", "input_density", "unseen_values"]
    return dict(zip(names, session.run(names, {"input": rows}), strict=True))


def scores(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mi = oracle.classification(raw["log_probs"])["mutual_information"]
    return {"mutual_information": mi} | {k: oracle.graph_score(raw[k]) for k in raw if k != "log_probs"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unseen")
    package = root / "mixed" / "1"
    train, val, cal = mixed_rows(600, 0), mixed_rows(200, 1), mixed_rows(200, 2)
    torch.manual_seed(0)
    arch = ArchConfig(kind="mlp", hidden=(16, 16), head_layers=1)
    mean, std = torch.from_numpy(train.mean(axis=0)), torch.from_numpy(train.std(axis=0))
    net = HydraNet(arch, (FEATURES,), out_dim=3, heads=4, mean=mean, std=std).eval()
    labels = np.random.default_rng(3).integers(0, 3, len(train))
    model = classifier_with_scores(net, train, labels)
    export_onnx(model, (FEATURES,), package / "model.onnx", train[:64])
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = scores(raw_outputs(session, val))
    components = [
        {"score": name, **oracle.fit_component(name, reference[name], tails)}
        for name, tails in (("mutual_information", "upper"), ("density", "upper"), ("input_density", "both"))
    ]
    ood = {"score": "combined", "components": components, "combination": "sum_pos_log_z"}
    ood |= {"priority": "unseen_values"}
    ood["calibration_scores"] = sorted(oracle.ood_score(ood, scores(raw_outputs(session, cal))).tolist())
    manifest = {
        "schema_version": 3,
        "name": "mixed",
        "version": 1,
        "task": "classification",
        "input": {"name": "input", "shape": [-1, FEATURES], "dtype": "float32"},
        "labels": LABELS,
        "heads": 4,
        "outputs": {
            "log_probs": "log_probs",
            "density": "density",
            "input_density": "input_density",
            "unseen_values": "unseen_values",
        },
        "ood": ood,
        "provenance": {"dataset": "mixed rows (tests)"},
    }
    (package / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def client(repo: Path) -> Iterator[InProcessClient]:
    with in_process(repo) as c:
        yield c


def expected(repo: Path, rows: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(
        str(repo / "mixed" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return oracle.answer(oracle.read_manifest(repo / "mixed" / "1"), raw_outputs(session, rows), alpha=alpha)


def probe_rows() -> np.ndarray:
    rows = mixed_rows(30, 9)
    wrong_unit = rows.copy()
    wrong_unit[:, 3] *= 0.1  # a count sent in tens: 7 becomes 0.7
    off_code = rows.copy()
    off_code[:, 2] = 2.5  # a code between codes
    return np.concatenate([rows, wrong_unit, off_code])


def test_v1_answers_carry_the_count_and_the_ranked_statistic(client: InProcessClient, repo: Path) -> None:
    rows, alpha = probe_rows(), 0.05
    response = client.post(
        "/v1/models/mixed:predict", json={"instances": rows.tolist(), "parameters": {"alpha": alpha}}
    )
    assert response.status_code == 200, response.text
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    want = expected(repo, rows, alpha)
    got = np.asarray([p["unseen_values"] for p in predictions])
    assert all(isinstance(p["unseen_values"], int) for p in predictions)
    np.testing.assert_array_equal(got, want["unseen_values"])
    # ID rows hold training values only; the count's column sent x0.1 is unseen wherever it was not 0
    assert (got[:30] == 0).all() and (got[60:] == 1).all()
    np.testing.assert_array_equal(got[30:60], (rows[:30, 3] != 0).astype(int))
    np.testing.assert_allclose([p["ood_score"] for p in predictions], want["ood_score"], rtol=1e-6)
    np.testing.assert_allclose([p["ood_p_value"] for p in predictions], want["ood_p_value"], rtol=1e-6)
    # no calibration row holds an unseen value: every row that does gets the smallest p-value
    flagged = np.asarray([p["ood_flag"] for p in predictions])
    assert flagged[got >= 1].all()
    assert flagged[:30].mean() <= 0.2  # in-distribution rows: the flag stays near alpha
    # ... and /metrics counts the rows that held one (reported once the batch is delivered: poll)
    series = 'hydra_unseen_value_rows_total{model="mixed",version="1"}'
    want_rows = float(np.count_nonzero(got))
    deadline = time.monotonic() + 10.0
    while True:
        lines = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith(series)]
        if (lines and float(lines[0].split()[-1]) >= want_rows) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert lines and float(lines[0].split()[-1]) == want_rows


def test_v2_answers_the_count_as_int64_and_metadata_names_the_priority(client: InProcessClient) -> None:
    rows = probe_rows()[28:32]
    body = {
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
        ],
        "outputs": [{"name": "unseen_values"}, {"name": "ood_flag"}],
    }
    response = client.post("/v2/models/mixed/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["unseen_values"]["datatype"] == "INT64" and outputs["unseen_values"]["shape"] == [4]
    assert outputs["unseen_values"]["data"][2:] == [int(rows[2, 3] != 0), int(rows[3, 3] != 0)]
    metadata = client.get("/v2/models/mixed").json()
    assert {"name": "unseen_values", "datatype": "INT64", "shape": [-1]} in metadata["outputs"]
    assert metadata["parameters"]["ood_priority"] == "unseen_values"
    assert metadata["parameters"]["ood_components"] == ["mutual_information", "density", "input_density"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema_version": 2}, "need schema_version 3"),
        ({"outputs": {"unseen_values": None}}, "outputs.unseen_values is not set"),
        (
            {"ood": {"components": [], "score": "mutual_information", "combination": None}},
            "need ood.components",
        ),
    ],
)
def test_manifests_that_misuse_the_count_are_refused(
    repo: Path, change: dict[str, Any], message: str
) -> None:
    document = json.loads((repo / "mixed" / "1" / "manifest.json").read_text())
    for key, value in change.items():
        document[key] = document[key] | value if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=message):
        ModelManifest.model_validate(document)
