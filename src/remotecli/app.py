"""The controller's ASGI app: the REST API, the dashboard and the background loops, put together.

This is the one place where the two front doors meet: ``api`` (``api/app.py``: the REST API and
the websockets) and ``web`` (the dashboard's pages) never import each other; both stand on
``services``. The background loops (``background/loops.py``) start and stop with the app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from remotecli import web
from remotecli.api.app import create_api
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

    app = create_api(ctx, lifespan=lifespan)
    web.install(app)
    return app
