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


# ----------------------------------------------------------------------------------------------
# The VNC view's clipboard rule (issue 13): text copied inside the Browser VM does not reach the
# user's clipboard unless ``browser_clipboard_out`` is on. Pasting into the VM (ClientCutText)
# is always allowed. The rule is kept here, on the controller, not only in the guest's VNC server:
# the guest runs the provider's page and is not trusted to keep it.


class RfbFilterError(ConnectionError):
    """The RFB stream had something this filter cannot follow: the view is closed (fail closed)."""


# Encodings whose rectangles the filter can measure (the client's SetEncodings is cut down to
# these, so the server sends no other): Raw, CopyRect, zlib, ZRLE; pseudo-encodings Cursor,
# DesktopSize, LastRect, ExtendedDesktopSize, and the quality and compression levels (no data).
_RAW, _COPYRECT, _ZLIB, _ZRLE = 0, 1, 6, 16
_CURSOR, _DESKTOP_SIZE, _LAST_RECT, _EXT_DESKTOP_SIZE = -239, -223, -224, -308
_KNOWN_ENCODINGS = frozenset({_RAW, _COPYRECT, _ZLIB, _ZRLE, _CURSOR, _DESKTOP_SIZE, _LAST_RECT, _EXT_DESKTOP_SIZE,
                              *range(-256, -246), *range(-32, -22)})


class RfbClipboardFilter:
    """Follows both directions of one RFB connection (protocol 3.3 to 3.8, security None or VNC
    authentication) and drops every ServerCutText message from the guest. ``from_server`` and
    ``from_client`` return the bytes to pass on; anything unknown raises ``RfbFilterError``."""

    def __init__(self) -> None:
        self._server = bytearray()
        self._client = bytearray()
        self._server_state = "version"
        self._client_state = "version"
        self._server_minor = 0
        self._client_minor = 0
        self._security = 0  # the type in use: 1 None, 2 VNC authentication
        self._bytes_per_pixel = 4
        self._rects = 0  # rectangles left in the FramebufferUpdate being read
        self._pass = 0  # bytes of the server's stream to pass on unread (rectangle data)
        self.dropped = 0  # ServerCutText messages dropped

    # -- the guest's VNC server → the user -------------------------------------------------------

    def from_server(self, data: bytes) -> bytes:
        self._server += data
        out = bytearray()
        while True:
            if self._pass:
                n = min(self._pass, len(self._server))
                out += self._server[:n]
                del self._server[:n]
                self._pass -= n
                if self._pass:
                    break
            took = self._server_step()
            if took is None:
                break
            keep, size = took
            if keep:
                out += self._server[:size]
            del self._server[:size]
        return bytes(out)

    def _server_step(self) -> tuple[bool, int] | None:
        buf = self._server
        state = self._server_state
        if state == "version":
            if len(buf) < 12:
                return None
            self._server_minor = _rfb_minor(bytes(buf[:12]))
            self._server_state = "security"
            return True, 12
        if state == "security":
            minor = min(self._server_minor, self._client_minor or self._server_minor)
            if minor < 7:
                if len(buf) < 4:
                    return None
                self._security = int.from_bytes(buf[:4], "big")
                self._server_state = self._after_security()
                return True, 4
            if len(buf) < 1:
                return None
            if buf[0] == 0:
                self._server_state = "failed"
                return True, 1
            if len(buf) < 1 + buf[0]:
                return None
            self._server_state = "chosen"
            return True, 1 + buf[0]
        if state == "chosen":  # waiting for the client's choice; nothing from the server till then
            if not self._security:
                if buf:
                    raise RfbFilterError("server spoke before the client chose a security type")
                return None
            self._server_state = self._after_security()
            return False, 0
        if state == "challenge":
            if len(buf) < 16:
                return None
            self._server_state = "result"
            return True, 16
        if state == "result":
            if len(buf) < 4:
                return None
            self._server_state = "init" if int.from_bytes(buf[:4], "big") == 0 else "failed"
            return True, 4
        if state == "failed":  # a refusal and its reason: pass on whatever follows, then it ends
            return (True, len(buf)) if buf else None
        if state == "init":
            if len(buf) < 24:
                return None
            name = int.from_bytes(buf[20:24], "big")
            if len(buf) < 24 + name:
                return None
            self._bytes_per_pixel = max(1, buf[4] // 8)
            self._server_state = "messages"
            return True, 24 + name
        if state == "rect":
            return self._rect_step()
        # messages
        if not buf:
            return None
        kind = buf[0]
        if kind == 0:  # FramebufferUpdate
            if len(buf) < 4:
                return None
            self._rects = int.from_bytes(buf[2:4], "big")
            self._server_state = "rect" if self._rects else "messages"
            return True, 4
        if kind == 1:  # SetColourMapEntries
            if len(buf) < 6:
                return None
            return True, 6 + 6 * int.from_bytes(buf[4:6], "big")
        if kind == 2:  # Bell
            return True, 1
        if kind == 3:  # ServerCutText: the guest's clipboard, dropped
            if len(buf) < 8:
                return None
            length = abs(int.from_bytes(buf[4:8], "big", signed=True))
            if len(buf) < 8 + length:
                return None
            self.dropped += 1
            return False, 8 + length
        raise RfbFilterError(f"server message type {kind}")

    def _rect_step(self) -> tuple[bool, int] | None:
        buf = self._server
        if len(buf) < 12:
            return None
        width, height = int.from_bytes(buf[4:6], "big"), int.from_bytes(buf[6:8], "big")
        encoding = int.from_bytes(buf[8:12], "big", signed=True)
        head = 12
        if encoding == _RAW:
            body = width * height * self._bytes_per_pixel
        elif encoding == _COPYRECT:
            body = 4
        elif encoding in (_ZLIB, _ZRLE):
            if len(buf) < 16:
                return None
            head, body = 16, int.from_bytes(buf[12:16], "big")
        elif encoding == _CURSOR:
            body = width * height * self._bytes_per_pixel + (width + 7) // 8 * height
        elif encoding == _EXT_DESKTOP_SIZE:
            if len(buf) < 13:
                return None
            body = 4 + 16 * buf[12]
        elif encoding in (_DESKTOP_SIZE, _LAST_RECT):
            body = 0
        else:
            raise RfbFilterError(f"rectangle encoding {encoding}")
        self._rects -= 1
        if self._rects <= 0 or encoding == _LAST_RECT:
            self._server_state = "messages"
        self._pass = body
        return True, head

    def _after_security(self) -> str:
        if self._security == 1:
            return "result" if min(self._server_minor, self._client_minor) >= 8 else "init"
        if self._security == 2:
            return "challenge"
        raise RfbFilterError(f"security type {self._security}")

    # -- the user (noVNC) → the guest's VNC server -----------------------------------------------

    def from_client(self, data: bytes) -> bytes:
        self._client += data
        out = bytearray()
        while True:
            took = self._client_step()
            if took is None:
                break
            size, replacement = took
            out += self._client[:size] if replacement is None else replacement
            del self._client[:size]
        return bytes(out)

    def _client_step(self) -> tuple[int, bytes | None] | None:
        buf = self._client
        state = self._client_state
        if state == "version":
            if len(buf) < 12:
                return None
            self._client_minor = _rfb_minor(bytes(buf[:12]))
            self._client_state = "choose" if min(self._server_minor, self._client_minor) >= 7 else "auth"
            return 12, None
        if state == "choose":
            if not buf:
                return None
            self._security = buf[0]
            self._client_state = "auth"
            return 1, None
        if state == "auth":  # the VNC authentication response, if any, then ClientInit
            if self._security == 0:
                return None  # (3.3) the server has not said which type yet
            if self._security == 2:
                if len(buf) < 16:
                    return None
                self._security = -2  # answered
                return 16, None
            if not buf:
                return None
            self._client_state = "messages"
            return 1, None
        if not buf:
            return None
        kind = buf[0]
        if kind == 0:  # SetPixelFormat
            if len(buf) < 20:
                return None
            self._bytes_per_pixel = max(1, buf[4] // 8)
            return 20, None
        if kind == 2:  # SetEncodings: only those whose data this filter can measure
            if len(buf) < 4:
                return None
            count = int.from_bytes(buf[2:4], "big")
            if len(buf) < 4 + 4 * count:
                return None
            wanted = [int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "big", signed=True) for i in range(count)]
            kept = [e for e in wanted if e in _KNOWN_ENCODINGS]
            body = b"".join(e.to_bytes(4, "big", signed=True) for e in kept)
            return 4 + 4 * count, bytes([2, 0]) + len(kept).to_bytes(2, "big") + body
        if kind == 3:  # FramebufferUpdateRequest
            return (10, None) if len(buf) >= 10 else None
        if kind == 4:  # KeyEvent
            return (8, None) if len(buf) >= 8 else None
        if kind == 5:  # PointerEvent
            return (6, None) if len(buf) >= 6 else None
        if kind == 6:  # ClientCutText: the user's paste into the VM, allowed
            if len(buf) < 8:
                return None
            length = abs(int.from_bytes(buf[4:8], "big", signed=True))
            return (8 + length, None) if len(buf) >= 8 + length else None
        if kind == 251:  # SetDesktopSize (ExtendedDesktopSize), noVNC's resizeSession
            if len(buf) < 8:
                return None
            size = 8 + 16 * buf[6]
            return (size, None) if len(buf) >= size else None
        raise RfbFilterError(f"client message type {kind}")


def _rfb_minor(version: bytes) -> int:
    if not version.startswith(b"RFB ") or version[-1:] != b"\n":
        raise RfbFilterError("not an RFB version")
    try:
        minor = int(version[8:11])
    except ValueError:
        raise RfbFilterError("not an RFB version") from None
    return 8 if minor >= 8 else 7 if minor == 7 else 3
