"""Fixtures: a test model repository and a real server process serving it (shared per module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.support import Server, running_server, server_fixture


@pytest.fixture
def anyio_backend() -> str:
    """In-process async tests (anyio's pytest plugin) run on asyncio, like the server."""
    return "asyncio"


@pytest.fixture(scope="module")
def server(model_repository: Path) -> Iterator[Server]:
    """A server with default settings over `model_repository`, shared by a test module."""
    with running_server(model_repository) as running:
        yield running


@pytest.fixture(scope="module")
def base_url(server: Server) -> str:
    return server.url


slow_queue_server = server_fixture(
    """Every partial batch waits 1.5 s to fill (Triton's rule: also while the model is idle) and
    two requests fill the queue: easy to fill, easy to expire (test_queueing, test_admission).
    Past the queue a request is refused at once (admission_wait_s 0), never waits for a turn.""",
    scope="session",
    max_batch_size="64",
    max_queue_delay_ms="1500",
    max_queue_size="2",
    run_when_idle="false",
    admission_wait_s="0",
)
