"""One worker's view of its siblings (`--workers N`), through a directory the supervisor made.

Each worker is a whole server (its own repository, batchers, ORT sessions, gRPC server) on the
shared port; what they must agree on goes through the group directory (`service.workers` makes it,
and removes it at exit):

- `metrics/`: `PROMETHEUS_MULTIPROC_DIR`, every worker's metric files (`service.metrics.multiprocess`);
- `ready/<index>`: exists while worker `<index>` serves; written when its start-up is complete,
  removed when its drain begins, and by the supervisor when the process dies. The server is ready
  (`/v2/health/ready`, gRPC ServerReady) only while all N exist: one stat per worker and probe;
- `repository.log`: one JSON line per model load or unload a client asked of one worker; every
  other worker follows the log (polled every `FOLLOW_INTERVAL_S`) and does the same, so a reload is
  seen by all. The worker that took the request answers once every ready worker has applied it
  (`applied/<index>`: the log offset worker `<index>` has reached), so after a 200 no worker serves
  the old version to new requests. A worker that starts later (a restart) applies the unloads in
  the log after loading the repository, then follows from the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson

logger = logging.getLogger(__name__)

FOLLOW_INTERVAL_S = 0.05
# How long the worker that took a load/unload waits for the others before it answers anyway
# (a load reads, builds and warms a model: seconds for a large one).
ANNOUNCE_TIMEOUT_S = 120.0

RepositoryOp = Literal["load", "unload"]


class FollowingRepository(Protocol):
    """What the log follower needs of `service.repository.ModelRepository`."""

    async def apply(self, op: RepositoryOp, name: str) -> None: ...


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor hands worker `index` of `count` (pickled into the spawned process)."""

    index: int
    count: int
    directory: Path
    port: int
    grpc_port: int

    @property
    def metrics_dir(self) -> Path:
        return self.directory / "metrics"


def prepare_directory(directory: Path) -> None:
    """The group directory's layout (made by the supervisor before any worker starts)."""
    for sub in ("metrics", "ready", "applied"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    (directory / "repository.log").touch()


def ready_marker(directory: Path, index: int) -> Path:
    return directory / "ready" / str(index)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


class WorkerGroup:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self._log = spec.directory / "repository.log"
        self._offset = 0  # log bytes this worker has applied
        self._follower: asyncio.Task[None] | None = None

    @property
    def metrics_dir(self) -> Path:
        return self.spec.metrics_dir

    # ---- readiness ---------------------------------------------------------------------------------
    def mark_ready(self) -> None:
        _write_atomically(ready_marker(self.spec.directory, self.spec.index), str(os.getpid()))

    def mark_unready(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            ready_marker(self.spec.directory, self.spec.index).unlink()

    def not_ready(self) -> list[int]:
        """Indices of the workers not ready now (empty: every worker serves)."""
        return [i for i in range(self.spec.count) if not ready_marker(self.spec.directory, i).exists()]

    # ---- repository changes ------------------------------------------------------------------------
    async def join(self, repository: FollowingRepository) -> None:
        """After this worker's repository has started: catch up with the log, follow it, be ready."""
        entries, self._offset = self._read_from(0)
        unloaded = {e["name"]: e["op"] for e in entries}  # the last operation on each name wins
        for name, op in unloaded.items():
            if op == "unload":
                await self._apply(repository, op, name)
        self._write_applied()
        self._follower = asyncio.create_task(self._follow(repository), name="repository-log")
        self.mark_ready()

    async def leave(self) -> None:
        self.mark_unready()
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower

    async def announce(self, op: RepositoryOp, name: str) -> None:
        """Tell every other worker to do what this one just did; return once every ready one has."""
        line = orjson.dumps({"op": op, "name": name, "worker": self.spec.index}) + b"\n"
        with self._log.open("ab") as log:
            fcntl.flock(log, fcntl.LOCK_EX)  # one whole line per writer, and its end offset known
            try:
                log.write(line)
                log.flush()
                end = log.tell()
            finally:
                fcntl.flock(log, fcntl.LOCK_UN)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ANNOUNCE_TIMEOUT_S
        while True:
            behind = [i for i in self._ready_peers() if self._applied(i) < end]
            if not behind:
                return
            if loop.time() > deadline:
                logger.warning("%s of %r: workers %s have not applied it yet; answering", op, name, behind)
                return
            await asyncio.sleep(FOLLOW_INTERVAL_S / 2)

    def _ready_peers(self) -> list[int]:
        return [
            i
            for i in range(self.spec.count)
            if i != self.spec.index and ready_marker(self.spec.directory, i).exists()
        ]

    def _applied(self, index: int) -> int:
        try:
            return int((self.spec.directory / "applied" / str(index)).read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _write_applied(self) -> None:
        _write_atomically(self.spec.directory / "applied" / str(self.spec.index), str(self._offset))

    def _read_from(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        with self._log.open("rb") as log:
            log.seek(offset)
            data = log.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        entries = [orjson.loads(line) for line in complete.splitlines() if line.strip()]
        return entries, offset + len(complete)

    async def _follow(self, repository: FollowingRepository) -> None:
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL_S)
            try:
                size = self._log.stat().st_size
            except FileNotFoundError:  # the server is going away (its directory removed)
                logger.warning("worker %d: group directory gone; reloads not followed", self.spec.index)
                return
            if size <= self._offset:
                continue
            entries, offset = self._read_from(self._offset)
            for entry in entries:
                if entry["worker"] != self.spec.index:
                    await self._apply(repository, entry["op"], entry["name"])
            self._offset = offset
            self._write_applied()

    async def _apply(self, repository: FollowingRepository, op: RepositoryOp, name: str) -> None:
        try:
            await repository.apply(op, name)
        except Exception as exc:  # the old version (or none) keeps serving here, as on the origin
            logger.error("worker %d: %s of %r from another worker failed: %s", self.spec.index, op, name, exc)
