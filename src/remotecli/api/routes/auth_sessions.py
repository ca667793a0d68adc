"""/api/v1/auth-sessions and /api/v1/providers: thin routes over ``services.auth_flow``."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Request, WebSocket, status
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from remotecli.api import ws_access
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
from remotecli.db.models import AuthSession
from remotecli.errors import RemotecliError
from remotecli.logging import get_logger
from remotecli.services import auth_flow, tickets
from remotecli.services.users import Principal

router = APIRouter(tags=["auth-sessions"])
log = get_logger("vnc-proxy")

ERRORS: dict[int | str, dict[str, object]] = {code: {"model": ErrorOut} for code in (400, 401, 404, 409, 422, 429)}


def _out(ctx: AppContext, request: Request, principal: Principal, auth: AuthSession) -> AuthSessionOut:
    vnc_url = None
    ticket = tickets.vnc_ticket(ctx, principal, auth)
    if ticket:
        base = str(request.base_url).rstrip("/")
        ws_base = "wss" + base[len("https"):] if base.startswith("https") else "ws" + base[len("http"):]
        vnc_url = f"{ws_base}/api/v1/auth-sessions/{auth.id}/vnc?token={ticket}"
    return AuthSessionOut.of(auth, ctx.providers.display_name(auth.provider), vnc_url)


@router.get("/api/v1/providers", response_model=ProviderListOut, responses=ERRORS)
def list_providers(ctx: Ctx, principal: CurrentPrincipal) -> ProviderListOut:
    """Providers a user can sign in to (their profiles, without client secrets)."""
    return ProviderListOut(items=[ProviderOut.of(name, profile) for name, profile in sorted(ctx.providers.items())])


@router.post("/api/v1/auth-sessions", response_model=AuthSessionOut, status_code=status.HTTP_201_CREATED,
             responses=ERRORS)
def create_auth_session(body: AuthSessionCreateIn, request: Request, ctx: Ctx,
                        principal: CurrentPrincipal) -> AuthSessionOut:
    """Start signing in to ``provider``: poll the returned session until it is ``completed``."""
    auth = auth_flow.start_session(ctx, principal, body.provider)
    return _out(ctx, request, principal, auth)


@router.get("/api/v1/auth-sessions", response_model=AuthSessionListOut, responses=ERRORS)
def list_auth_sessions(
    request: Request, ctx: Ctx, principal: CurrentPrincipal, all: bool = False
) -> AuthSessionListOut:
    sessions = auth_flow.list_sessions(ctx, principal, all_users=all)
    return AuthSessionListOut(items=[AuthSessionOut.of(s, s.provider, None) for s in sessions])


@router.get("/api/v1/auth-sessions/{session_id}", response_model=AuthSessionOut, responses=ERRORS)
def get_auth_session(session_id: str, request: Request, ctx: Ctx, principal: CurrentPrincipal) -> AuthSessionOut:
    """Status, a message in words, ``vnc_url`` while the user must log in, credential metadata when done."""
    return _out(ctx, request, principal, auth_flow.get_session(ctx, principal, session_id))


@router.get("/api/v1/auth-sessions/{session_id}/events", response_model=EventListOut, responses=ERRORS)
def get_auth_session_events(session_id: str, ctx: Ctx, principal: CurrentPrincipal) -> EventListOut:
    """The session's timeline (its events and those of the VMs it used)."""
    return EventListOut(items=[EventOut.of(e) for e in auth_flow.session_events(ctx, principal, session_id)])


@router.delete("/api/v1/auth-sessions/{session_id}", response_model=AuthSessionOut, responses=ERRORS)
def cancel_auth_session(session_id: str, request: Request, ctx: Ctx, principal: CurrentPrincipal) -> AuthSessionOut:
    """Cancel the sign-in; its Browser VM is destroyed."""
    return _out(ctx, request, principal, auth_flow.cancel_session(ctx, principal, session_id))


@router.websocket("/api/v1/auth-sessions/{session_id}/vnc")
async def vnc_proxy(websocket: WebSocket, session_id: str, token: str = "") -> None:
    """RFB over binary websocket frames (what noVNC speaks), bridged to the Browser VM's VNC server.

    ``token`` is the one-time ticket from ``vnc_url``. Errors close the socket with code 4401
    (ticket), 4404 (session), 4409 (session not awaiting the user) or 1011, reason = error code.
    """
    ctx: AppContext = websocket.app.state.ctx
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol="binary" if "binary" in offered else None)
    try:
        user_id = await run_in_threadpool(tickets.redeem_ticket, ctx, token, "vnc", session_id)
        vm = await run_in_threadpool(tickets.vnc_target, ctx, user_id, session_id)
        agent = ctx.agent(vm)
        reader, writer = await agent.open_tcp(ctx.settings.browser_vnc_port)
    except RemotecliError as exc:
        code = {401: 4401, 404: 4404, 409: 4409}.get(exc.http_status, 1011)
        await websocket.close(code=code, reason=exc.code)
        return
    log.info("VNC view opened", extra={"session_id": session_id, "user_id": user_id, "vm_id": vm.id})

    async def guest_to_browser() -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            await websocket.send_bytes(data)

    async def browser_to_guest() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None and message.get("text") is not None:
                data = message["text"].encode("latin-1")
            if data:
                writer.write(data)
                await writer.drain()

    watch = asyncio.create_task(ws_access.until_access_ends(ctx, user_id))
    tasks = [asyncio.create_task(guest_to_browser()), asyncio.create_task(browser_to_guest()), watch]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if watch in done:
            log.info("VNC view closed: user disabled", extra={"session_id": session_id, "user_id": user_id})
            with contextlib.suppress(Exception):
                await websocket.close(code=ws_access.CLOSE_CODE, reason=ws_access.REASON)
    except (WebSocketDisconnect, ConnectionError):
        pass
    finally:
        for task in tasks:
            task.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await websocket.close()
        log.info("VNC view closed", extra={"session_id": session_id})
