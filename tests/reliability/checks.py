"""Shared checks: V1 answers against a direct ONNX Runtime run of the same rows, and metric reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from tests.service.support import CLF_FEATURES, ReferenceModel

_FLOAT_FIELDS = ("probabilities", "confidence", "mutual_information", "expected_entropy", "total_entropy")


class RowPool:
    """`size` fixed input rows and their reference answers (direct ORT + service.inference).

    Request `i` carries a pseudo-random choice of `rows` distinct pool rows (seeded by `i`), so every
    answer can be checked against the reference at the cost of one reference run of the pool, and
    an answer delivered to the wrong request (other rows) cannot pass.
    """

    def __init__(self, model_dir: Path, size: int = 512, rows: int = 32, seed: int = 7) -> None:
        self.rows_per_request = rows
        self.pool = np.random.default_rng(seed).normal(0, 1.5, (size, CLF_FEATURES)).astype(np.float32)
        self.pool = np.round(self.pool, 4)  # what JSON carries is exactly what the reference saw
        self.expected = ReferenceModel(model_dir).answer(self.pool)

    def indices(self, i: int) -> np.ndarray:
        rng = np.random.default_rng(i)
        return rng.choice(len(self.pool), self.rows_per_request, replace=False)

    def body(self, i: int) -> bytes:
        return orjson.dumps({"instances": self.pool[self.indices(i)].tolist()})

    def mismatches(self, i: int, response_body: bytes) -> list[str]:
        """Empty when the V1 answer to request `i` equals the reference for its rows."""
        predictions: list[dict[str, Any]] = orjson.loads(response_body)["predictions"]
        chosen = self.indices(i)
        problems = []
        if len(predictions) != len(chosen):
            return [f"request {i}: {len(predictions)} predictions for {len(chosen)} rows"]
        for name in _FLOAT_FIELDS:
            got = np.asarray([p[name] for p in predictions], dtype=np.float64)
            want = self.expected[name][chosen]
            if not np.allclose(got, want, rtol=1e-4, atol=1e-5):
                problems.append(f"request {i}: {name} differs from direct ORT")
        if [p["label"] for p in predictions] != self.expected["label"][chosen].tolist():
            problems.append(f"request {i}: label differs from direct ORT")
        return problems


def metric_value(url: str, name: str, labels: dict[str, str]) -> float:
    """One sample of the server's /metrics (0.0 when the series is absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        found = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if found and ",".join(sorted(found.group(1).split(","))) == wanted:
            return float(found.group(2))
    return 0.0


def is_error_body(body: bytes) -> bool:
    """The service's error shape: a JSON object with exactly one key "error" holding a non-empty string."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(document, dict)
        and set(document) == {"error"}
        and isinstance(document["error"], str)
        and bool(document["error"])
    )
