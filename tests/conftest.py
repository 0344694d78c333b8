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

import fcntl
import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`clf/1` and `reg/1` of tests/service/support.py, written once per session. Never modify it."""
    # imported here: at the top it cost the xdist controller, which runs no test, 1.9 s (scikit-learn,
    # onnx) before it started the workers
    from tests.service.support import build_test_repository

    return build_test_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def density_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dens_clf/1`, `dens_reg/1` (schema 2: density outputs, combined OOD score) and a v1 `clf/1`, of
    tests/service/support.py, written once per session. Never modify it."""
    from tests.service.support import build_density_repository

    return build_density_repository(tmp_path_factory.mktemp("density_models"))


@pytest.fixture
def repo(tmp_path: Path, model_repository: Path) -> Path:
    """A private copy of the test repository that a test may change (reloads, broken versions)."""
    shutil.copytree(model_repository, tmp_path / "models")
    return tmp_path / "models"


# ---- Running in parallel (pytest-xdist, `make test`: -n 4) ------------------------------------------
# Each test file runs whole on one worker, so its module-scoped servers start once. Files that share
# an expensive session fixture run on the same worker, so it is built once.
SHARED_WORKER = {
    # `digits_smoke` (tests/training/conftest.py): one digits --smoke training run
    "tests/training/test_distributed.py": "tests/training/test_pipeline.py",
}
# Files are handed out in collection order with these first, in this order: the training runs and
# then the longest files elsewhere (20-40 s each on the 2-core box), since one of them started last
# would leave the other worker idle at the end (test_workers.py did: 20 s).
FIRST = (
    "tests/training/",
    "tests/deploy/test_image_install.py",
    "tests/service/test_workers.py",
    "tests/reliability/test_fuzz.py",
    "tests/service/test_grpc_server.py",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_WORKER.get(path, path)

    config.option.loadscopereorder = False  # xdist's default: the files with the most tests first
    return ByFile(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker (they collect; every one the same order)
        items.sort(key=_first_rank)  # stable: files stay in order within a rank


def _first_rank(item: pytest.Item) -> int:
    return next((rank for rank, prefix in enumerate(FIRST) if item.nodeid.startswith(prefix)), len(FIRST))


class SerialLock:
    """The worker's side of the `serial` rule: two locks on files of this run's temporary folder."""

    def __init__(self, run: Path) -> None:
        self.gate = (run / "serial.gate").open("a")
        self.lock = (run / "serial.lock").open("a")
        self.exclusive = False  # held exclusively, by a run of serial tests on this worker

    def enter(self, serial: bool) -> None:
        if serial and self.exclusive:
            return  # the serial test before this one kept it
        fcntl.flock(self.gate, fcntl.LOCK_EX if serial else fcntl.LOCK_SH)
        fcntl.flock(self.lock, fcntl.LOCK_EX if serial else fcntl.LOCK_SH)
        if not serial:
            fcntl.flock(self.gate, fcntl.LOCK_UN)
        self.exclusive = serial

    def leave(self, keep: bool) -> None:
        if keep and self.exclusive:
            return
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        fcntl.flock(self.gate, fcntl.LOCK_UN)
        self.exclusive = False


_serial_lock: SerialLock | None = None


def _is_serial(item: pytest.Item | None) -> bool:
    return item is not None and item.get_closest_marker("serial") is not None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
    """Under xdist, a test marked `serial` (it measures capacity or a time budget of the whole
    machine) runs while no other test runs: over its setup (module fixtures included), call and
    teardown it holds a lock exclusively that every other test holds shared. A gate held by the
    waiting serial test keeps new tests from starting meanwhile (else the other workers could keep
    the shared lock held, test after test, until they ran out of work). Serial tests that follow one
    another on a worker (a file's) keep the lock between them: each taking it anew waited again for
    the tests the other workers had started in between (up to a training run's 10 s)."""
    global _serial_lock
    if not hasattr(item.config, "workerinput"):  # one process: every test runs alone anyway
        return (yield)
    if _serial_lock is None:
        _serial_lock = SerialLock(Path(item.config.option.basetemp).parent)  # one folder per run
    serial = _is_serial(item)
    _serial_lock.enter(serial)
    try:
        return (yield)
    finally:
        _serial_lock.leave(keep=serial and _is_serial(nextitem))
