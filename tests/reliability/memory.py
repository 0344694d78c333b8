"""Resident memory of a server process, from /proc: now, its high-water mark, and sampled over time."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def _status_kib(pid: int, field_name: str) -> int:
    """`field_name` of `pid` plus all its descendants (a `--workers` server is a process tree)."""
    total = 0
    for member in _process_tree(pid):
        try:
            text = Path(f"/proc/{member}/status").read_text()
        except OSError:  # exited meanwhile
            continue
        found = re.search(rf"^{field_name}:\s+(\d+) kB$", text, re.M)
        total += int(found.group(1)) if found else 0
    return total


def _process_tree(root: int) -> list[int]:
    tree, frontier = [root], [root]
    while frontier:
        pid = frontier.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        tree += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return tree


def rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of the processes' resident memory (VmHWM, summed over the tree)."""
    return _status_kib(pid, "VmHWM") * 1024


@dataclass
class RssSampler:
    """Samples the RSS of `pid` every `interval_s` in a thread: `with RssSampler(pid) as s: ...`."""

    pid: int
    interval_s: float = 0.1
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), rss_bytes(self.pid)))
            except (FileNotFoundError, ProcessLookupError):
                return
            self._stop.wait(self.interval_s)

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)
