"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from remotecli import __version__, web
from remotecli.api import limits
from remotecli.api.errors import install_error_handlers
from remotecli.api.routes import auth_sessions, health, metrics, terminal, vms
from remotecli.context import AppContext


def create_app(ctx: AppContext, *, background: bool | None = None) -> FastAPI:
    """The controller's ASGI app. ``background`` (default: settings.run_background) starts the loops."""
    run_loops = ctx.settings.run_background if background is None else background

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from remotecli.background.loops import BackgroundLoops

        # The reconciler's first pass runs at start-up: after a crash it adopts running VMs, fails
        # the dead and wedged ones, and removes orphans before sessions are picked up again.
        loops = BackgroundLoops(ctx) if run_loops else None
        if loops:
            loops.start()
        try:
            yield
        finally:
            if loops:
                loops.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="remotecli",
        version=__version__,
        description="Per-user microVMs for AI coding CLIs, with isolated Browser-VM OAuth login.",
        openapi_url="/openapi.json",
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    limits.install(app, ctx.settings.max_request_body_bytes)
    app.include_router(health.router)
    app.include_router(vms.router)
    app.include_router(auth_sessions.router)
    app.include_router(metrics.router)
    app.include_router(terminal.router)
    web.install(app)
    return app
