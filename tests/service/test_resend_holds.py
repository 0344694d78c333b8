"""service/admission.py `ResendHolds`: which connection's resend waits, how long, and its memory."""

from __future__ import annotations

import pytest

from service.admission import ResendHolds

A, B = ("10.0.0.1", 50_001), ("10.0.0.1", 50_002)  # two connections of one proxy


def test_a_hold_is_per_connection_and_model_capped_and_used_once() -> None:
    holds = ResendHolds(max_hold_s=4.0)
    holds.refused(A, "clf", retry_after_s=2, now=100.0)
    assert holds.remaining_s(B, "clf", 100.5) == 0.0  # another connection of the same client host
    assert holds.remaining_s(A, "reg", 100.5) == 0.0  # another model on this connection
    assert holds.remaining_s(A, "clf", 100.5) == pytest.approx(1.5)
    assert holds.remaining_s(A, "clf", 100.6) == 0.0  # used: the next refusal sets a new one
    holds.refused(A, "clf", retry_after_s=60, now=200.0)
    assert holds.remaining_s(A, "clf", 200.0) == pytest.approx(4.0)  # at most max_hold_s
    holds.refused(A, "clf", retry_after_s=2, now=300.0)
    assert holds.remaining_s(A, "clf", 303.0) == 0.0  # over already


def test_no_hold_when_off_or_without_a_connection() -> None:
    off = ResendHolds(max_hold_s=0.0)
    off.refused(A, "clf", retry_after_s=2, now=0.0)
    assert off.remaining_s(A, "clf", 0.0) == 0.0
    on = ResendHolds(max_hold_s=4.0)
    on.refused(None, "clf", retry_after_s=2, now=0.0)  # no client address (some ASGI servers)
    assert on.remaining_s(None, "clf", 0.0) == 0.0


def test_expired_holds_of_connections_that_never_came_back_are_dropped() -> None:
    holds = ResendHolds(max_hold_s=4.0)
    for i in range(10_000):  # 10,000 connections refused over 1,000 s, 2 s each, none resending
        holds.refused(("10.0.0.2", i), "clf", retry_after_s=2, now=i * 0.1)
    assert len(holds._until) <= 30  # the ~20 still running, and a few past ones not yet pruned


def test_the_table_is_bounded_even_when_every_hold_is_still_running(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ResendHolds, "MAX_ENTRIES", 64)
    holds = ResendHolds(max_hold_s=4.0)
    for i in range(1_000):
        holds.refused(("10.0.0.3", i), "clf", retry_after_s=4, now=0.0)
    assert len(holds._until) <= 65
    assert holds.remaining_s(("10.0.0.3", 999), "clf", 0.0) == pytest.approx(4.0)  # the newest stay
