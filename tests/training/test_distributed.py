"""`torchrun --nproc-per-node 2 -m training run` (gloo, CPU) against the same run in one process.

The torchrun run is a real CLI run in a subprocess (the smoke config, 3 members: rank 0 trains
members 0 and 2, rank 1 member 1); the single-process run is the same command through the CLI in
this process, shared with test_pipeline.py (`digits_smoke`, tests/training/conftest.py). The tests
compare what they wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.manifest import ModelManifest
from tests.training.conftest import SMOKE_MEMBERS
from training.config import DataConfig
from training.data import load_data
from training.distributed import gather_members, local_batch_size, rank_members, shard, shard_of
from training.teachers import MemberResult

REPO = Path(__file__).resolve().parents[2]
MEMBERS = SMOKE_MEMBERS


def _launch(root: Path, launcher: list[str]) -> tuple[subprocess.Popen[str], Path, Path]:
    out, run_dir = root / "pkg" / "1", root / "run"
    (root / "tmp").mkdir(parents=True)  # torchrun's rendezvous folders land there, not in /tmp
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(root / "tmp")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # the single-process run must not see a launcher's environment
    args = ["run", "--dataset", "digits", "--smoke", "--members", str(MEMBERS), "--seed", "0"]
    args += ["--device", "cpu", "--out", str(out), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(
        [*launcher, "-m", "training", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, out, run_dir


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict[str, tuple[Path, Path]]:
    """{"one": (package, run dir), "two": (package, run dir)}: 1 process and 2 torchrun ranks."""
    root = tmp_path_factory.mktemp("distributed")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc, out, run_dir = _launch(root / "two", torchrun)
    # the single-process run meanwhile, here (or already made by test_pipeline.py)
    one: tuple[Path, Path] = request.getfixturevalue("digits_smoke")
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    assert proc.returncode == 0, f"two-process run failed:\n{output[-4000:]}"
    return {"one": one, "two": (out, run_dir)}


def _checkpoint(run_dir: Path, name: str) -> dict[str, object]:
    loaded: dict[str, object] = torch.load(run_dir / name, weights_only=True)
    return loaded


def test_two_ranks_train_the_same_ensemble_as_one_process(runs: dict[str, tuple[Path, Path]]) -> None:
    one, two = _checkpoint(runs["one"][1], "teachers.pt"), _checkpoint(runs["two"][1], "teachers.pt")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["summary"] == two["summary"]  # per-member metadata, gathered in member order
    states_one, states_two = one["states"], two["states"]
    assert isinstance(states_one, list) and isinstance(states_two, list)
    assert len(states_one) == len(states_two) == MEMBERS
    for a, b in zip(states_one, states_two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    # and the exported ensemble graphs answer the same
    x = load_data(DataConfig(dataset="digits")).test.x[:32]
    outputs = [
        ort.InferenceSession(str(runs[k][0] / "ensemble.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"input": x}
        )[0]
        for k in ("one", "two")
    ]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=0, atol=1e-6)


def test_two_rank_distilled_package_is_valid(runs: dict[str, tuple[Path, Path]]) -> None:
    out, run_dir = runs["two"]
    assert _checkpoint(run_dir, "distil.pt")["world_size"] == 2
    manifest = ModelManifest.load(out)
    assert manifest.heads == MEMBERS and manifest.provenance.model_dump()["teacher_members"] == MEMBERS
    parity = json.loads((run_dir / "export.json").read_text())
    assert set(parity) == {"model.onnx", "ensemble.onnx", "kd.onnx"}
    assert all(v <= 1e-4 for info in parity.values() for v in info["max_abs_diff"].values())
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"ensemble", "kd", "hydra"}
    x = load_data(DataConfig(dataset="digits")).test.x[:16]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    log_probs, density, typicality, unseen = session.run(None, {"input": x})  # digits: integer pixels
    assert unseen.shape == (len(x),) and np.all(unseen >= 0)
    assert typicality.shape == (len(x),) and np.all(typicality >= 0)
    assert density.shape == (len(x),) and np.all(density >= 0)
    assert log_probs.shape == (16, MEMBERS, 10)
    np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, atol=1e-5)


def test_ddp_distillation_stays_close_to_one_process(runs: dict[str, tuple[Path, Path]]) -> None:
    # Same global batches (the smoke transfer set and batch divide evenly over 2 ranks), so DDP
    # differs from one process only by float reduction order: the students agree closely.
    x = load_data(DataConfig(dataset="digits")).test.x
    outputs = [
        ort.InferenceSession(str(runs[k][0] / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"input": x}
        )[0]
        for k in ("one", "two")
    ]
    np.testing.assert_allclose(np.exp(outputs[1]), np.exp(outputs[0]), rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    ("rows", "world", "batch"), [(10, 2, 4), (11, 3, 4), (7, 4, 2), (5, 1, 3), (2, 4, 1)]
)
def test_shards_recompose_the_single_process_batches(rows: int, world: int, batch: int) -> None:
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(rows))
    shards = [shard_of(perm, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal step counts on every rank
    assert set(torch.cat(shards).tolist()) == set(perm.tolist())  # every row seen
    padded = perm.repeat(world)[: len(shards[0]) * world]
    for k in range(0, len(shards[0]), batch):
        together = torch.stack([s[k : k + batch] for s in shards], dim=1).flatten()
        assert torch.equal(together, padded[k * world : (k + batch) * world])


def test_without_a_process_group_everything_is_one_process() -> None:
    perm = torch.arange(9)
    assert torch.equal(shard(perm), perm) and local_batch_size(128) == 128
    assert list(rank_members(5)) == [0, 1, 2, 3, 4]
    mine = [MemberResult(i, i, {}, 0, 0.0, 1) for i in (2, 0, 1)]
    assert [r.index for r in gather_members(mine)] == [0, 1, 2]
