"""`/docs` and `/redoc` use assets the server serves itself: they render with no network.

The browser test runs Debian's headless Chromium against a real server with every host but 127.0.0.1
unresolvable and a dead proxy for anything else, so a page that needed a CDN would stay blank. It is
skipped where no Chromium binary is installed (`apt-get install chromium`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import httpx
import pytest

from tests.service.support import Server, free_port

CHROMIUM = next(
    (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))),
    None,
)
ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


def _asset_urls(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_only_local_assets_that_answer(base_url: str, page: str) -> None:
    response = httpx.get(base_url + page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not re.search(r"https?://", html), "the page must load nothing from another host"
    urls = _asset_urls(html)
    assert any(u.endswith(".js") for u in urls), urls
    for url in urls:
        assert url.startswith("/static/docs/"), url
        asset = httpx.get(base_url + url)
        assert asset.status_code == 200, url
        expected = next(kind for suffix, kind in ASSET_TYPES.items() if url.endswith(suffix))
        assert expected in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 0
    assert "/openapi.json" in html


def test_docs_assets_outside_the_bundle_are_404(base_url: str) -> None:
    assert httpx.get(f"{base_url}/static/docs/nope.js").status_code == 404
    assert httpx.get(f"{base_url}/static/docs/../../service/app.py").status_code == 404


def _dump_dom(url: str) -> str:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="hydra-chromium-") as profile:
        result = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",  # tests run as root here
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                f"--user-data-dir={profile}",
                # loopback only: names other than 127.0.0.1 do not resolve, and anything left goes to
                # a proxy on a port nobody listens on (Chromium never proxies loopback itself)
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                f"--proxy-server=http://127.0.0.1:{free_port()}",
                "--virtual-time-budget=8000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_swagger_ui_renders_the_operations_offline_in_chromium(server: Server) -> None:
    dom = _dump_dom(f"{server.url}/docs")
    # Swagger UI draws one `opblock` per operation, with its path in `opblock-summary-path`
    assert 'class="opblock ' in dom or "opblock opblock-" in dom, dom[:2000]
    for path in ("/v1/models/{model_name}:predict", "/v2/models/{model_name}/infer", "/v2/health/live"):
        assert path in dom, path
    assert "hydra-serve" in dom


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_redoc_renders_the_operations_offline_in_chromium(server: Server) -> None:
    dom = _dump_dom(f"{server.url}/redoc")
    assert "/v2/models/{model_name}/infer" in dom, dom[:2000]
    assert "Liveness (KServe V1)" in dom
