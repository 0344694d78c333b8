"""bench/servers.py's port choice: the one way tests and benchmarks pick loopback ports."""

from __future__ import annotations

import socket

from bench.servers import _ephemeral_range, free_port


def test_free_ports_lie_below_the_ephemeral_range_so_no_outgoing_connection_can_take_them() -> None:
    low, high = _ephemeral_range()
    assert 1_024 < low <= high
    for span in (1, 2, 3):
        port = free_port(span=span)
        assert port + span - 1 < low


def test_a_free_port_range_is_bindable_and_successive_calls_never_repeat_a_port() -> None:
    handed: list[int] = []
    for _ in range(40):
        port = free_port(span=3)
        handed.extend(range(port, port + 3))
        for candidate in range(port, port + 3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", candidate))
    assert len(handed) == len(set(handed))
