"""Transport-level checks on every request (ASGI middleware, HTTP and websockets):

- ``Strict-Transport-Security`` on every HTTPS response when the controller serves TLS itself
  (``--tls-cert``/``--tls-key``); behind a TLS proxy the proxy sets it.
- A request whose ``X-Forwarded-For`` was ignored (its peer is not a trusted proxy) is noted
  (services/forwarded.py: a log warning and ``doctor``'s ``reverse proxy`` check).
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from remotecli.config import Settings
from remotecli.services import forwarded

HSTS = "max-age=31536000"


class TransportSecurity:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.hsts = bool(settings.tls_cert)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = next((value.decode("latin-1") for name, value in scope.get("headers", [])
                       if name == b"x-forwarded-for"), None)
        if header is not None:
            client = scope.get("client")
            forwarded.note_request(self.settings, client[0] if client else None, header)
        if scope["type"] != "http" or not (self.hsts and scope.get("scheme") == "https"):
            await self.app(scope, receive, send)
            return

        async def send_with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("Strict-Transport-Security", HSTS)
            await send(message)

        await self.app(scope, receive, send_with_hsts)
