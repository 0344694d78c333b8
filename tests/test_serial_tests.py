"""The `serial` rule of tests/conftest.py under xdist: a test marked `serial` overlaps no other test,
and serial tests that follow one another on a worker keep the machine between them (no other test
starts in between). Checked on a small suite of sleeping tests run with this conftest and -n 3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_BODY = """
import json, os, time
import pytest

def _record(name):
    start = time.monotonic()
    time.sleep(0.15)
    with open(os.environ["SERIAL_LOG"], "a") as log:
        log.write(json.dumps([name, os.environ["PYTEST_XDIST_WORKER"], start, time.monotonic()]) + "\\n")
"""


def _suite(root: Path) -> None:
    shutil.copy(REPO / "tests" / "conftest.py", root / "conftest.py")
    for name in ("plain_a", "plain_b"):
        tests = "".join(f"\ndef test_{i}():\n    _record('{name}::{i}')\n" for i in range(6))
        (root / f"test_{name}.py").write_text(TEST_BODY + tests)
    serial = "".join(
        f"\n@pytest.mark.serial\ndef test_s{i}():\n    _record('serial::{i}')\n" for i in range(3)
    )
    (root / "test_serial.py").write_text(
        TEST_BODY + "\ndef test_before():\n    _record('serial::before')\n" + serial
    )


def test_serial_tests_run_alone_and_back_to_back(tmp_path: Path) -> None:
    root, log = tmp_path / "suite", tmp_path / "log.jsonl"
    root.mkdir()
    _suite(root)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--disable-plugin-autoload", "-p", "no:cacheprovider",
         "-p", "xdist", "-n", "3", "-o", "markers=serial: alone", "--basetemp", str(tmp_path / "base"),
         str(root)],
        cwd=root, env=os.environ | {"SERIAL_LOG": str(log)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(runs) == 16
    serial = sorted(
        (r for r in runs if r[0].startswith("serial::") and r[0] != "serial::before"), key=lambda r: r[2]
    )
    others = [r for r in runs if r not in serial]
    assert len({r[1] for r in runs}) > 1, "the suite ran on one worker: nothing was checked"
    for name, _, start, end in serial:
        overlapping = [o[0] for o in others if o[2] < end and start < o[3]]
        assert not overlapping, f"{name} ran beside {overlapping}"
    # back to back: from the first serial test's start to the last one's end, no other test started
    first, last = serial[0][2], serial[-1][3]
    assert not [o[0] for o in others if first <= o[2] <= last]
