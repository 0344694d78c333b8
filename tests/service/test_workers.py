"""`--workers 2`: real supervisor and worker processes on one loopback port.

Each connection is traced to the worker process that accepted it (its socket's inode in
/proc/<pid>/fd), so "spread over both workers" is observed, not assumed. Metrics are scraped over
fresh connections (any worker answers) and must count every request exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from service.worker_group import WorkerSpec
from service.workers import available_cores, worker_settings
from tests.service.support import (
    CLF_FEATURES,
    Server,
    build_test_repository,
    held_batches,
    running_server,
    start_server,
    wait_ready,
    write_model,
)

KEY = "workers-admin-key"
CONNECTIONS = 16


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return build_test_repository(tmp_path / "models")


@pytest.fixture(scope="module")
def shared_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository of `two_workers`, which its tests may change (a reload writes clf/2)."""
    return build_test_repository(tmp_path_factory.mktemp("workers") / "models")


@pytest.fixture(scope="module")
def two_workers(shared_repo: Path) -> Iterator[Server]:
    """One two-worker server for the tests below that read it, reload it or kill one of its workers
    (each leaves two ready workers; they count metrics as deltas and ask which clf version serves)."""
    # a replaced version retires (its series go) a second after the swap, not after the default 31 s
    with running_server(shared_repo, workers="2", api_key=KEY, request_read_timeout_s="1") as server:
        yield server


def served_version(server: Server, model: str = "clf") -> frozenset[tuple[str, str]]:
    """The labels {model, version} of the version of `model` that serves now."""
    version = httpx.get(f"{server.url}/v1/models/{model}", headers={"X-API-Key": KEY}, timeout=5).json()[
        "version"
    ]
    return frozenset({("model", model), ("version", str(version))})


def worker_pids(server: Server) -> set[int]:
    """The supervisor's spawned workers (not multiprocessing's resource tracker)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == server.process.pid and b"spawn_main" in cmdline:
            pids.add(int(entry.name))
    return pids


def group_directory(worker: int) -> str:
    """The supervisor's directory, as the worker's environment names it (metrics/ under it)."""
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    (metrics,) = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return os.path.dirname(metrics.decode())


def _server_side_inode(server_port: int, client_port: int) -> int:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port == server_port and remote_port == client_port:
                return int(fields[9])
    raise AssertionError(f"no server-side socket for client port {client_port}")


def serving_pid(server: Server, connection: http.client.HTTPConnection, pids: set[int]) -> int:
    """Which worker process holds the accepted socket of this (connected) client connection."""
    assert connection.sock is not None
    inode = _server_side_inode(int(server.url.rsplit(":", 1)[1]), connection.sock.getsockname()[1])
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError(f"socket {inode} is in no worker {pids}")


def connect(server: Server) -> http.client.HTTPConnection:
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.connect()
    return connection


def request(
    connection: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None
) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", "X-API-Key": KEY}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def scrape(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text  # a fresh connection: any worker
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def predict_body(rows: int, seed: int) -> bytes:
    instances = np.random.default_rng(seed).normal(size=(rows, CLF_FEATURES)).round(4)
    return orjson.dumps({"instances": instances.tolist()})


def test_worker_settings_split_the_cores_for_onnx_runtime() -> None:
    spec = WorkerSpec(0, 2, Path("/tmp"), 8000, 8081)
    split = worker_settings(Settings(workers=2), 2, spec)
    assert split.intra_op_threads == max(1, available_cores() // 2)
    assert (split.port, split.grpc_port) == (8000, 8081)
    assert worker_settings(Settings(workers=2, intra_op_threads=3), 2, spec).intra_op_threads == 3


def test_available_cores_honours_a_cgroup_cpu_limit(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    limit = tmp_path / "cpu.max"
    limit.write_text("max 100000\n")
    assert available_cores(limit) == affinity
    limit.write_text("150000 100000\n")  # 1.5 CPUs: 2 workers' worth, never more than affinity
    assert available_cores(limit) == min(affinity, 2)
    limit.write_text("50000 100000\n")
    assert available_cores(limit) == 1
    assert available_cores(tmp_path / "absent") == affinity


def count(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    labels: frozenset[tuple[str, str]],
) -> float:
    return samples.get((name, labels), 0.0)


def test_requests_spread_over_both_workers_and_metrics_count_each_once(two_workers: Server) -> None:
    route = ("route", "/v1/models/{model_name}:predict")
    ok = frozenset({("protocol", "http"), route, ("method", "POST"), ("code", "200")})
    mv = served_version(two_workers)
    before = scrape(two_workers)
    pids = worker_pids(two_workers)
    assert len(pids) == 2
    served_by: dict[int, int] = dict.fromkeys(pids, 0)
    requests, rows = 0, 0
    for c in range(CONNECTIONS):  # one kept-alive connection each, three requests on it
        connection = connect(two_workers)
        for k in range(3):
            status, _ = request(connection, "POST", "/v1/models/clf:predict", predict_body(1 + k, c * 3 + k))
            assert status == 200
            requests, rows = requests + 1, rows + 1 + k
        served_by[serving_pid(two_workers, connection, pids)] += 3
        connection.close()
    assert all(served_by.values()), served_by  # the kernel spread the connections over both

    for _ in range(4):  # every worker's /metrics shows the same whole
        samples = scrape(two_workers)
        assert (
            count(samples, "hydra_requests_total", ok) - count(before, "hydra_requests_total", ok) == requests
        )
        for name in ("hydra_predictions_total", "hydra_ood_p_value_count", "hydra_batch_size_rows_sum"):
            # hydra_ood_p_value_count: a BatchHistogram, merged over the workers' files
            assert count(samples, name, mv) - count(before, name, mv) == rows, name
        assert samples[("hydra_model_ready", mv)] == 1  # livemin, not summed to 2
        assert samples[("hydra_queue_depth_rows", frozenset({("model", "clf")}))] == 0


def test_a_reload_is_seen_by_every_worker(two_workers: Server, shared_repo: Path) -> None:
    write_model(shared_repo, "clf", 2, "classification", seed=7)
    status, body = request(connect(two_workers), "POST", "/v2/repository/models/clf/load")
    assert status == 200, body
    pids = worker_pids(two_workers)
    versions: dict[int, set[str]] = {pid: set() for pid in pids}
    for c in range(CONNECTIONS):
        connection = connect(two_workers)
        status, body = request(connection, "POST", "/v1/models/clf:predict", predict_body(2, c))
        assert status == 200
        status, meta = request(connection, "GET", "/v1/models/clf")
        versions[serving_pid(two_workers, connection, pids)].add(orjson.loads(meta)["version"])
        connection.close()
    assert all(v == {"2"} for v in versions.values()), versions  # both workers asked, both on 2

    status, _ = request(connect(two_workers), "POST", "/v2/repository/models/reg/unload")
    assert status == 200
    for _ in range(CONNECTIONS):
        status, _ = request(connect(two_workers), "GET", "/v1/models/reg")
        assert status == 404  # unloaded in every worker

    # the retired and unloaded versions' gauges leave the merged exposition, as with one process
    def ready(
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float], model: str, v: str
    ) -> float | None:
        return samples.get(("hydra_model_ready", frozenset({("model", model), ("version", v)})))

    deadline = time.monotonic() + 10
    while ready(samples := scrape(two_workers), "clf", "1") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready(samples, "clf", "1") is None and ready(samples, "reg", "1") is None
    assert ready(samples, "clf", "2") == 1


def test_readiness_is_false_while_a_worker_is_missing_and_a_dead_worker_is_replaced(
    two_workers: Server,
) -> None:
    before = worker_pids(two_workers)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    seen_unready = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{two_workers.url}/v2/health/ready", timeout=2)
        except httpx.TransportError:
            # a connection the kernel had already queued on the dying worker's socket is reset: a
            # crash loses what that worker held (the others keep serving)
            continue
        if response.status_code == 503:
            seen_unready = response.json()
        elif seen_unready is not None:
            break  # ready again: the replacement is up
        time.sleep(0.02)
    assert seen_unready is not None and "not ready" in seen_unready["error"], seen_unready
    assert httpx.get(f"{two_workers.url}/v2/health/ready", timeout=2).status_code == 200
    after = worker_pids(two_workers)
    assert len(after) == 2 and victim not in after and (before - {victim}) <= after
    # the dead worker's gauges are gone (mark_process_dead), the survivor's and the new one's agree
    assert scrape(two_workers)[("hydra_model_ready", served_version(two_workers))] == 1


def test_readiness_waits_for_every_worker_to_start(repo: Path) -> None:
    server = start_server(repo, workers="2")
    try:
        deadline = time.monotonic() + 20
        while len(pids := worker_pids(server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        late = min(pids)
        os.kill(late, signal.SIGSTOP)  # still importing (a start takes seconds): it cannot be ready
        answers: list[int] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and answers.count(503) < 20:  # the other one answers: 503
            with contextlib.suppress(httpx.TransportError):  # not listening yet
                answers.append(httpx.get(f"{server.url}/v2/health/ready", timeout=2).status_code)
            time.sleep(0.05)
        assert answers.count(503) == 20 and 200 not in answers, answers
        os.kill(late, signal.SIGCONT)
        wait_ready(server)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(late, signal.SIGCONT)
        server.terminate()


def test_sigterm_drains_every_worker_and_loses_no_request(repo: Path) -> None:
    # Triton's rule, so the requests wait in the batch queues at the signal
    with running_server(repo, **held_batches(1500), workers="2") as server:
        queued = frozenset({("model", "clf")})

        async def scenario() -> list[httpx.Response]:
            # 40 connections
            clients = [httpx.AsyncClient(base_url=server.url, timeout=20) for _ in range(40)]
            try:
                tasks = [
                    asyncio.create_task(
                        client.post(
                            "/v1/models/clf:predict",
                            content=predict_body(1, i),
                            headers={"Content-Type": "application/json"},
                        )
                    )
                    for i, client in enumerate(clients)
                ]
                depth = ("hydra_queue_depth_rows", queued)
                for _ in range(200):  # queue depth summed over both workers (livesum)
                    if (await asyncio.to_thread(scrape, server)).get(depth) == 40:
                        break
                    await asyncio.sleep(0.01)
                assert scrape(server)[depth] == 40
                server.process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)
            finally:
                for client in clients:
                    await client.aclose()

        responses = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200] * 40
        assert server.process.wait(timeout=20) == 0, server.log()
        assert server.log().count("Application shutdown complete") == 2
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/v2/health/live", timeout=1)


def test_workers_drain_and_exit_when_the_supervisor_is_killed(repo: Path) -> None:
    server = start_server(repo, workers="2")
    wait_ready(server)
    pids = worker_pids(server)
    assert len(pids) == 2
    group = Path(group_directory(min(pids)))
    assert group.is_dir()
    server.process.kill()
    server.process.wait()
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids), "workers outlived their supervisor"
    assert not group.exists()  # the last worker out removed the supervisor's directory
    assert server.log().count("Application shutdown complete") == 2  # drained, not killed


def test_a_start_with_no_loadable_model_exits_3_with_every_worker_gone(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = start_server(empty, workers="2")
    assert server.process.wait(timeout=30) == 3
    assert "no <name>/<version>/ directories found" in server.log()
    assert not worker_pids(server)
    shutil.rmtree(empty)
