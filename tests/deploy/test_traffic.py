"""bench/traffic.py against a real server: a clean phase then an OOD phase, summarised per phase."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.support import REPO_ROOT
from tests.service.support import build_test_repository, running_server

pytestmark = pytest.mark.timeout(90)
TRAFFIC = REPO_ROOT / "bench" / "traffic.py"


def traffic(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TRAFFIC), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_traffic_moves_the_flag_rate(tmp_path: Path) -> None:
    repository = build_test_repository(tmp_path / "models")
    with running_server(repository) as server:
        result = traffic(
            "--url", server.url, "--model", "clf", "--id-source", "gaussian", "--ood-kind", "shift",
            "--rate", "40", "--rows-per-request", "8", "--schedule", "0:1,1:1",
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    flagged = [float(re.search(r"flagged=([\d.]+)", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert flagged[0] < 0.2 and flagged[1] > 0.5, lines
    for line in lines:
        codes = re.search(r"requests (.*?)  rows", line).group(1).split()  # type: ignore[union-attr]
        assert all(code.startswith("200:") for code in codes), line
    assert "ood sent 0)" in lines[0]


def test_traffic_refuses_unbounded_schedules() -> None:
    result = traffic("--schedule", "0:4000")
    assert result.returncode != 0
    assert "longer than" in result.stdout + result.stderr
