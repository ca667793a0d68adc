"""The REST API's application factory (the whole controller's app is ``remotecli.app.create_app``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI

from remotecli import __version__
from remotecli.api import docs, limits
from remotecli.api.errors import install_error_handlers
from remotecli.api.routes import (
    auth_sessions,
    credentials,
    device_signins,
    health,
    metrics,
    terminal,
    vms,
    workspace,
)
from remotecli.api.transport import TransportSecurity
from remotecli.context import AppContext

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_api(ctx: AppContext, *, lifespan: Lifespan | None = None) -> FastAPI:
    """The REST API and its websockets (``remotecli.app.create_app`` adds the dashboard and the
    background loops)."""
    app = FastAPI(
        lifespan=lifespan,
        title="remotecli",
        version=__version__,
        description="Per-user microVMs for AI coding CLIs, with isolated Browser-VM OAuth login.",
        openapi_url="/openapi.json",
        docs_url=None,  # api/docs.py serves /docs and /redoc from installed packages, with a CSP
        redoc_url=None,
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    limits.install(app, ctx.settings.max_request_body_bytes)
    app.add_middleware(TransportSecurity, settings=ctx.settings)
    app.include_router(health.router)
    app.include_router(vms.router)
    app.include_router(auth_sessions.router)
    app.include_router(metrics.router)
    app.include_router(terminal.router)
    app.include_router(workspace.router)
    app.include_router(credentials.router)
    app.include_router(device_signins.router)
    docs.install(app)
    return app
