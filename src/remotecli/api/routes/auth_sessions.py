"""/api/v1/auth-sessions and /api/v1/providers: thin routes over ``services.auth_flow``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Query, Request, WebSocket, status
from starlette.concurrency import run_in_threadpool

from remotecli.api import ws_bridge
from remotecli.api.deps import Ctx, CurrentPrincipal
from remotecli.api.schemas import (
    AuthSessionCreateIn,
    AuthSessionListOut,
    AuthSessionOut,
    ErrorOut,
    EventListOut,
    EventOut,
    ProviderListOut,
    ProviderOut,
)
from remotecli.context import AppContext
from remotecli.errors import RemotecliError
from remotecli.logging import get_logger
from remotecli.services import auth_flow, provider_drift, tickets
from remotecli.services.auth_session_view import session_out

router = APIRouter(tags=["auth-sessions"])
log = get_logger("vnc-proxy")

ERRORS: dict[int | str, dict[str, object]] = {code: {"model": ErrorOut} for code in (400, 401, 404, 409, 422, 429)}


@router.get("/api/v1/providers", response_model=ProviderListOut, responses=ERRORS)
def list_providers(ctx: Ctx, principal: CurrentPrincipal) -> ProviderListOut:
    """Providers a user can sign in to (their profiles, without client secrets), with the OAuth
    constants of the CLI in the cli image and every difference from them (provider_drift)."""
    clis, found = provider_drift.installed_differences(ctx.settings, effective=dict(ctx.providers))
    return ProviderListOut(items=[ProviderOut.of(name, profile, (clis or {}).get(name), found)
                                  for name, profile in sorted(ctx.providers.items())])


@router.post("/api/v1/auth-sessions", response_model=AuthSessionOut, status_code=status.HTTP_201_CREATED,
             responses=ERRORS)
def create_auth_session(body: AuthSessionCreateIn, request: Request, ctx: Ctx,
                        principal: CurrentPrincipal) -> AuthSessionOut:
    """Start signing in to ``provider``: poll the returned session until it is ``completed``."""
    auth = auth_flow.start_session(ctx, principal, body.provider)
    return session_out(ctx, auth)


@router.get("/api/v1/auth-sessions", response_model=AuthSessionListOut, responses=ERRORS)
def list_auth_sessions(
    request: Request, ctx: Ctx, principal: CurrentPrincipal, all: bool = False
) -> AuthSessionListOut:
    sessions = auth_flow.list_sessions(ctx, principal, all_users=all)
    return AuthSessionListOut(items=[AuthSessionOut.of(s, s.provider, None) for s in sessions])


@router.get("/api/v1/auth-sessions/{session_id}", response_model=AuthSessionOut, responses=ERRORS)
def get_auth_session(session_id: str, request: Request, ctx: Ctx, principal: CurrentPrincipal,
                     vnc: Annotated[bool, Query(description="Also issue a one-time vnc_url (for the session's "
                                                            "owner, while it awaits the user)")] = False,
                     ) -> AuthSessionOut:
    """Status, a message in words, credential metadata when done; with ``?vnc=1``, while the user must
    log in, a one-time ``vnc_url`` for the login screen. A plain status poll issues no ticket."""
    auth = auth_flow.get_session(ctx, principal, session_id)
    ticket = tickets.vnc_ticket(ctx, principal, auth) if vnc else None
    if ticket is None:
        return session_out(ctx, auth)
    return session_out(ctx, auth, ws_bridge.ws_url(request, ctx.settings,
                                                   f"/api/v1/auth-sessions/{auth.id}/vnc?token={ticket}"))


@router.get("/api/v1/auth-sessions/{session_id}/events", response_model=EventListOut, responses=ERRORS)
def get_auth_session_events(session_id: str, ctx: Ctx, principal: CurrentPrincipal) -> EventListOut:
    """The session's timeline (its events and those of the VMs it used)."""
    return EventListOut(items=[EventOut.of(e) for e in auth_flow.session_events(ctx, principal, session_id)])


@router.delete("/api/v1/auth-sessions/{session_id}", response_model=AuthSessionOut, responses=ERRORS)
def cancel_auth_session(session_id: str, request: Request, ctx: Ctx, principal: CurrentPrincipal) -> AuthSessionOut:
    """Cancel the sign-in; its Browser VM is destroyed."""
    return session_out(ctx, auth_flow.cancel_session(ctx, principal, session_id))


class _VncView:
    """The guest side of the VNC view: a TCP stream to the Browser VM's VNC server, bytes both ways.
    Unless ``clipboard_out``, the guest's clipboard text is dropped on the way (``RfbClipboardFilter``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, close_agent: Callable[[], None],
                 *, clipboard_out: bool = False):
        self.reader = reader
        self.writer = writer
        self.close_agent = close_agent
        self.rfb = None if clipboard_out else ws_bridge.RfbClipboardFilter()

    async def pump(self, send_bytes: ws_bridge.SendBytes, send_text: ws_bridge.SendText) -> None:
        while data := await self.reader.read(65536):
            if self.rfb is not None:
                data = self.rfb.from_server(data)
            if data:
                await send_bytes(data)

    async def from_browser(self, data: bytes) -> None:
        if self.rfb is not None:
            data = self.rfb.from_client(data)
        self.writer.write(data)
        await self.writer.drain()

    async def control(self, text: str) -> None:
        await self.from_browser(text.encode("latin-1"))  # RFB is binary; a text frame is taken as its bytes

    async def close(self) -> None:
        self.writer.close()
        self.close_agent()

    def close_frame(self) -> tuple[int, str]:
        return 1000, ""


@router.websocket("/api/v1/auth-sessions/{session_id}/vnc")
async def vnc_proxy(websocket: WebSocket, session_id: str, token: str = "") -> None:
    """RFB over binary websocket frames (what noVNC speaks), bridged to the Browser VM's VNC server.

    ``token`` is the one-time ticket from ``vnc_url``. Errors close the socket with code 4401
    (ticket), 4404 (session), 4409 (session not awaiting the user) or 1011, reason = error code;
    a page of another site (``Origin``) is refused with 4403 (see ``api/ws_bridge.py``).
    """
    ctx: AppContext = websocket.app.state.ctx
    if not await ws_bridge.accept(websocket, ctx, subprotocols=("binary",)):
        return
    extra = {"session_id": session_id}
    try:
        user_id = await run_in_threadpool(tickets.redeem_ticket, ctx, token, tickets.VNC, session_id)
        vm = await run_in_threadpool(tickets.vnc_target, ctx, user_id, session_id)
        agent = ctx.agent(vm)
        try:
            reader, writer = await agent.open_tcp(ctx.settings.browser_vnc_port)
        except BaseException:
            agent.close()
            raise
    except RemotecliError as exc:
        await ws_bridge.refuse(websocket, exc, log, "VNC view", extra=extra)
        return
    view = _VncView(reader, writer, agent.close, clipboard_out=ctx.settings.browser_clipboard_out)
    await ws_bridge.bridge(websocket, ctx, user_id, view, log, "VNC view",
                           extra={**extra, "vm_id": vm.id})
