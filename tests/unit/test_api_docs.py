"""/docs and /redoc load nothing from a CDN: their scripts and styles come from installed npm
packages under /static/vendor, and the pages carry the dashboard's Content-Security-Policy."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from remotecli.api import docs
from remotecli.app import create_app
from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.web import routes as web_routes


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", driver="fake", run_background=False)
    ctx = AppContext.create(settings)
    try:
        with TestClient(create_app(ctx, background=False)) as test_client:
            yield test_client
    finally:
        ctx.close()


def _references(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_docs_pages_reference_only_local_assets_under_the_dashboard_csp(client: TestClient) -> None:
    assert docs.CSP == web_routes.CSP  # the same policy as the dashboard's pages
    assert docs.vendor_ready(), "run npm ci in src/remotecli/web (scripts/install.sh does)"
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        response = client.get(page)
        assert response.status_code == 200, page
        assert response.headers["content-security-policy"] == web_routes.CSP
        assert response.headers["x-frame-options"] == "DENY"
        html = response.text
        assert "<script>" not in html and "onload=" not in html  # no inline script (script-src 'self')
        assert "cdn" not in html.lower() and "//" not in html.replace("http://www.w3.org", "")
        references = _references(html)
        assert references, page
        for url in references:
            assert url.startswith("/") and not url.startswith("//"), (page, url)
            if url != "/openapi.json":
                asset = client.get(url)
                assert asset.status_code == 200 and asset.content, (page, url)
    init = client.get("/docs/swagger-init.js")
    assert init.headers["content-type"].startswith("text/javascript") and "/openapi.json" in init.text
    assert client.get("/openapi.json").status_code == 200


def test_vendor_versions_are_pinned() -> None:
    import json

    package = json.loads((Path(web_routes.__file__).parent / "package.json").read_text())
    for name in ("swagger-ui-dist", "redoc"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", package["dependencies"][name]), name  # exact, no range
