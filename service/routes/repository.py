"""Triton's model-repository extension: index, load, unload.

`GET|POST /v2/repository/index` lists every model directory with its state. `POST
/v2/repository/models/{name}/load` (re)loads the pinned/latest version — warmed before it replaces
the serving one — and `…/unload` stops serving it; both need the API key.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from service.auth import require_admin_key, require_api_key
from service.errors import BadRequest
from service.responses import OrjsonResponse
from service.routes import Repository

router = APIRouter(prefix="/v2/repository", tags=["Model repository"], default_response_class=OrjsonResponse)


class IndexEntry(BaseModel):
    name: str
    version: str
    state: str
    reason: str


class LoadResult(BaseModel):
    name: str
    version: str
    state: str
    provider: str | None = None


async def _ready_filter(request: Request) -> bool:
    # Triton's body is optional: {"ready": true} lists only ready models.
    body = await request.body()
    if not body.strip():
        return False
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("ready", False), bool):
        raise BadRequest('expected {"ready": true|false}')
    return bool(payload.get("ready", False))


@router.api_route(
    "/index",
    methods=["GET", "POST"],
    response_model=list[IndexEntry],
    dependencies=[Depends(require_api_key)],
)
async def repository_index(request: Request, repository: Repository) -> OrjsonResponse:
    ready_only = await _ready_filter(request) if request.method == "POST" else False
    entries = repository.index()
    if ready_only:
        entries = [e for e in entries if e["state"] == "READY"]
    return OrjsonResponse(entries)


@router.post(
    "/models/{model_name}/load", response_model=LoadResult, dependencies=[Depends(require_admin_key)]
)
async def load_model(model_name: str, repository: Repository) -> OrjsonResponse:
    model = await repository.load(model_name)
    return OrjsonResponse(
        {"name": model.name, "version": str(model.version), "state": "READY", "provider": model.provider}
    )


@router.post(
    "/models/{model_name}/unload", response_model=LoadResult, dependencies=[Depends(require_admin_key)]
)
async def unload_model(model_name: str, repository: Repository) -> OrjsonResponse:
    await repository.unload(model_name)
    return OrjsonResponse({"name": model_name, "version": "", "state": "UNAVAILABLE"})
