"""uvicorn's httptools protocol, with each response's head and body sent in one write.

uvicorn writes a response's status line and headers to the socket when the app sends
`http.response.start`, and the body when it sends `http.response.body`: two `send()` system calls
and two TCP segments for every answer, although an app that knows its whole body (every answer
here) sends the two messages back to back in one step of the event loop. `CoalescingTransport`
holds a write until the next one or until the end of the step it was made in, whichever comes
first, and sends them together; nothing is delayed past the step, and the order of bytes is kept.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport that joins a write with the one that follows it in the same event-loop step.

    Everything but `write`, `writelines`, `close` and `get_write_buffer_size` is the wrapped
    transport's (flow control, peer addresses, `is_closing`, `abort`)."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is None:
            self._held = bytes(data)
            self._loop.call_soon(self._flush)  # a lone write still leaves in this step
            return
        held, self._held = self._held, None
        self._transport.write(held + data)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def _flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self._flush()  # bytes written before close are sent before the FIN, as a transport does
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + (len(self._held) if self._held else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """`uvicorn.Config(http=...)`: the httptools protocol on a `CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
