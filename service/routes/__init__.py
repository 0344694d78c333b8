"""HTTP routes: KServe V1 (`v1`), the V2 model repository extension (`repository`), Open Inference V2 (`v2`).

Shared helpers for route handlers live here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

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


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A JSON schema with its `$defs` inlined, so it can sit in an operation's `openapi_extra`.

    Pydantic's `"$ref": "#/$defs/..."` would resolve against the OpenAPI document's root, where
    there are no `$defs`: clients and fuzzers generating from the document could not build a body.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
