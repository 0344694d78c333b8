"""bench/load.py stays runnable: a tiny bounded run against the test repository, batching on and off."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.service.support import REPO_ROOT


def test_load_script_reports_both_configurations(model_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    subprocess.run(
        [sys.executable, "-m", "bench.load", "--repository", str(model_repository), "--model", "clf",
         "--requests", "60", "--concurrency", "8", "--rows", "2", "--json", str(out)],
        cwd=REPO_ROOT, check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    results = {r["config"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"batching on", "batching off"}
    for r in results.values():
        assert r["errors"] == 0 and r["rows_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"]
    assert results["batching off"]["mean_batch_rows"] == 1.0
