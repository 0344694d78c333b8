"""What a result was measured on: machine, load, versions, date, command, commit."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.provenance import git, versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def busiest_processes(n: int = 5) -> list[str]:
    """The processes using the most CPU right now (other work on a shared machine skews timings)."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [" ".join(line.split()) for line in out.stdout.splitlines()[1 : n + 1]]


def gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def describe(command: str) -> dict[str, Any]:
    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": gpu_name(),
        "os": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "busiest_processes_at_start": busiest_processes(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty_paths": (git("status", "--porcelain", "--", "training", "service", "bench") or "").count(
            "\n"
        )
        + bool(git("status", "--porcelain", "--", "training", "service", "bench")),
        "versions": versions(
            ("onnxruntime", "onnxruntime-gpu", "onnx", "torch", "numpy", "uvicorn", "fastapi")
        ),
        "argv": sys.argv,
    }


def measured_on(meta: dict[str, Any], command: str) -> str:
    """ "`command` on CPU (N cores), date" of a result's `describe` (`command` where it has none)."""
    return (
        f"`{meta.get('command', command)}` on {meta.get('cpu', 'this machine')} "
        f"({meta.get('cores', '?')} cores), {meta.get('date_utc', '')}"
    )


@dataclass(frozen=True)
class Section:
    """A BENCHMARKS.md section of one bench part: its title and the command that makes its result."""

    title: str
    command: str

    def renders(self, body: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any] | None], str]:
        """The section is `body(result)`; while the part has no result yet, its title and the command
        that makes one."""

        def section(result: dict[str, Any] | None) -> str:
            return body(result) if result else f"{self.title}\n\nNot run yet: `{self.command}`."

        return section

    def opening(self, result: dict[str, Any], text: str) -> list[str]:
        """The title and first paragraph: where and how `result` was measured, then `text`."""
        return [self.title, "", measured_on(result.get("machine", {}), self.command) + text, ""]
