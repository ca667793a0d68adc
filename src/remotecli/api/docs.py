"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served from installed npm packages.

FastAPI's own pages load their scripts from a CDN (floating versions, no integrity check) onto the
controller's origin and carry no CSP. Here the scripts come from ``swagger-ui-dist`` and ``redoc``,
pinned in ``web/package.json`` (installed by scripts/install.sh with noVNC and xterm.js), mounted
at ``/static/vendor/swagger-ui`` and ``/static/vendor/redoc``, and the pages carry the dashboard's
Content-Security-Policy (no inline script: Swagger UI starts from ``/docs/swagger-init.js``; ReDoc
from its ``<redoc>`` element, with its search off, since that needs a ``blob:`` worker).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

# web/node_modules: the one npm install of the controller (a path, not an import of the dashboard).
VENDOR_DIR = Path(__file__).resolve().parents[1] / "web" / "node_modules"
SWAGGER_MOUNT, REDOC_MOUNT = "/static/vendor/swagger-ui", "/static/vendor/redoc"
# The dashboard's policy (web/routes.py CSP; tests/unit/test_serve_tls.py checks they are equal).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self' ws: wss:; font-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'self'; object-src 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

_MISSING = ("<p>The API documentation's scripts are not installed: run <code>npm ci</code> in "
            "<code>src/remotecli/web</code> (scripts/install.sh does). The schema is at "
            "<a href=\"/openapi.json\">/openapi.json</a>.</p>")

SWAGGER_HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>remotecli API</title>
<link rel="stylesheet" href="{SWAGGER_MOUNT}/swagger-ui.css">
<link rel="icon" type="image/png" href="{SWAGGER_MOUNT}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui">{{missing}}</div>
<script src="{SWAGGER_MOUNT}/swagger-ui-bundle.js"></script>
<script src="/docs/swagger-init.js"></script>
</body>
</html>
"""

SWAGGER_INIT = """window.addEventListener("load", function () {
  if (typeof SwaggerUIBundle === "undefined") { return; }
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    oauth2RedirectUrl: window.location.origin + "/docs/oauth2-redirect"
  });
});
"""

OAUTH2_REDIRECT_HTML = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>remotecli API: OAuth2 redirect</title></head>
<body>
<script src="{SWAGGER_MOUNT}/oauth2-redirect.js"></script>
</body>
</html>
"""

REDOC_HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>remotecli API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
</head>
<body>
{{missing}}
<redoc spec-url="/openapi.json" disable-search></redoc>
<script src="{REDOC_MOUNT}/redoc.standalone.js"></script>
</body>
</html>
"""

router = APIRouter(include_in_schema=False)


def vendor_ready() -> bool:
    return (VENDOR_DIR / "swagger-ui-dist" / "swagger-ui-bundle.js").is_file() and (
        VENDOR_DIR / "redoc" / "bundles" / "redoc.standalone.js"
    ).is_file()


def _html(template: str) -> HTMLResponse:
    return HTMLResponse(template.replace("{missing}", "" if vendor_ready() else _MISSING), headers=HEADERS)


@router.get("/docs", response_class=HTMLResponse)
def swagger_ui() -> HTMLResponse:
    return _html(SWAGGER_HTML)


@router.get("/docs/swagger-init.js")
def swagger_init() -> Response:
    return Response(SWAGGER_INIT, media_type="text/javascript", headers=HEADERS)


@router.get("/docs/oauth2-redirect", response_class=HTMLResponse)
def swagger_oauth2_redirect() -> HTMLResponse:
    return HTMLResponse(OAUTH2_REDIRECT_HTML, headers=HEADERS)


@router.get("/redoc", response_class=HTMLResponse)
def redoc() -> HTMLResponse:
    return _html(REDOC_HTML)


def install(app: FastAPI) -> None:
    """Add the pages and mount the two packages (before the dashboard's ``/static`` mount)."""
    app.include_router(router)
    app.mount(SWAGGER_MOUNT, StaticFiles(directory=VENDOR_DIR / "swagger-ui-dist", check_dir=False),
              name="vendor-swagger-ui")
    app.mount(REDOC_MOUNT, StaticFiles(directory=VENDOR_DIR / "redoc" / "bundles", check_dir=False),
              name="vendor-redoc")
