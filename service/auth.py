"""API-key checks as FastAPI dependencies.

`require_api_key`: prediction routes; a no-op unless `Settings.api_key` is set.
`require_admin_key`: repository load/unload; always needs the key, and refuses when none is configured.
The key comes as `X-API-Key: <key>` or `Authorization: Bearer <key>`; compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from fastapi import Request

from service.errors import Forbidden, Unauthorized
from service.settings import Settings


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key in `x-api-key` or `authorization: Bearer` (HTTP headers or gRPC call metadata)."""
    key = headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def key_matches(headers: Mapping[str, str], expected: str) -> bool:
    presented = presented_key(headers)
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def _matches(request: Request, expected: str) -> bool:
    return key_matches(request.headers, expected)


async def require_api_key(request: Request) -> None:
    settings: Settings = request.app.state.settings
    if settings.api_key is not None and not _matches(request, settings.api_key.get_secret_value()):
        raise Unauthorized()


async def require_admin_key(request: Request) -> None:
    settings: Settings = request.app.state.settings
    if settings.api_key is None:
        raise Forbidden("repository load/unload is disabled: the server has no API key (set HYDRA_API_KEY)")
    if not _matches(request, settings.api_key.get_secret_value()):
        raise Unauthorized()
