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
from collections.abc import Callable

from fastapi import APIRouter, Request, WebSocket
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from remotecli.agent.protocol import GuestPty, PtyData
from remotecli.api import ws_bridge
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


@router.post("/api/v1/vms/{vm_id}/terminal", response_model=TerminalTicketOut, responses=ERRORS)
def terminal_ticket(vm_id: str, request: Request, ctx: Ctx, principal: CurrentPrincipal) -> TerminalTicketOut:
    """A one-time websocket URL for a terminal in your own, running CLI VM."""
    _own_cli_vm(ctx, principal.user_id, vm_id)
    ticket = tickets.issue_ticket(ctx, principal, TICKET_KIND, vm_id)
    url = ws_bridge.ws_url(request, ctx.settings, f"/api/v1/vms/{vm_id}/terminal?token={ticket}")
    return TerminalTicketOut(url=url, vm_id=vm_id)


def _size(value: object, default: int) -> int:
    if not isinstance(value, str | int | float):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        return default
    return number if 1 <= number <= 1000 else default


class _Terminal:
    """The guest side of the terminal: a PTY; JSON text frames carry resize (in) and exit (out)."""

    def __init__(self, pty: GuestPty, close_agent: Callable[[], None]) -> None:
        self.pty = pty
        self.close_agent = close_agent
        self.exit_sent = False

    async def pump(self, send_bytes: ws_bridge.SendBytes, send_text: ws_bridge.SendText) -> None:
        while (event := await self.pty.read()) is not None:
            if isinstance(event, PtyData):
                await send_bytes(bytes(event.data))
                continue
            await send_text(json.dumps({"type": "exit", "code": event.code, "signal": event.signal}))
            self.exit_sent = True
            return

    async def from_browser(self, data: bytes) -> None:
        await self.pty.write(data[:MAX_INPUT_FRAME])

    async def control(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            return
        if isinstance(message, dict) and message.get("type") == "resize":
            with contextlib.suppress(ValueError):
                await self.pty.resize(_size(message.get("cols"), 80), _size(message.get("rows"), 24))

    async def close(self) -> None:
        try:
            await self.pty.close()
        finally:
            self.close_agent()

    def close_frame(self) -> tuple[int, str]:
        # 1000 after the shell exited; 4409 when the VM went away (the page ensures a VM and reconnects).
        return (1000, "exited") if self.exit_sent else (4409, "vm_not_answering")


@router.websocket("/api/v1/vms/{vm_id}/terminal")
async def terminal(websocket: WebSocket, vm_id: str, token: str = "", cols: str = "80", rows: str = "24") -> None:
    ctx: AppContext = websocket.app.state.ctx
    if not await ws_bridge.accept(websocket, ctx):
        return
    try:
        user_id = await run_in_threadpool(tickets.redeem_ticket, ctx, token, tickets.TERMINAL, vm_id)
        vm = await run_in_threadpool(_own_cli_vm, ctx, user_id, vm_id)
        agent = ctx.agent(vm)
        try:
            pty = await agent.open_pty(ctx.settings.cli_guest_user, _size(cols, 80), _size(rows, 24))
        except BaseException:
            agent.close()
            raise
    except RemotecliError as exc:
        # An agent that does not answer: the page ensures a (new) CLI VM and reconnects.
        code = 4409 if isinstance(exc, AgentError) else None
        await ws_bridge.refuse(websocket, exc, log, "terminal", code=code, extra={"vm_id": vm_id})
        return
    # An open terminal is use of the VM: it is not idle-stopped under the user (ADR 0011).
    keepalive = asyncio.create_task(_keep_active(ctx, vm_id))
    try:
        await ws_bridge.bridge(websocket, ctx, user_id, _Terminal(pty, agent.close), log, "terminal",
                               extra={"vm_id": vm_id})
    finally:
        keepalive.cancel()


async def _keep_active(ctx: AppContext, vm_id: str) -> None:
    """Mark the VM active now and then while its terminal is open (well within cli_vm_idle_stop_s)."""
    idle_s = ctx.settings.cli_vm_idle_stop_s
    every = min(60.0, idle_s / 4) if idle_s > 0 else 60.0
    while True:
        try:
            await run_in_threadpool(vm_manager.mark_active, ctx, vm_id)
        except Exception:
            log.warning("could not record terminal activity", extra={"vm_id": vm_id})
        await asyncio.sleep(every)
