"""Process lifecycle: SIGTERM under load answers every accepted request and exits 0; a start with no
loadable model exits non-zero naming the problem."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.support import CLF_FEATURES, held_batches, running_server, start_server, write_model


def test_sigterm_under_load_answers_every_accepted_request_then_exits_0(model_repository: Path) -> None:
    with running_server(model_repository, **held_batches(1500)) as server:

        async def scenario() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=60)
            async with httpx.AsyncClient(base_url=server.url, timeout=20, limits=limits) as client:
                rows = np.random.default_rng(3).normal(size=(40, CLF_FEATURES))
                tasks = [
                    asyncio.create_task(
                        client.post("/v1/models/clf:predict", json={"instances": [row.tolist()]})
                    )
                    for row in rows
                ]
                # SIGTERM once all 40 wait in the batch queue (the batch runs 1.5 s after the first arrived)
                for _ in range(100):
                    meta = (await client.get("/v1/models/clf")).json()
                    if meta["batching"]["queued_requests"] == 40:
                        break
                    await asyncio.sleep(0.01)
                assert meta["batching"]["queued_requests"] == 40 and meta["batching"]["rows"] == 0
                server.process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        responses = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200] * 40
        assert server.process.wait(timeout=20) == 0, server.log()
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(f"{server.url}/v2/health/live", timeout=1)


def _exit_status_and_log(repo: Path) -> tuple[int, str]:
    server = start_server(repo)
    status = server.process.wait(timeout=30)
    return status, server.log()


def test_empty_repository_exits_nonzero_naming_the_problem(tmp_path: Path) -> None:
    status, log = _exit_status_and_log(tmp_path)
    assert status != 0
    assert "no loadable model" in log and str(tmp_path) in log


def test_repository_of_only_broken_models_exits_nonzero_naming_each(
    tmp_path: Path, model_repository: Path
) -> None:
    shutil.copytree(model_repository / "clf", tmp_path / "clf")
    (tmp_path / "clf" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    write_model(tmp_path, "reg", 1, "regression")
    manifest = tmp_path / "reg" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"heads": 4', '"heads": 0'))
    status, log = _exit_status_and_log(tmp_path)
    assert status != 0
    assert "model 'clf' version 1" in log and "cannot load model.onnx" in log
    assert "model 'reg' version 1: invalid manifest: heads" in log


def test_missing_repository_exits_nonzero(tmp_path: Path) -> None:
    status, log = _exit_status_and_log(tmp_path / "nowhere")
    assert status != 0 and "is not a directory" in log
