"""Fixtures for the reliability tests: model repositories with the wide (compute-bound) classifier and
the faulty models, and a pool of input rows whose direct ONNX Runtime answers are known."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.models import make_wide_classifier, write_classifier_package

# Wide and deep enough that model compute, not HTTP, bounds capacity on a 2-core machine (about 30
# requests of 64 rows per second with one ORT thread): overload is then a queue problem for the
# batcher, and 10x that rate is something the test client can really offer.
WIDE_HIDDEN, WIDE_LAYERS = 2048, 6


@pytest.fixture(scope="session")
def wide_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`wide/1`: the compute-bound classifier. Tests must not modify it."""
    root = tmp_path_factory.mktemp("wide-models")
    write_classifier_package(root, "wide", 1, make_wide_classifier(WIDE_HIDDEN, WIDE_LAYERS))
    return root
