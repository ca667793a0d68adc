"""The one bridge between a browser's websocket and a stream in a guest (the VNC view, the terminal).

A websocket route does three things, the same way for both:

1. ``accept(websocket, ctx)``: refuses a browser page of another site (``Origin`` present and not
   the controller's own origin: ``REMOTECLI_PUBLIC_URL``'s when set, else the request's ``Host``)
   before the handshake completes, with close code 4403 (``origin_not_allowed``); a client that
   sends no ``Origin`` (scripts, noVNC outside a browser) is judged by its ticket alone.
2. The route redeems its ticket and opens its guest side; an error goes to ``refuse``, which
   closes with 4401 (ticket), 4404 (no such object), 4409 (not available now) or 1011, reason =
   the error's code.
3. ``bridge(websocket, ctx, user_id, guest)`` pumps both ways until one side ends. While it runs
   it checks every ``websocket_access_check_s`` that the user is still enabled and closes with
   4401 ``user_disabled`` otherwise (the socket outlives the check that opened it). At the end it
   closes the guest side, then the browser's socket with ``guest.close_frame()``.

What differs per route lives in its ``GuestSide``: how guest output reaches the browser, and what
a binary or a text frame from the browser means. Ticket URLs come from ``ws_url``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.errors import AgentError, RemotecliError
from remotecli.services import users as users_service

USER_DISABLED_CODE = 4401
USER_DISABLED_REASON = "user_disabled"
ORIGIN_REFUSED_CODE = 4403
ORIGIN_REFUSED_REASON = "origin_not_allowed"
_STATUS_CLOSE_CODES = {401: 4401, 404: 4404, 409: 4409}
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# What ends a bridge in the ordinary way (a side hung up), not worth a warning.
_QUIET_ENDINGS = (WebSocketDisconnect, ConnectionError, AgentError)

SendBytes = Callable[[bytes], Awaitable[None]]
SendText = Callable[[str], Awaitable[None]]


# ----------------------------------------------------------------------------------------------
# Where a websocket may come from, and where its URL points


def _origin(url: str) -> str:
    """``scheme://host[:port]`` in lower case, the port only when it is not the scheme's default."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        return ""
    return f"{scheme}://{host}" + (f":{port}" if port and port != _DEFAULT_PORTS.get(scheme) else "")


def origin_allowed(origin: str | None, host: str | None, settings: Settings) -> bool:
    """Is a websocket handshake with this ``Origin`` header one of the controller's own pages?"""
    if origin is None:
        return True  # not a browser: the ticket decides
    if settings.public_url:
        return _origin(origin) == _origin(settings.public_url)
    if not host:
        return False
    parts = urlsplit(origin.strip())
    if parts.scheme.lower() not in ("http", "https"):
        return False  # "null" (a sandboxed frame, a file) or something stranger
    return _origin(origin) in {_origin(f"{parts.scheme}://{host}")}


def ws_url(connection: HTTPConnection, settings: Settings, path: str) -> str:
    """The websocket URL of ``path`` (with its query): under ``REMOTECLI_PUBLIC_URL`` when it is set
    (so a controller behind a TLS proxy hands out ``wss://``), else from the request."""
    base = (settings.public_url or str(connection.base_url)).rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://"):]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://"):]
    return base + path


# ----------------------------------------------------------------------------------------------
# Opening and refusing


async def accept(websocket: WebSocket, ctx: AppContext, *, subprotocols: tuple[str, ...] = ()) -> bool:
    """Complete the handshake (with the first of ``subprotocols`` the client offered), or refuse
    a foreign ``Origin`` (4403, before the handshake completes) and return False."""
    if not origin_allowed(websocket.headers.get("origin"), websocket.headers.get("host"), ctx.settings):
        await websocket.close(code=ORIGIN_REFUSED_CODE, reason=ORIGIN_REFUSED_REASON)
        return False
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol=next((p for p in subprotocols if p in offered), None))
    return True


def close_code(exc: RemotecliError) -> int:
    return _STATUS_CLOSE_CODES.get(exc.http_status, 1011)


async def refuse(websocket: WebSocket, exc: RemotecliError, log: logging.Logger, what: str, *,
                 code: int | None = None, extra: Mapping[str, object] | None = None) -> None:
    """Close an accepted socket whose guest side could not be opened: code by the error's status."""
    log.info("%s refused: %s", what, exc.code, extra=dict(extra or {}))
    await websocket.close(code=code if code is not None else close_code(exc), reason=exc.code)


async def until_access_ends(ctx: AppContext, user_id: str) -> None:
    """Return once ``user_id`` may no longer use what the socket opened (disabled or deleted). A
    database hiccup is not a revocation: the check is simply made again at the next interval."""
    while True:
        await asyncio.sleep(ctx.settings.websocket_access_check_s)
        try:
            active = await run_in_threadpool(users_service.is_active, ctx.db, user_id)
        except Exception:
            continue
        if not active:
            return


# ----------------------------------------------------------------------------------------------
# The bridge


class GuestSide(Protocol):
    """The guest end of a bridge (what differs between the VNC view and the terminal)."""

    async def pump(self, send_bytes: SendBytes, send_text: SendText) -> None:
        """Send guest output to the browser until the guest side ends."""

    async def from_browser(self, data: bytes) -> None:
        """A binary frame from the browser."""

    async def control(self, text: str) -> None:
        """A text frame from the browser."""

    async def close(self) -> None:
        """Release the guest side (called once, however the bridge ended)."""

    def close_frame(self) -> tuple[int, str]:
        """Close code and reason for the browser's socket when the bridge ends on its own."""


async def _browser_to_guest(websocket: WebSocket, guest: GuestSide) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data is not None:
            if data:
                await guest.from_browser(data)
            continue
        text = message.get("text")
        if text is not None:
            await guest.control(text)


async def bridge(websocket: WebSocket, ctx: AppContext, user_id: str, guest: GuestSide, log: logging.Logger,
                 what: str, *, extra: Mapping[str, object] | None = None) -> None:
    """Pump both ways between an accepted ``websocket`` and ``guest`` until one side ends or the
    user loses access; then close both (see the module docstring)."""
    fields = dict(extra or {})
    log.info("%s opened", what, extra={**fields, "user_id": user_id})
    watch = asyncio.create_task(until_access_ends(ctx, user_id))
    tasks = [asyncio.create_task(guest.pump(websocket.send_bytes, websocket.send_text)),
             asyncio.create_task(_browser_to_guest(websocket, guest)), watch]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if watch in done:
            log.info("%s closed: user disabled", what, extra={**fields, "user_id": user_id})
            with contextlib.suppress(Exception):
                await websocket.close(code=USER_DISABLED_CODE, reason=USER_DISABLED_REASON)
        for task in done:
            failure = None if task.cancelled() else task.exception()
            if failure is not None and not isinstance(failure, _QUIET_ENDINGS):
                log.warning("%s bridge ended: %s", what, type(failure).__name__, extra=fields)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await guest.close()
        if websocket.application_state != WebSocketState.DISCONNECTED:
            code, reason = guest.close_frame()
            with contextlib.suppress(Exception):
                await websocket.close(code=code, reason=reason)
        log.info("%s closed", what, extra=fields)
