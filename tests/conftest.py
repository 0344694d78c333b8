"""Fixtures shared by every test package: the small test model repository and writable copies of it."""

# ruff: noqa: E402  (the thread-pool sizes below must be set before anything imports numpy)

from __future__ import annotations

import os

# One OpenMP / BLAS thread per process, set before numpy, scikit-learn or torch start their pools
# (also inherited by the servers and training runs the tests start). The box has two cores shared
# by the test process, its servers and whatever else runs: spinning thread pools then thrash. One
# HistGradientBoosting fit (tests/bench/test_ood.py) took 9.0 s with the default pool and 0.4 s
# with one thread under a load average of 4.6. Tests assert behaviour, never speed.
for _pool in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_pool, "1")

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.support import (
    API_KEY,
    Server,
    build_density_repository,
    build_test_repository,
    running_server,
)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`clf/1` and `reg/1` of tests/service/support.py, written once per session. Never modify it."""
    return build_test_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def density_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dens_clf/1`, `dens_reg/1` (schema 2: density outputs, combined OOD score) and a v1 `clf/1`, of
    tests/service/support.py, written once per session. Never modify it."""
    return build_density_repository(tmp_path_factory.mktemp("density_models"))


@pytest.fixture
def repo(tmp_path: Path, model_repository: Path) -> Path:
    """A private copy of the test repository that a test may change (reloads, broken versions)."""
    shutil.copytree(model_repository, tmp_path / "models")
    return tmp_path / "models"


@pytest.fixture
def keyed_server(repo: Path) -> Iterator[Server]:
    """A server of its own over `repo` with an API key (`support.AUTH`), for tests that load,
    unload or break models."""
    with running_server(repo, api_key=API_KEY, max_queue_delay_ms="2") as server:
        yield server
