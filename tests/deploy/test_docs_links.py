"""Every relative link in README.md and docs/*.md points to a file that exists, and every `#anchor`
to a heading of its target, slugged as GitHub does (lowercase; punctuation other than '-' and '_'
dropped; spaces to '-'; a repeated heading gets -1, -2, ...). Code blocks and inline code are not
links."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.service.support import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+).*?\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_' (unicode too, as GitHub)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in _prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", path.read_text()))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in _prose_lines(path):
        prose = INLINE_CODE.sub("", line)
        found += [(number, target) for target in LINK.findall(prose)]
        reference = REFERENCE.match(prose)
        if reference:
            found.append((number, reference.group(1)))
    return found


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(REPO_ROOT)}:{number}: {target}"
        destination = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{where}: no file {os.path.relpath(destination, REPO_ROOT)}")
            continue
        if anchor and destination.suffix == ".md" and unquote(anchor).lower() not in anchors(destination):
            problems.append(f"{where}: no heading #{anchor} in {os.path.relpath(destination, REPO_ROOT)}")
    return problems


def test_the_docs_are_there() -> None:
    assert len(DOCS) >= 5, DOCS
    assert sum(len(links(path)) for path in DOCS) > 20  # the parser finds the links


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(REPO_ROOT)) for p in DOCS])
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_slugs_follow_github() -> None:
    assert github_slug("1b. Datasets nobody tuned on: tuning, confirmation and fresh suites") == (
        "1b-datasets-nobody-tuned-on-tuning-confirmation-and-fresh-suites"
    )
    assert (
        github_slug("The OOD flag: what the ensemble cannot see")
        == "the-ood-flag-what-the-ensemble-cannot-see"
    )
    assert github_slug("`GET /` and `/v2/health/live`") == "get--and-v2healthlive"
    assert github_slug("snake_case & more") == "snake_case--more"
