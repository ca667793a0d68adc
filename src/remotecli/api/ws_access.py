"""Open websockets (terminal, VNC view) outlive the check that opened them: this ends them when
their user is disabled or deleted, within ``websocket_access_check_s``."""

from __future__ import annotations

import asyncio

from starlette.concurrency import run_in_threadpool

from remotecli.context import AppContext
from remotecli.services import users as users_service

CLOSE_CODE = 4401
REASON = "user_disabled"


async def until_access_ends(ctx: AppContext, user_id: str) -> None:
    """Return once ``user_id`` may no longer use what the socket opened. A database hiccup is not
    a revocation: the check is simply made again at the next interval."""
    while True:
        await asyncio.sleep(ctx.settings.websocket_access_check_s)
        try:
            active = await run_in_threadpool(users_service.is_active, ctx.db, user_id)
        except Exception:
            continue
        if not active:
            return
