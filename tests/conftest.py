"""Fixtures shared by every test package: the small test model repository and writable copies of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.service.support import build_density_repository, build_test_repository


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
