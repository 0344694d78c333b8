"""service/errors.py: every error the service raises, and FastAPI's own, reaches the client as
`{"error": "..."}` with its status and headers; an unexpected exception is a 500 that names its type
and nothing more."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from service import errors
from service.errors import install_error_handlers

pytestmark = pytest.mark.anyio

# every class of the documented hierarchy, with its status
STATUSES = {
    errors.ServiceError: 500,
    errors.BadRequest: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.ModelNotFound: 404,
    errors.RequestTimeout: 408,
    errors.PayloadTooLarge: 413,
    errors.ModelLoadError: 400,
    errors.ProviderUnavailable: 400,
    errors.ModelUnavailable: 503,
    errors.QueueFull: 503,
    errors.DeadlineExceeded: 504,
    errors.ClientDisconnected: 499,
    errors.ModelRunError: 500,
}


class Body(BaseModel):
    rows: list[list[float]]
    alpha: float = 0.05


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{name}")
    async def raise_named(name: str) -> None:
        cls = getattr(errors, name)
        if cls is errors.Unauthorized:
            raise cls()
        if cls is errors.QueueFull:
            raise cls("queue of model 'm' is full", retry_after_s=3)
        raise cls(f"{name} happened")

    @app.post("/parse")
    async def parse(body: Body) -> dict[str, int]:
        return {"rows": len(body.rows)}

    @app.get("/bug")
    async def bug() -> None:
        raise ZeroDivisionError("secret internals")

    return app


async def _client() -> httpx.AsyncClient:
    # raise_app_exceptions=False: Starlette re-raises an unhandled error after answering it
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def test_the_hierarchy_is_as_documented() -> None:
    for cls, status in STATUSES.items():
        assert cls.status_code == status, cls
        assert issubclass(cls, errors.ServiceError)
    assert issubclass(errors.ProviderUnavailable, errors.ModelLoadError)
    assert errors.ProviderUnavailable("cuda missing").reason == "provider"
    assert errors.ModelLoadError("bad").reason == "warmup"
    assert errors.ModelLoadError("bad", reason="manifest").reason == "manifest"
    assert errors.QueueFull("full", retry_after_s=0).headers == {"Retry-After": "1"}  # at least a second


async def test_every_service_error_answers_its_status_and_message() -> None:
    async with await _client() as client:
        for cls, status in STATUSES.items():
            response = await client.get(f"/raise/{cls.__name__}")
            assert response.status_code == status, cls
            assert response.headers["content-type"] == "application/json"
            expected = "missing or invalid API key" if cls is errors.Unauthorized else None
            if cls is errors.QueueFull:
                expected = "queue of model 'm' is full"
                assert response.headers["retry-after"] == "3"
            assert response.json() == {"error": expected or f"{cls.__name__} happened"}
        assert (await client.get("/raise/Unauthorized")).headers["www-authenticate"] == "Bearer"


async def test_validation_errors_are_400_and_name_the_field() -> None:
    async with await _client() as client:
        wrong_type = await client.post("/parse", json={"rows": [[1, "x"]]})
        assert wrong_type.status_code == 400
        assert wrong_type.json()["error"].startswith("rows.0.1: ")
        missing = await client.post("/parse", json={"alpha": 0.1})
        assert missing.status_code == 400 and missing.json()["error"].startswith("rows: ")
        two = await client.post("/parse", json={"rows": "no", "alpha": "high"})
        assert two.status_code == 400 and "; " in two.json()["error"]  # every problem, one line
        malformed = await client.post(
            "/parse", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 400 and "malformed JSON body" in malformed.json()["error"]


async def test_unknown_routes_and_methods_say_what_was_asked() -> None:
    async with await _client() as client:
        missing = await client.get("/nowhere")
        assert missing.status_code == 404 and missing.json() == {"error": "Not Found: GET /nowhere"}
        wrong_method = await client.delete("/parse")
        assert wrong_method.status_code == 405
        assert wrong_method.json() == {"error": "Method Not Allowed: DELETE /parse"}
        assert "POST" in wrong_method.headers["allow"]


async def test_an_unexpected_exception_is_a_500_that_names_only_its_type() -> None:
    async with await _client() as client:
        response = await client.get("/bug")
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error (ZeroDivisionError)"}
