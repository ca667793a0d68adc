"""The web terminal: a websocket bridged to a PTY in the user's own CLI VM.

``POST /api/v1/vms/{id}/terminal`` hands out a one-time ticket (kind ``terminal``) in a websocket
URL; ``/api/v1/vms/{id}/terminal?token=&cols=&rows=`` redeems it and bridges:

- browser → controller: binary frames are keyboard input; text frames are JSON control messages,
  ``{"type": "resize", "cols": N, "rows": N}``;
- controller → browser: binary frames are terminal output; a text frame
  ``{"type": "exit", "code": N, "signal": S}`` when the shell ends (then the socket closes 1000).

Only the VM's owner gets a terminal (admins included: an admin sees every VM, but a shell in
someone else's workspace is not a dashboard feature). Errors close the socket with 4401 (ticket),
4404 (no such VM), 4409 (the VM is not running: ensure it and reconnect) or 1011, reason = code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import APIRouter, Request, WebSocket
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from remotecli.api import ws_access
from remotecli.api.deps import Ctx, CurrentPrincipal
from remotecli.api.schemas import ErrorOut
from remotecli.context import AppContext
from remotecli.db.models import Vm
from remotecli.domain.states import VmStatus, VmType
from remotecli.errors import AgentError, RemotecliError, VmNotFound, VmNotRunning
from remotecli.logging import get_logger
from remotecli.services import access, tickets, vm_manager

router = APIRouter(tags=["terminal"])
log = get_logger("terminal")

ERRORS: dict[int | str, dict[str, object]] = {code: {"model": ErrorOut} for code in (401, 403, 404, 409)}
TICKET_KIND = "terminal"
MAX_INPUT_FRAME = 64 * 1024


class TerminalTicketOut(BaseModel):
    url: str = Field(description="Websocket URL of the terminal, with a one-time ticket (valid briefly)")
    vm_id: str


def _own_cli_vm(ctx: AppContext, user_id: str, vm_id: str) -> Vm:
    """The user's own CLI VM, running; ``VmNotFound`` / ``VmNotRunning`` otherwise."""
    vm = vm_manager.get_vm(ctx, None, vm_id)
    access.ensure_own(user_id, vm.user_id, VmNotFound())
    if vm.vm_type != VmType.CLI.value:
        raise VmNotFound()
    if vm.status != VmStatus.RUNNING.value:
        raise VmNotRunning("Your CLI workspace is not running; it is being prepared again.")
    return vm


def _ws_base(request: Request) -> str:
    base = str(request.base_url).rstrip("/")
    return "wss" + base[len("https"):] if base.startswith("https") else "ws" + base[len("http"):]


@router.post("/api/v1/vms/{vm_id}/terminal", response_model=TerminalTicketOut, responses=ERRORS)
def terminal_ticket(vm_id: str, request: Request, ctx: Ctx, principal: CurrentPrincipal) -> TerminalTicketOut:
    """A one-time websocket URL for a terminal in your own, running CLI VM."""
    _own_cli_vm(ctx, principal.user_id, vm_id)
    ticket = tickets.issue_ticket(ctx, principal, TICKET_KIND, vm_id)
    return TerminalTicketOut(url=f"{_ws_base(request)}/api/v1/vms/{vm_id}/terminal?token={ticket}", vm_id=vm_id)


def _size(value: Any, default: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return default
    return number if 1 <= number <= 1000 else default


@router.websocket("/api/v1/vms/{vm_id}/terminal")
async def terminal(websocket: WebSocket, vm_id: str, token: str = "", cols: str = "80", rows: str = "24") -> None:
    ctx: AppContext = websocket.app.state.ctx
    await websocket.accept()
    try:
        user_id = await run_in_threadpool(tickets.redeem_ticket, ctx, token, TICKET_KIND, vm_id)
        vm = await run_in_threadpool(_own_cli_vm, ctx, user_id, vm_id)
        agent = ctx.agent(vm)
        pty = await agent.open_pty(ctx.settings.cli_guest_user, _size(cols, 80), _size(rows, 24))
    except RemotecliError as exc:
        code = {401: 4401, 404: 4404, 409: 4409}.get(exc.http_status, 1011)
        if isinstance(exc, AgentError):
            code = 4409  # the VM does not answer: the page ensures a (new) CLI VM and reconnects
        log.info("terminal refused: %s", exc.code, extra={"vm_id": vm_id})
        await websocket.close(code=code, reason=exc.code)
        return
    log.info("terminal opened", extra={"vm_id": vm_id, "user_id": user_id})
    exit_sent = False

    async def guest_to_browser() -> None:
        nonlocal exit_sent
        while True:
            event = await pty.read()
            if event is None:
                return
            data = getattr(event, "data", None)
            if isinstance(data, bytes | bytearray):
                await websocket.send_bytes(bytes(data))
            else:
                await websocket.send_text(json.dumps({"type": "exit", "code": getattr(event, "code", None),
                                                      "signal": getattr(event, "signal", None)}))
                exit_sent = True
                return

    async def browser_to_guest() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is not None:
                if data:
                    await pty.write(data[:MAX_INPUT_FRAME])
                continue
            text = message.get("text")
            if text is None:
                continue
            try:
                control = json.loads(text)
            except ValueError:
                continue
            if isinstance(control, dict) and control.get("type") == "resize":
                with contextlib.suppress(ValueError):
                    await pty.resize(_size(control.get("cols"), 80), _size(control.get("rows"), 24))

    watch = asyncio.create_task(ws_access.until_access_ends(ctx, user_id))
    tasks = [asyncio.create_task(guest_to_browser()), asyncio.create_task(browser_to_guest()), watch]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if watch in done:
            log.info("terminal closed: user disabled", extra={"vm_id": vm_id, "user_id": user_id})
            with contextlib.suppress(Exception):
                await websocket.close(code=ws_access.CLOSE_CODE, reason=ws_access.REASON)
        for task in done:
            failure = None if task.cancelled() else task.exception()
            if failure is not None and not isinstance(failure, WebSocketDisconnect | ConnectionError | AgentError):
                log.warning("terminal bridge ended: %s", type(failure).__name__, extra={"vm_id": vm_id})
    finally:
        for task in tasks:
            task.cancel()
        await pty.close()
        close = getattr(agent, "close", None)
        if callable(close):
            close()
        if websocket.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                # 1000 after the shell exited; 4409 when the VM went away (the page reconnects).
                await websocket.close(code=1000 if exit_sent else 4409,
                                      reason="exited" if exit_sent else "vm_not_answering")
        log.info("terminal closed", extra={"vm_id": vm_id})
