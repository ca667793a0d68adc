"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI

from remotecli import __version__
from remotecli.api.errors import install_error_handlers
from remotecli.api.routes import health, vms
from remotecli.context import AppContext


def create_app(ctx: AppContext) -> FastAPI:
    app = FastAPI(
        title="remotecli",
        version=__version__,
        description="Per-user microVMs for AI coding CLIs, with isolated Browser-VM OAuth login.",
        openapi_url="/openapi.json",
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(vms.router)
    return app
