"""`--workers N`: N server processes on one port, started and supervised by the process that was run.

Why processes: one server process runs its HTTP parsing, validation and answer encoding on one event
loop, which holds the GIL; with N processes the kernel spreads connections over N loops. Each worker
is a whole server (`create_app` with its own repository, batchers and ONNX Runtime sessions, and its
own gRPC server), so nothing on the request path is shared.

- Ports: every worker binds its own listening socket with SO_REUSEPORT (the kernel hashes each new
  connection to one of them: an even spread, and one worker's backlog never waits on another's
  loop); gRPC likewise. The supervisor first binds (without listening) a socket of its own on each
  port, with SO_REUSEPORT too: that fixes the port when 0 asked for a free one, and keeps the port
  the server's while a worker restarts. Only listening sockets receive connections.
- ONNX Runtime threads: with `intra_op_threads` 0 (ORT's default, one thread per core in every
  session), each worker gets cores / N threads, so N workers do not oversubscribe the cores.
- Metrics: `PROMETHEUS_MULTIPROC_DIR` in the group directory (`service.worker_group`), set before any
  worker starts; /metrics from any worker shows all of them (`service.metrics.multiprocess`). When a
  worker exits its live gauges are dropped (`mark_process_dead`); its counters stay counted.
- Readiness, reloads: `service.worker_group` (ready only while every worker is; a load or unload on
  one worker is done by all before it is answered).
- A worker that dies is started again (its readiness marker goes first, so the server reports not
  ready until the new one is up); a worker that fails its first start (no loadable model: exit 3)
  stops the server with that status, as one process would.
- SIGTERM or SIGINT to the supervisor: SIGTERM to every worker, each drains its in-flight requests as
  one process does (`service.__main__.DrainingServer`); exit 0 once all have exited 0. Workers run in
  a process group of their own (a terminal's Ctrl-C reaches only the supervisor, which relays it
  once) and drain if the supervisor dies.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from service.metrics.multiprocess import ENV_VAR
from service.settings import Settings
from service.worker_group import WorkerGroup, WorkerSpec, prepare_directory, ready_marker

logger = logging.getLogger("service.workers")

START_FAILED = 3  # a worker's exit status when its lifespan start-up failed (service.__main__)
RESTART_BACKOFF_S = 1.0  # least time between two starts of the same worker
POLL_S = 0.2
PARENT_CHECK_S = 0.5


def available_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity (a cpuset), capped by a cgroup v2 CPU quota (a
    container's CPU limit, which affinity does not show: a pod limited to 2 CPUs sees every core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError):
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return cores


def worker_count(settings: Settings) -> int:
    return settings.workers if settings.workers > 0 else available_cores()


def worker_settings(settings: Settings, count: int, spec: WorkerSpec) -> Settings:
    """One worker's settings: the ports the supervisor reserved, and its share of the cores for ORT."""
    update: dict[str, object] = {"port": spec.port, "grpc_port": spec.grpc_port}
    if settings.intra_op_threads == 0:
        update["intra_op_threads"] = max(1, available_cores() // count)
    return settings.model_copy(update=update)


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not listening yet."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port} ({exc})") from exc
    return sock


def _drain_when_orphaned(parent: int) -> None:
    """SIGTERM this worker (a drain, as from the supervisor) once the supervisor is gone, even
    killed with SIGKILL, so no worker outlives the server that started it."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def run_worker(settings: Settings, spec: WorkerSpec, parent: int) -> None:
    """A worker process's body: one whole server on the shared ports (target of the spawned process)."""
    os.setpgrp()
    _drain_when_orphaned(parent)
    from service.__main__ import configure_logging, serve  # after the spawn, not at import
    from service.app import create_app

    configure_logging(settings)
    sock = shared_port_socket(settings.host, spec.port)
    app = create_app(settings, worker_group=WorkerGroup(spec))
    logger.info("worker %d of %d (pid %d) starting", spec.index, spec.count, os.getpid())
    try:
        sys.exit(serve(app, settings, sockets=[sock]))  # (a drained SIGTERM exits from inside it)
    finally:
        if os.getppid() != parent:  # the supervisor was killed: nobody else will remove the directory
            shutil.rmtree(spec.directory, ignore_errors=True)


class Supervisor:
    """Starts `count` workers, restarts the ones that die, relays SIGTERM, and cleans up after them."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.directory = Path(tempfile.mkdtemp(prefix="hydra-workers-"))
        self._context = multiprocessing.get_context("spawn")  # no state of this process in a worker
        self._workers: dict[int, BaseProcess] = {}
        self._ever_ready: set[int] = set()
        self._started_at: dict[int, float] = {}
        self._stopping = False
        self._specs: dict[int, WorkerSpec] = {}

    def run(self) -> int:
        try:
            return self._run()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self) -> int:
        prepare_directory(self.directory)
        # inherited by every spawned worker; read when a worker first imports prometheus_client
        os.environ[ENV_VAR] = str(self.directory / "metrics")
        with contextlib.ExitStack() as reserved:
            http = reserved.enter_context(shared_port_socket(self.settings.host, self.settings.port))
            port = http.getsockname()[1]
            grpc_port = 0
            if self.settings.grpc_port:
                grpc = reserved.enter_context(shared_port_socket(self.settings.host, self.settings.grpc_port))
                grpc_port = grpc.getsockname()[1]
            for index in range(self.count):
                spec = WorkerSpec(index, self.count, self.directory, port, grpc_port)
                self._specs[index] = spec
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            logger.info(
                "%d workers on %s:%d (gRPC %s), ORT intra-op threads per worker: %s",
                self.count,
                self.settings.host,
                port,
                grpc_port or "off",
                worker_settings(self.settings, self.count, self._specs[0]).intra_op_threads,
            )
            for index in range(self.count):
                self._start(index)
            return self._supervise()

    def _start(self, index: int) -> None:
        spec = self._specs[index]
        process = self._context.Process(
            target=run_worker,
            args=(worker_settings(self.settings, self.count, spec), spec, os.getpid()),
            name=f"hydra-worker-{index}",
        )
        process.start()
        self._workers[index] = process
        self._started_at[index] = time.monotonic()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._stopping:
            logger.info("signal %d: draining %d workers", signum, len(self._workers))
        self._stopping = True
        for process in self._workers.values():
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def _supervise(self) -> int:
        status = 0
        stop_deadline: float | None = None
        while self._workers:
            wait([p.sentinel for p in self._workers.values()], timeout=POLL_S)
            for index, process in list(self._workers.items()):
                if process.exitcode is None:
                    if ready_marker(self.directory, index).exists():
                        self._ever_ready.add(index)
                    continue
                self._reap(index, process)
                code = process.exitcode
                if self._stopping:
                    status = status or (0 if code in (0, -signal.SIGTERM) else 1)
                    continue
                if code == START_FAILED and index not in self._ever_ready:
                    logger.critical("worker %d could not start (exit %d): stopping the server", index, code)
                    self._on_signal(signal.SIGTERM, None)
                    status = START_FAILED
                    continue
                logger.error("worker %d (pid %s) exited with %s: starting it again", index, process.pid, code)
                time.sleep(max(0.0, self._started_at[index] + RESTART_BACKOFF_S - time.monotonic()))
                if not self._stopping:  # (a signal may have come during the pause)
                    self._start(index)
            if self._stopping:
                now = time.monotonic()
                stop_deadline = stop_deadline or now + self.settings.shutdown_timeout_s + 10.0
                if now > stop_deadline:  # a worker that will not drain: the orchestrator would kill it too
                    for process in self._workers.values():
                        process.kill()
        return status

    def _reap(self, index: int, process: BaseProcess) -> None:
        del self._workers[index]
        process.join()
        marker = ready_marker(self.directory, index)
        with contextlib.suppress(FileNotFoundError, ValueError):
            if int(marker.read_text()) == process.pid:  # not a newer worker's marker
                marker.unlink()
        mark_process_dead(process.pid, str(self.directory / "metrics"))  # type: ignore[no-untyped-call]
