"""HTTP routes: KServe V1 (`v1`), the V2 model repository extension (`repository`), Open Inference V2 (`v2`).

Shared helpers for route handlers live here.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel

from service.repository import ModelRepository


def get_repository(request: Request) -> ModelRepository:
    repository: ModelRepository = request.app.state.repository
    return repository


# what a handler declares to get the app's model repository (FastAPI resolves it per request)
Repository = Annotated[ModelRepository, Depends(get_repository)]


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
