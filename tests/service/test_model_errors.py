"""A model run that raises answers 500 ModelRunError to the requests of that batch only; the app
stays ready, and the next batch is served. In process (httpx's ASGI transport): what is under test
is the batcher's and the route's handling of the error, not the socket."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.service.support import CLF_FEATURES, InProcessClient, in_process, write_model


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessClient]:
    repo = tmp_path_factory.mktemp("poisoned")
    write_model(repo, "poison", 1, "classification", poisoned=True)
    with in_process(repo, max_queue_delay_ms=1) as client:
        yield client


def test_failing_model_run_is_a_500_and_the_server_keeps_serving(poisoned: InProcessClient) -> None:
    url = "/v1/models/poison:predict"
    good = [[0.5] * CLF_FEATURES]
    assert poisoned.post(url, json={"instances": good}).status_code == 200
    failed = poisoned.post(url, json={"instances": [[9.0] + [0.5] * (CLF_FEATURES - 1)]})
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error.startswith("model 'poison' failed on a batch of 1 rows") and "Gather" in error, error
    assert poisoned.get("/v2/health/ready").status_code == 200
    assert poisoned.post(url, json={"instances": good * 3}).status_code == 200
