"""HTTP routes: KServe V1 (`v1`), the V2 model repository extension (`repository`), Open Inference V2 (`v2`).

Shared helpers for route handlers live here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from service.errors import ClientDisconnected
from service.repository import ModelRepository

T = TypeVar("T")


def get_repository(request: Request) -> ModelRepository:
    repository: ModelRepository = request.app.state.repository
    return repository


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it if the client disconnects first (its queued rows are then skipped).

    Call only after the body has been read: the next ASGI `receive()` then blocks until the client
    disconnects (or the response is complete).
    """
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # client gone, or this handler itself cancelled: skip the queued rows
            task.cancel()
    if task in done:
        return task.result()
    raise ClientDisconnected("client disconnected before the answer was ready")
