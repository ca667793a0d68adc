"""Commands in a guest: ``exec_in_vm`` (services, the operator's CLI) and ``exec_api`` (the REST
API's checks and encoding around it), limited per user by ``_exec_slot``.

Running a command is *use* of a VM (services/access.py): only its owner may, admins included; the
operator's CLI (``principal=None``) may on any VM. The VM's row is read and changed only through
``services.vm_manager`` (a CLI VM stopped while idle is started there, the last use is recorded
there). Neither the arguments nor the output are logged or written to events.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from remotecli.agent.client import AgentCallError
from remotecli.agent.protocol import ExecResult
from remotecli.context import AppContext
from remotecli.domain.states import VmStatus, VmType
from remotecli.errors import InvalidInput, TooManyExecs, VmNotFound
from remotecli.logging import get_logger
from remotecli.services import access, vm_manager
from remotecli.services.users import Principal

MODULE = "vm-exec"
log = get_logger(MODULE)

_exec_slots: dict[str, int] = {}
_exec_slots_lock = threading.Lock()


@contextlib.contextmanager
def _exec_slot(ctx: AppContext, principal: Principal | None) -> Iterator[None]:
    """At most ``max_concurrent_execs_per_user`` commands at once per user (each holds a worker
    thread for up to its timeout), per controller process. The operator's CLI is not limited."""
    if principal is None:
        yield
        return
    with _exec_slots_lock:
        running = _exec_slots.get(principal.user_id, 0)
        if running >= ctx.settings.max_concurrent_execs_per_user:
            raise TooManyExecs(log_detail=f"user {principal.user_id}: {running} commands running")
        _exec_slots[principal.user_id] = running + 1
    try:
        yield
    finally:
        with _exec_slots_lock:
            left = _exec_slots.get(principal.user_id, 1) - 1
            if left > 0:
                _exec_slots[principal.user_id] = left
            else:
                _exec_slots.pop(principal.user_id, None)


def exec_api(
    ctx: AppContext,
    principal: Principal | None,
    vm_id: str,
    argv: list[str],
    *,
    timeout_s: float,
    user: str | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    stdin_b64: str | None = None,
) -> dict[str, Any]:
    """``exec_in_vm`` for the REST API: checks the request against the settings, decodes stdin,
    and returns the result as text plus exact base64 bytes."""
    if any("\x00" in part for part in [*argv, *(env or {}), *(env or {}).values(), cwd or ""]):
        raise InvalidInput("Arguments, environment and working directory may not contain NUL characters.")
    stdin: bytes | None = None
    if stdin_b64 is not None:
        try:
            stdin = base64.b64decode(stdin_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("stdin_b64 is not valid base64.") from None
    result = exec_in_vm(ctx, principal, vm_id, argv, timeout_s=timeout_s, user=user, env=env, cwd=cwd, stdin=stdin)
    return {
        "exit_code": result.exit_code,
        "stdout": result.stdout.decode("utf-8", errors="replace"),
        "stderr": result.stderr.decode("utf-8", errors="replace"),
        "stdout_b64": base64.b64encode(result.stdout).decode("ascii"),
        "stderr_b64": base64.b64encode(result.stderr).decode("ascii"),
        "timed_out": result.timed_out,
        "duration_s": result.duration_s,
        "signal": result.signal,
        "stdout_truncated": result.stdout_truncated,
        "stderr_truncated": result.stderr_truncated,
    }


def exec_in_vm(
    ctx: AppContext,
    principal: Principal | None,
    vm_id: str,
    argv: list[str],
    *,
    timeout_s: float = 60.0,
    user: str | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stdin: bytes | None = None,
) -> ExecResult:
    """Run ``argv`` in the guest through its agent and wait; returns the agent's ``ExecResult``.

    Running a command is *use* of the VM (services/access.py): only its owner may, admins
    included; the operator's CLI (``principal=None``) may on any VM. Neither the arguments nor the
    output are logged or written to events (either may hold the user's secrets).
    """
    if not argv:
        raise InvalidInput("Give a command to run.")
    vm = vm_manager.get_vm(ctx, principal, vm_id)
    if principal is not None:
        access.ensure_own(principal.user_id, vm.user_id, VmNotFound())
    if (vm.vm_type == VmType.CLI.value and vm.status == VmStatus.STOPPED.value
            and (vm.status_reason or "").startswith(vm_manager.IDLE_STOP_REASON)):
        vm_manager.start_vm(ctx, None, vm.id)  # a CLI VM stopped while idle starts again on its next use
    vm = vm_manager.require_running(ctx, principal, vm_id)  # refuses an ended VM (VmTerminal) too
    vm_manager.mark_active(ctx, vm.id)
    with _exec_slot(ctx, principal):
        started = time.monotonic()
        agent = ctx.agent(vm, timeout=timeout_s + 10)
        try:
            result = agent.exec(argv, timeout_s=timeout_s, user=user, env=env, cwd=cwd, stdin=stdin)
        except AgentCallError as exc:
            if exc.status == 400:  # the guest refused it: no such program, user or directory
                raise InvalidInput(f"The guest could not run the command: {exc.agent_message}") from None
            raise
        finally:
            agent.close()
    log.info("exec in guest: exit %s after %.1f s", result.exit_code, time.monotonic() - started,
             extra={"vm_id": vm.id, "user_id": principal.user_id if principal else None})
    return result
