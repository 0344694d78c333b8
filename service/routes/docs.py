"""`/docs` (Swagger UI) and `/redoc` from assets the service serves itself, so they render offline.

FastAPI's default pages load their script and styles from a CDN: in an air-gapped cluster the page
is blank. The Swagger UI 5 and ReDoc 2 bundles come from the `fastapi-offline` package (pinned in
pyproject.toml); only its static files are used, mounted at `ASSETS_URL`, and the pages are FastAPI's
own `get_swagger_ui_html` / `get_redoc_html` pointed at them (FastAPI's "self-hosting JavaScript and
CSS for docs" recipe). Like `/openapi.json`, the pages need no API key.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/static/docs"
SWAGGER_JS = "swagger-ui-bundle.js"
SWAGGER_CSS = "swagger-ui.css"
REDOC_JS = "redoc.standalone.js"
FAVICON = "favicon.png"


def assets_dir() -> Path:
    """The directory of the packaged bundles (an installed wheel's files are plain files on disk)."""
    return Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI) -> None:
    """Serves the bundles and the two pages; the app must be built with `docs_url=None, redoc_url=None`."""
    openapi_url = app.openapi_url
    if openapi_url is None:  # no schema, nothing to render
        return
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")

    def asset(request: Request, name: str) -> str:
        # behind a proxy that strips a prefix, links must carry it (FastAPI's own pages do the same)
        return f"{request.scope.get('root_path', '')}{ASSETS_URL}/{name}"

    def common(request: Request, page: str) -> dict[str, Any]:
        # what both pages take alike: the schema's URL under the proxy's prefix, and the title
        return {
            "openapi_url": f"{request.scope.get('root_path', '')}{openapi_url}",
            "title": f"{app.title} - {page}",
        }

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            **common(request, "Swagger UI"),
            swagger_js_url=asset(request, SWAGGER_JS),
            swagger_css_url=asset(request, SWAGGER_CSS),
            swagger_favicon_url=asset(request, FAVICON),
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            **common(request, "ReDoc"),
            redoc_js_url=asset(request, REDOC_JS),
            redoc_favicon_url=asset(request, FAVICON),
            with_google_fonts=False,  # fonts.googleapis.com is as unreachable as the CDN
        )
