"""service/http_protocol.py: a response's writes in one event-loop step leave as one send.

The transport wrapped is asyncio's own socket transport on a real socket pair; the socket records
the bytes of each send() the transport makes before the kernel takes them."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from service.http_protocol import CoalescingTransport

pytestmark = pytest.mark.anyio


class RecordingSocket(socket.socket):
    """A stream socket that remembers what each send() call was given."""

    def __init__(self, fileno: int) -> None:
        super().__init__(fileno=fileno)
        self.sends: list[bytes] = []

    def send(self, data: bytes, flags: int = 0) -> int:  # type: ignore[override]
        self.sends.append(bytes(data))
        return super().send(data, flags)


Pair = tuple[CoalescingTransport, asyncio.Transport, RecordingSocket, socket.socket]


async def _transport_and_peer() -> Pair:
    ours, peer = socket.socketpair()
    recording = RecordingSocket(ours.detach())
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, recording)
    return CoalescingTransport(transport, loop), transport, recording, peer  # type: ignore[arg-type]


def _sends(sock: RecordingSocket) -> list[bytes]:
    sends, sock.sends = sock.sends, []
    return sends


async def _after_step(sock: RecordingSocket) -> list[bytes]:
    """What the transport sent by the end of the current event-loop step (and the next one)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return _sends(sock)


async def test_head_and_body_written_in_one_step_leave_as_one_send() -> None:
    coalescing, raw, sock, peer = await _transport_and_peer()
    with contextlib.closing(coalescing), peer:
        raw.write(b"HTTP/1.1 200 OK\r\n\r\n")
        raw.write(b"{}")
        # the plain transport: two sends
        assert await _after_step(sock) == [b"HTTP/1.1 200 OK\r\n\r\n", b"{}"]
        coalescing.write(b"HTTP/1.1 200 OK\r\n\r\n")
        coalescing.write(memoryview(b'{"a": 1}'))
        assert await _after_step(sock) == [b'HTTP/1.1 200 OK\r\n\r\n{"a": 1}']
        assert peer.recv(1024) == b'HTTP/1.1 200 OK\r\n\r\n{}HTTP/1.1 200 OK\r\n\r\n{"a": 1}'


async def test_a_lone_write_leaves_within_the_step_and_order_is_kept() -> None:
    coalescing, _, sock, peer = await _transport_and_peer()
    with contextlib.closing(coalescing), peer:
        coalescing.write(b"one")
        assert coalescing.get_write_buffer_size() == 3  # held, and counted as buffered
        assert await _after_step(sock) == [b"one"]  # not waiting for a second write
        coalescing.write(b"two")
        coalescing.write(b"three")
        coalescing.write(b"four")  # a third write is held again, then flushed at the step's end
        assert await _after_step(sock) == [b"twothree", b"four"]
        assert peer.recv(1024) == b"onetwothreefour"


async def test_bytes_written_before_close_arrive_before_the_end_of_stream() -> None:
    coalescing, _, sock, peer = await _transport_and_peer()
    with peer:
        coalescing.write(b"last words")
        coalescing.close()  # e.g. Connection: close after an answer
        assert coalescing.is_closing()
        assert await _after_step(sock) == [b"last words"]
        assert peer.recv(1024) == b"last words" and peer.recv(1024) == b""  # then the end of stream
