"""bench/offline_prep.py: the requirement list, the pip command, and split/join with checksums."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.offline_prep import join, pip_download_command, requirements, split


def test_requirements_swap_onnxruntime_for_the_gpu_pin() -> None:
    reqs = requirements()
    assert not [r for r in reqs if r.startswith("onnxruntime") and not r.startswith("onnxruntime-gpu")]
    assert any(r.startswith("onnxruntime-gpu>=") and "<" in r for r in reqs)
    assert any(r.startswith("fastapi") for r in reqs) and any(r.startswith("onnx>=") for r in reqs)
    command = pip_download_command(Path("wh"), reqs)
    assert command[command.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in command
    assert command[command.index("--abi") + 1] == "cp312"


def test_split_and_join_round_trip_with_checksums(tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    wheel = wheelhouse / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    payload = os.urandom(2500)
    wheel.write_bytes(payload)
    entry = split(wheel, limit=1024)
    assert not wheel.exists()
    parts = entry["parts"]
    assert isinstance(parts, list) and [p["size"] for p in parts] == [1024, 1024, 452]
    assert all((wheelhouse / p["name"]).stat().st_size <= 1024 for p in parts)
    (tmp_path / "parts.json").write_text(json.dumps({"wheelhouse": "wheelhouse", "files": [entry]}))
    assert join(tmp_path) == [wheel] and wheel.read_bytes() == payload
    damaged = wheelhouse / parts[1]["name"]
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    with pytest.raises(SystemExit, match="checksum mismatch"):
        join(tmp_path)
