"""The web dashboard: server-rendered pages (``routes``), templates, one stylesheet, JS modules.

``install(app)`` adds the pages, the static files and the front-end packages from npm (served
from ``web/node_modules``, installed by ``scripts/install.sh``; never copied into the repo).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles


def install(app: FastAPI) -> None:
    from remotecli.web import routes

    app.include_router(routes.router)
    for mount, package in routes.VENDOR_PACKAGES.items():
        app.mount(f"/static/vendor/{mount}", StaticFiles(directory=routes.VENDOR_DIR / package, check_dir=False),
                  name=f"vendor-{mount}")
    app.mount("/static", StaticFiles(directory=routes.HERE / "static"), name="static")

    @app.exception_handler(routes._LoginRedirect)
    async def _login_redirect(request: Request, exc: routes._LoginRedirect) -> Response:
        return RedirectResponse(exc.target, status_code=303)
