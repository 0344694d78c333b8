"""Fixtures of the training tests: the digits `--smoke` run that several modules read."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.__main__ import app

SMOKE_MEMBERS = 3  # what --smoke trains (make_config: min(members, 3))


@pytest.fixture(scope="session")
def digits_smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(package, run dir) of `python -m training run --dataset digits --smoke --seed 0 --members 3`,
    through the real CLI in this process; read-only for the tests that share it."""
    root = tmp_path_factory.mktemp("digits")
    out, run_dir = root / "pkg" / "3", root / "run"
    args = ["run", "--dataset", "digits", "--smoke", "--members", str(SMOKE_MEMBERS), "--seed", "0"]
    args += ["--out", str(out), "--run-dir", str(run_dir), "--device", "cpu"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, run_dir
