"""Where a result came from: the repository's commit and the installed versions of what made it.

Standard library only: bench/machine.py describes benchmark machines with it, where no training
dependency need be installed.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str | None:
    """`git ARGS` in this repository, stripped; None outside a checkout or without git."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions(distributions: Iterable[str]) -> dict[str, str]:
    """Python's version and that of each installed distribution among `distributions`."""
    found = {"python": platform.python_version()}
    for dist in distributions:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found
