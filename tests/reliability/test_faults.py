"""Faults on a real server: hot reloads to broken packages under load, a model run that raises, and
SIGTERM under load.

Reload faults (each under continuous load from 6 clients): a corrupt model.onnx, a manifest with a
schema version this server does not know, and a model whose outputs contain NaN. Each is refused
with a clear 400, counted in `hydra_model_load_failures_total{reason}`, the old version keeps
serving, and no request fails during the attempt ("downtime" = the longest gap between answers).

A run that raises: `fragile` is a real ONNX graph that ORT refuses to run when a batch holds the
poison value; that batch's requests get 500 with the model's error, the other batches in the queue
are answered correctly, and the server stays ready.

SIGTERM: closed-loop load on kept-alive connections; at the signal every request in flight gets its
answer, and the process exits 0. The test prints how many were in flight and how many unanswered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from bench.http_load import Outcome, closed_loop, until_answered
from tests.reliability.checks import is_error_body, metric_value
from tests.reliability.models import (
    POISON_THRESHOLD,
    make_fragile_classifier,
    make_nan_classifier,
    make_nan_off_zero_classifier,
    write_classifier_package,
    write_wrong_schema_manifest,
)
from tests.service.support import (
    API_KEY,
    AUTH,
    CLF_FEATURES,
    ReferenceModel,
    Server,
    running_server,
    start_server,
    wait_ready,
    write_model,
)


def _clf_body(i: int) -> bytes:
    rows = np.random.default_rng(i).normal(0, 1.5, (2, CLF_FEATURES)).round(4)
    return orjson.dumps({"instances": rows.tolist()})


def _corrupt_onnx(repo: Path) -> None:
    write_model(repo, "clf", 2, "classification", seed=42)
    model = repo / "clf" / "2" / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # truncated mid-protobuf


def _wrong_schema(repo: Path) -> None:
    write_model(repo, "clf", 2, "classification", seed=42)
    write_wrong_schema_manifest(repo / "clf" / "2", schema_version=99)


def _nan_outputs(repo: Path) -> None:
    write_classifier_package(repo, "clf", 2, make_nan_classifier(seed=42))


def _nan_off_zero(repo: Path) -> None:
    write_classifier_package(repo, "clf", 2, make_nan_off_zero_classifier(seed=42))


FAULTS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (break version 2, reason label of the failure counter, words the error must contain)
    "corrupt_onnx": (_corrupt_onnx, "onnx", "cannot load model.onnx"),
    "wrong_schema_version": (_wrong_schema, "manifest", "schema_version"),
    "nan_outputs": (_nan_outputs, "warmup", "NaN"),
    "nan_outputs_on_nonzero_inputs_only": (_nan_off_zero, "warmup", "NaN outputs on standard-normal inputs"),
}


@pytest.fixture(scope="module")
def fault_repo(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the test repository shared by the fault tests: each writes its own broken
    version 2 of clf over the last one, and the server keeps serving version 1 throughout."""
    repo = tmp_path_factory.mktemp("faults") / "models"
    shutil.copytree(model_repository, repo)
    return repo


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def fault_server(fault_repo: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """One keyed server per worker count for every fault (each test's reload is refused, so none
    changes what it serves)."""
    # the other worker count's last test left its broken version 2 of clf: start on version 1 alone
    shutil.rmtree(fault_repo / "clf" / "2", ignore_errors=True)
    with running_server(
        fault_repo, api_key=API_KEY, max_queue_delay_ms="2", workers=str(request.param)
    ) as server:
        yield server


@pytest.mark.parametrize("fault", list(FAULTS))
def test_reload_to_a_broken_version_is_refused_while_the_old_one_serves(
    fault: str, fault_server: Server, fault_repo: Path
) -> None:
    breaker, reason, words = FAULTS[fault]
    keyed_server, repo = fault_server, fault_repo
    shutil.rmtree(repo / "clf" / "2", ignore_errors=True)  # the last test's broken version
    url = keyed_server.url
    before = metric_value(url, "hydra_model_load_failures_total", {"model": "clf", "reason": reason})
    breaker(repo)

    async def reload_under_load() -> tuple[httpx.Response, list[Outcome], float, float]:
        stop = asyncio.Event()
        answered: list[Outcome] = []
        load = asyncio.create_task(
            closed_loop(
                url,
                "/v1/models/clf:predict",
                _clf_body,
                concurrency=6,
                duration_s=30,
                headers=AUTH,
                stop=stop,
                outcomes=answered,
            )
        )
        await until_answered(answered, 30)  # the load is running before the reload
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client:
            attempt_start = time.perf_counter()
            refused = await client.post("/v2/repository/models/clf/load")
            attempt_end = time.perf_counter()
        await until_answered(answered, len(answered) + 30)  # ... and still answering after it
        stop.set()
        return refused, await load, attempt_start, attempt_end

    refused, outcomes, attempt_start, attempt_end = asyncio.run(reload_under_load())
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert "model 'clf' version 2" in error and words in error, error
    after = metric_value(url, "hydra_model_load_failures_total", {"model": "clf", "reason": reason})
    assert after == before + 1

    statuses = Counter(o.status for o in outcomes)
    during = [o for o in outcomes if o.finished >= attempt_start and o.started <= attempt_end]
    finishes = sorted(o.finished for o in outcomes if o.status == 200)
    longest_gap = max(b - a for a, b in itertools.pairwise(finishes))
    print(
        "\nRELOAD_FAULT "
        + json.dumps(
            {
                "fault": fault,
                "requests": len(outcomes),
                "during_attempt": len(during),
                "statuses": {str(k): v for k, v in statuses.items()},
                "attempt_s": round(attempt_end - attempt_start, 3),
                "longest_gap_between_answers_ms": round(1000 * longest_gap, 1),
                "error": error[:160],
            }
        )
    )
    assert statuses == {200: len(outcomes)} and during, statuses
    reference = ReferenceModel(repo / "clf" / "1")
    for o in outcomes[::25]:
        answer = orjson.loads(o.body)
        assert answer["model_version"] == "1"
        rows = np.asarray(orjson.loads(_clf_body(o.index))["instances"], dtype=np.float32)
        got = np.asarray([p["probabilities"] for p in answer["predictions"]])
        np.testing.assert_allclose(got, reference.answer(rows)["probabilities"], rtol=2e-5, atol=1e-6)
    index = httpx.get(f"{url}/v2/repository/index", headers=AUTH).json()
    assert {"name": "clf", "version": "1", "state": "READY", "reason": ""} in index


@pytest.fixture(scope="module")
def fragile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("fragile")
    write_classifier_package(root, "fragile", 1, make_fragile_classifier(seed=0))
    # batches of at most 4 rows that wait 300 ms to fill: one burst becomes several queued batches
    with running_server(root, max_batch_size="4", max_queue_delay_ms="300", run_when_idle="false") as server:
        yield server, root / "fragile" / "1"


def test_a_model_run_that_raises_fails_only_its_batch(fragile_server: tuple[Server, Path]) -> None:
    server, directory = fragile_server
    rng = np.random.default_rng(11)
    rows = rng.normal(0, 1.5, (12, CLF_FEATURES)).round(4).astype(np.float32)
    poisoned = 5
    rows[poisoned, 3] = 10 * POISON_THRESHOLD  # finite: passes validation, fails inside ORT

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            tasks = []
            for row in rows:  # in order, so the batches are [0-3], [4-7], [8-11]
                tasks.append(
                    asyncio.create_task(
                        client.post("/v1/models/fragile:predict", json={"instances": [row.tolist()]})
                    )
                )
                await asyncio.sleep(0.01)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(burst())
    failed = [i for i, r in enumerate(responses) if r.status_code != 200]
    assert poisoned in failed and len(failed) <= 4, [(i, r.status_code) for i, r in enumerate(responses)]
    for i in failed:
        response = responses[i]
        assert response.status_code == 500 and is_error_body(response.content)
        error = response.json()["error"]
        assert "model 'fragile' failed on a batch of" in error and "Gather" in error, error
    reference = ReferenceModel(directory)
    ok = [i for i in range(len(rows)) if i not in failed]
    assert len(ok) >= 8
    expected = reference.answer(rows[ok])["probabilities"]
    got = np.asarray([responses[i].json()["predictions"][0]["probabilities"] for i in ok])
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)
    # the server stays up and healthy, and the same model keeps answering
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    again = httpx.post(
        f"{server.url}/v1/models/fragile:predict", json={"instances": rows[:2].tolist()}, timeout=10
    )
    assert again.status_code == 200
    print(
        "\nRUN_FAULT "
        + json.dumps({"requests": len(rows), "failed_500": len(failed), "answered_200": len(ok)})
    )


@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
def test_sigterm_under_load_answers_every_request_in_flight(model_repository: Path, workers: int) -> None:
    # batches wait up to 50 ms, so at the signal many requests sit in the batch queue
    server = start_server(
        model_repository, "--max-queue-delay-ms", "50", "--max-batch-size", "64", workers=str(workers)
    )
    wait_ready(server)
    signalled: list[float] = []

    async def scenario() -> list[Outcome]:
        stop = asyncio.Event()
        answered: list[Outcome] = []
        load = asyncio.create_task(
            closed_loop(
                server.url,
                "/v1/models/clf:predict",
                _clf_body,
                concurrency=48,
                duration_s=30,
                stop=stop,
                outcomes=answered,
            )
        )
        await until_answered(answered, 2 * 48)  # every worker has been answered: the load is on
        stop.set()  # no new requests after the signal: every later failure would be a lost request
        signalled.append(time.perf_counter())
        server.process.send_signal(signal.SIGTERM)
        return await load

    outcomes = asyncio.run(scenario())
    exit_status = server.process.wait(timeout=30)
    exited = time.perf_counter()
    at_signal = signalled[0]
    in_flight = [o for o in outcomes if o.started <= at_signal < o.finished]
    unanswered = [o for o in outcomes if o.status != 200]
    print(
        "\nSIGTERM "
        + json.dumps(
            {
                "workers": workers,
                "requests": len(outcomes),
                "in_flight_at_signal": len(in_flight),
                "unanswered": len(unanswered),
                "exit_status": exit_status,
                "exit_after_signal_s": round(exited - at_signal, 3),
            }
        )
    )
    assert exit_status == 0, server.log()
    assert not unanswered, [(o.status, o.error) for o in unanswered[:5]]
    assert len(in_flight) >= 24  # the signal really came under load
