"""A model run that raises answers 500 ModelRunError to the requests of that batch only; the server
stays up and ready, and the next batch is served."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.service.support import CLF_FEATURES, Server, running_server, write_model


@pytest.fixture(scope="module")
def poisoned_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("poisoned")
    write_model(repo, "poison", 1, "classification", poisoned=True)
    with running_server(repo, max_queue_delay_ms="1") as server:
        yield server


def test_failing_model_run_is_a_500_and_the_server_keeps_serving(poisoned_server: Server) -> None:
    url = f"{poisoned_server.url}/v1/models/poison:predict"
    good = [[0.5] * CLF_FEATURES]
    assert httpx.post(url, json={"instances": good}).status_code == 200
    failed = httpx.post(url, json={"instances": [[9.0] + [0.5] * (CLF_FEATURES - 1)]})
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error.startswith("model 'poison' failed on a batch of 1 rows") and "Gather" in error, error
    assert httpx.get(f"{poisoned_server.url}/v2/health/ready").status_code == 200
    assert httpx.post(url, json={"instances": good * 3}).status_code == 200
    assert poisoned_server.process.poll() is None
