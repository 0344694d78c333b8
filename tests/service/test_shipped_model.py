"""The model this repository ships (models/digits/1, made by `make model`) served by the service's app
(in process, over httpx's ASGI transport: `support.in_process`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.service.support import REPO_ROOT, InProcessClient, ReferenceModel, in_process
from tests.service.test_v1 import assert_matches

SHIPPED = REPO_ROOT / "models"


@pytest.fixture(scope="module")
def shipped() -> Iterator[InProcessClient]:
    with in_process(SHIPPED) as client:
        yield client


def test_serves_digits_accurately_and_flags_noise(shipped: InProcessClient) -> None:
    digits = load_digits()
    rows = digits.data[::9].astype(np.float32)  # 200 real digits
    url = "/v1/models/digits:predict"
    body = shipped.post(url, json={"instances": rows.tolist()}, timeout=30).json()
    predictions = body["predictions"]
    assert body["model_name"] == "digits"
    accuracy = np.mean([p["label"] == int(y) for p, y in zip(predictions, digits.target[::9], strict=True)])
    assert accuracy > 0.9
    assert [p["label_name"] for p in predictions[:3]] == [str(p["label"]) for p in predictions[:3]]
    directory = SHIPPED / "digits" / body["model_version"]
    assert_matches(predictions, ReferenceModel(Path(directory)).answer(rows))

    # Uniform pixel noise is far from any digit: its conformal p-values must sit well below the digits'.
    noise = np.random.default_rng(0).uniform(0, 16, (200, 64)).round()
    noisy = shipped.post(url, json={"instances": noise.tolist()}, timeout=30).json()["predictions"]
    in_flag_rate = np.mean([p["ood_flag"] for p in predictions])
    noise_flag_rate = np.mean([p["ood_flag"] for p in noisy])
    assert in_flag_rate <= 0.15
    assert noise_flag_rate > in_flag_rate + 0.2
