"""A sign-in's credentials: captured from the Browser VM, held encrypted, delivered to the CLI VM.

::

    (OAuth agent: completed) ─capture─► exchanging ─► transferring ─deliver─► completed
                                        tokens sealed (AES-GCM,         files written 0600 in a
                                        bound to the session id)        CLI VM proven alive, read
                                                                        back, then the seal dropped

The token response never reaches a log, an event or an API response: the session shows
``credential_meta`` (account, expiry, scopes) only.

**A CLI VM that is not usable at delivery is not a reason to fail.** The session's recorded CLI
VM may have died after the login, and whoever noticed first marked it ``failed``: the reconciler,
``vm_manager.ensure_cli_vm`` (for another caller) or the delivery's own liveness proof. In every
case the session's timeline says so (``auth.cli_vm_replaced``: "CLI workspace <id> is not usable
(<why>); preparing a new one", the reason taken from the VM row when someone else failed it), a
new CLI VM is prepared, and the credentials are delivered there.
"""

from __future__ import annotations

import json

from pydantic import JsonValue
from sqlalchemy import select

from remotecli.agent.client import AgentCallError, AgentFileNotFound
from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Event, Vm, utcnow
from remotecli.domain.states import VM_ENDING, VM_TERMINAL, AuthStatus, VmStatus
from remotecli.errors import AgentError, RemotecliError
from remotecli.profiles import ProviderProfile
from remotecli.services import vm_manager
from remotecli.services.providers import CredentialFile, merge_json_file, render_credentials
from remotecli.services.signin_state import (
    SessionFailure,
    cleanup_browser,
    move,
    principal_of,
    record,
    set_fields,
)

#: The timeline event saying that the session's CLI VM was skipped, and why.
CLI_VM_REPLACED = "auth.cli_vm_replaced"
_DELIVERY_ATTEMPTS = 3


def credential_aad(session_id: str) -> bytes:
    """Associated data binding a sealed token response to its session."""
    return f"credential:{session_id}".encode()


def seal(ctx: AppContext, session_id: str, token_response: dict[str, JsonValue]) -> bytes:
    return ctx.box.encrypt(json.dumps(token_response).encode(), credential_aad(session_id))


def _unseal(ctx: AppContext, auth: AuthSession) -> dict[str, JsonValue]:
    if auth.credential_enc is None:
        raise SessionFailure("exchange_interrupted", "no held credential to deliver")
    doc = json.loads(ctx.box.decrypt(auth.credential_enc, credential_aad(auth.id)))
    if not isinstance(doc, dict):
        raise SessionFailure("exchange_interrupted", "the held credential is not an object")
    return doc


def capture(ctx: AppContext, auth: AuthSession, profile: ProviderProfile,
            token_response: dict[str, JsonValue]) -> None:
    """Hold the token response encrypted, record its metadata, and move on to the transfer."""
    if not token_response.get("access_token"):
        raise SessionFailure("token_exchange_failed", "the token response had no access token")
    rendered = render_credentials(profile, token_response, utcnow())  # validates the shape before we hold it
    sealed = seal(ctx, auth.id, token_response)
    if auth.status == AuthStatus.AWAITING_USER.value:
        move(ctx, auth, AuthStatus.EXCHANGING, f"Finishing sign-in with {profile.display_name}")
    move(ctx, auth, AuthStatus.TRANSFERRING, credential_enc=sealed,
         credential_meta=json.loads(json.dumps(rendered.metadata, default=str)))
    cleanup_browser(ctx, auth)


def deliver(ctx: AppContext, auth: AuthSession, profile: ProviderProfile) -> None:
    """Write the credential files into a CLI VM proven alive, read them back, then forget them."""
    rendered = render_credentials(profile, _unseal(ctx, auth), utcnow())
    principal = principal_of(ctx, auth.user_id)
    written_off: set[str] = set()  # VMs this delivery already gave up on (and said so)
    for attempt in range(_DELIVERY_ATTEMPTS):
        cli_vm = _usable_cli_vm(ctx, auth, written_off)
        if cli_vm is None:
            try:
                cli_vm, _ = vm_manager.ensure_cli_vm(ctx, principal, session_id=auth.id)
            except RemotecliError as exc:
                if attempt == _DELIVERY_ATTEMPTS - 1:
                    raise SessionFailure("vm_boot_failed", exc.log_detail or exc.message) from exc
                continue
            set_fields(ctx, auth, cli_vm_id=cli_vm.id)
        try:
            _write_and_verify(ctx, cli_vm, rendered.files)
        except (AgentError, _VerifyFailed) as exc:
            if isinstance(exc, AgentCallError) and exc.agent_code == "no_space":
                # A full home is the same on every VM (it moves with the user): no retry, no new VM.
                record(ctx, auth, "auth.delivery_failed", f"Writing to {cli_vm.id} failed: the home is full",
                       vm_id=cli_vm.id, error="workspace_full")
                raise SessionFailure("workspace_full", f"no space left in the home of {cli_vm.id}") from exc
            record(ctx, auth, "auth.delivery_retry", f"Writing to {cli_vm.id} failed; retrying", vm_id=cli_vm.id,
                   error=exc.code if isinstance(exc, AgentError) else _VerifyFailed.code)
            vm_manager.fail_vm(ctx, cli_vm.id, "credential delivery failed", session_id=auth.id)
            written_off.add(cli_vm.id)
            continue
        record(ctx, auth, "auth.delivered",
               f"Credentials written to {cli_vm.id} ({len(rendered.files)} file(s), mode 0600) and read back",
               vm_id=cli_vm.id, files=[f.path for f in rendered.files])
        move(ctx, auth, AuthStatus.COMPLETED, f"Done: {profile.display_name} is signed in on your CLI workspace",
             credential_enc=None, delivered_at=utcnow(), cli_vm_id=cli_vm.id)
        return
    raise SessionFailure("delivery_failed", f"{_DELIVERY_ATTEMPTS} delivery attempts failed")


def _usable_cli_vm(ctx: AppContext, auth: AuthSession, written_off: set[str]) -> Vm | None:
    """The CLI VM to deliver to, proven alive: the session's own, else the user's live one; None
    when there is none (the caller prepares one). Every VM passed over is on the timeline."""
    recorded = _vm(ctx, auth.cli_vm_id) if auth.cli_vm_id else None
    if auth.cli_vm_id and (recorded is None or VmStatus(recorded.status) in VM_ENDING):
        # Someone else found it unusable first (the reconciler, or ensure_cli_vm for another caller).
        _written_off(ctx, auth, auth.cli_vm_id, _why_ended(recorded), written_off)
        recorded = None
    candidate = recorded or vm_manager.live_cli_vm(ctx, auth.user_id)
    if candidate is None:
        return None
    reason = vm_manager.prove_alive(ctx, candidate)
    if reason is None:
        return candidate
    _written_off(ctx, auth, candidate.id, reason, written_off)
    vm_manager.fail_vm(ctx, candidate.id, f"not usable for delivery: {reason}", session_id=auth.id)
    return None


def _vm(ctx: AppContext, vm_id: str) -> Vm | None:
    with ctx.db.read() as session:
        return session.get(Vm, vm_id)




def _why_ended(vm: Vm | None) -> str:
    """Why a CLI VM someone else ended is not usable, from its row (first line of its reason)."""
    if vm is None:
        return "its record is gone"
    reason = (vm.status_reason or "").splitlines()[0] if vm.status_reason else ""
    for prefix in ("not usable for delivery: ", "not usable: "):
        reason = reason.removeprefix(prefix)
    if VmStatus(vm.status) in VM_TERMINAL and reason:
        return f"it was marked {vm.status}: {reason}"
    return f"it is {vm.status}"


def _written_off(ctx: AppContext, auth: AuthSession, vm_id: str, reason: str, written_off: set[str]) -> None:
    """Say once on the session's timeline that its CLI VM ``vm_id`` is skipped, and why."""
    if vm_id in written_off or _already_said(ctx, auth.id, vm_id):
        written_off.add(vm_id)
        return
    written_off.add(vm_id)
    record(ctx, auth, CLI_VM_REPLACED, f"CLI workspace {vm_id} is not usable ({reason}); preparing a new one",
           vm_id=vm_id, reason=reason[:300])
    set_fields(ctx, auth, message="Your CLI workspace stopped unexpectedly; a new one is being prepared")


def _already_said(ctx: AppContext, session_id: str, vm_id: str) -> bool:
    """A worker that took the session over after a restart does not repeat the event."""
    with ctx.db.read() as session:
        return session.scalar(select(Event.id).where(
            Event.session_id == session_id, Event.kind == CLI_VM_REPLACED, Event.vm_id == vm_id,
        ).limit(1)) is not None


class _VerifyFailed(Exception):
    code = "verify_failed"


def _write_and_verify(ctx: AppContext, vm: Vm, files: list[CredentialFile]) -> None:
    user = ctx.settings.cli_guest_user
    home = ctx.settings.cli_guest_home.rstrip("/")
    agent = ctx.agent(vm)
    try:
        for item in files:
            path = f"{home}/{item.path.lstrip('/')}"
            content = item.content
            if item.merge_json:
                try:
                    existing: bytes | None = agent.read_file(path).data
                except AgentFileNotFound:
                    existing = None
                content = merge_json_file(existing, content, deep=item.deep_merge)
            agent.write_file(path, content, mode=item.mode, owner=user)
            back = agent.read_file(path)
            if back.data != content or (back.mode & 0o777) != item.mode or back.owner != user:
                raise _VerifyFailed()
    finally:
        agent.close()
