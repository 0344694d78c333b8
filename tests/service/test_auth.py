"""service/auth.py: which header carries the key, constant-time matching, and the two route guards
(prediction routes: only with a key configured; repository load/unload: always, 403 without one)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import Depends, FastAPI

from service.auth import key_matches, presented_key, require_admin_key, require_api_key
from service.errors import install_error_handlers
from service.settings import Settings

pytestmark = pytest.mark.anyio
KEY = "s3cret-key"


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"x-api-key": KEY}, KEY),
        ({"authorization": f"Bearer {KEY}"}, KEY),
        ({"authorization": f"bearer   {KEY}  "}, KEY),  # the scheme is case-insensitive, spaces trimmed
        ({"x-api-key": KEY, "authorization": "Bearer other"}, KEY),  # X-API-Key first
        ({"authorization": f"Basic {KEY}"}, None),
        ({"authorization": "Bearer "}, None),
        ({"x-api-key": ""}, None),
        ({}, None),
    ],
)
def test_the_presented_key_comes_from_x_api_key_or_a_bearer_token(
    headers: dict[str, str], key: str | None
) -> None:
    assert presented_key(headers) == key


def test_a_key_matches_only_exactly() -> None:
    assert key_matches({"x-api-key": KEY}, KEY)
    assert not key_matches({"x-api-key": KEY + "x"}, KEY)
    assert not key_matches({"x-api-key": KEY[:-1]}, KEY)
    assert not key_matches({}, KEY)
    assert key_matches({"x-api-key": "clé-ü"}, "clé-ü")  # non-ASCII keys compare as UTF-8 bytes


def _app(api_key: str | None) -> FastAPI:
    app = FastAPI()
    app.state.settings = Settings(api_key=api_key)
    install_error_handlers(app)

    @app.post("/predict", dependencies=[Depends(require_api_key)])
    async def predict() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/load", dependencies=[Depends(require_admin_key)])
    async def load() -> dict[str, bool]:
        return {"ok": True}

    return app


async def _statuses(api_key: str | None, headers: dict[str, str]) -> dict[str, httpx.Response]:
    transport = httpx.ASGITransport(app=_app(api_key))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
        return {path: await client.post(f"/{path}") for path in ("predict", "load")}


async def test_without_a_configured_key_predictions_are_open_and_repository_changes_forbidden() -> None:
    answers = await _statuses(None, {})
    assert answers["predict"].status_code == 200
    assert answers["load"].status_code == 403
    assert (
        "no API key" in answers["load"].json()["error"] and "HYDRA_API_KEY" in answers["load"].json()["error"]
    )


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}])
async def test_with_a_key_both_guards_answer_401_with_a_bearer_challenge(headers: dict[str, str]) -> None:
    for response in (await _statuses(KEY, headers)).values():
        assert response.status_code == 401
        assert response.json() == {"error": "missing or invalid API key"}
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", [{"x-api-key": KEY}, {"authorization": f"Bearer {KEY}"}])
async def test_the_right_key_opens_both(headers: dict[str, str]) -> None:
    for response in (await _statuses(KEY, headers)).values():
        assert response.status_code == 200 and response.json() == {"ok": True}
