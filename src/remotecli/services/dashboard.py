"""What the dashboard shows a user about their own things, read from the records.

Facts only (rows, flags, times): the wording and the step logic stay in ``web/views.py``. Every
function acts for the principal on their own objects: the dashboard never lists another user's
VMs or sign-ins, admins included (the admin page is ``services/admin.py``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Event, Vm, Volume, utcnow
from remotecli.domain.states import AUTH_TERMINAL, AuthStatus, VmStatus, VmType, VolumeStatus
from remotecli.services import auth_flow, vm_manager, workspaces
from remotecli.services.auth_session_view import AuthSessionOut, session_out
from remotecli.services.users import Principal


def own(principal: Principal) -> Principal:
    """The principal as the dashboard uses it: on their own objects only, admins included."""
    return Principal(principal.user_id, principal.name, False)


@dataclass(frozen=True)
class ProviderChoice:
    name: str
    display_name: str


def provider_choices(ctx: AppContext) -> list[ProviderChoice]:
    """The providers a user can sign in to, by id."""
    return [ProviderChoice(name, profile.display_name) for name, profile in sorted(ctx.providers.items())]


# ----------------------------------------------------------------------------------------------
# My VMs and my CLI credentials


@dataclass(frozen=True)
class CompletedSignIn:
    """A provider's newest completed sign-in (its credential metadata, never the credential)."""

    credential_meta: dict[str, Any]
    signed_in_at: dt.datetime
    on_live_cli_vm: bool  # delivered into the home the user's CLI VMs have now (the same volume)


@dataclass(frozen=True)
class ProviderSignIn:
    provider: str
    display_name: str
    completed: CompletedSignIn | None
    live_session_id: str  # a sign-in still in progress, '' if none


@dataclass(frozen=True)
class DashboardOverview:
    vms: list[Vm]  # not removed, newest first
    hidden_vms: int  # removed VMs not shown
    sign_ins: list[ProviderSignIn]  # one per provider, by provider id


def overview(ctx: AppContext, principal: Principal, now: dt.datetime | None = None) -> DashboardOverview:
    now = now or utcnow()
    vms = vm_manager.list_vms(ctx, own(principal))
    shown = [vm for vm in vms if vm.status != VmStatus.DESTROYED.value]
    return DashboardOverview(vms=shown, hidden_vms=len(vms) - len(shown),
                             sign_ins=provider_sign_ins(ctx, principal.user_id, now))


def provider_sign_ins(ctx: AppContext, user_id: str, now: dt.datetime | None = None) -> list[ProviderSignIn]:
    """For each provider: the user's newest completed sign-in (and whether its CLI VM is the live
    one) and a sign-in still in progress."""
    now = now or utcnow()
    with ctx.db.read() as session:
        sessions = list(session.scalars(
            select(AuthSession).where(AuthSession.user_id == user_id).order_by(AuthSession.created_at.desc())
        ))
        # The CLIs' files are written into the user's home volume, which every CLI VM of the user
        # gets (ADR 0011): a sign-in delivered after today's home was made is still in it, whatever
        # VM replaced, rebuilt or stopped meanwhile. One delivered before it (to a VM without a
        # home, or to a home since purged) is gone.
        home_since = session.scalar(select(Volume.created_at).where(
            Volume.user_id == user_id,
            Volume.status.in_([VolumeStatus.AVAILABLE.value, VolumeStatus.ATTACHED.value]),
        ))
    rows = []
    for name, profile in sorted(ctx.providers.items()):
        mine = [s for s in sessions if s.provider == name]
        done = next((s for s in mine if s.status == AuthStatus.COMPLETED.value), None)
        live = next((s for s in mine if AuthStatus(s.status) not in AUTH_TERMINAL
                     and (s.expires_at is None or s.expires_at > now)), None)
        completed = None if done is None else CompletedSignIn(
            credential_meta=dict(done.credential_meta or {}),
            signed_in_at=done.delivered_at or done.updated_at,
            on_live_cli_vm=home_since is not None and (done.delivered_at or done.updated_at) >= home_since,
        )
        rows.append(ProviderSignIn(provider=name, display_name=profile.display_name, completed=completed,
                                   live_session_id=live.id if live is not None else ""))
    return rows


# ----------------------------------------------------------------------------------------------
# My workspace (the home volume, ADR 0011) and what the terminal page is waiting for




def _idle_stopped(vm: Vm | None) -> bool:
    return (vm is not None and vm.status == VmStatus.STOPPED.value
            and (vm.status_reason or "").startswith(vm_manager.IDLE_STOP_REASON))


@dataclass(frozen=True)
class WorkspaceSummary:
    """The user's home volume, how full it is, and the CLI VM it goes with (facts, no words)."""

    volume_status: str
    volume_reason: str | None
    used_bytes: int | None  # from the guest while its VM runs; None otherwise
    total_bytes: int | None
    vm_status: str | None  # the live CLI VM's status; None when there is none
    idle_stopped: bool  # that VM was stopped by the idle timer (its next use starts it)


def workspace(ctx: AppContext, principal: Principal) -> WorkspaceSummary | None:
    """The user's workspace (``services.workspaces.my_workspace``, as ``GET /api/v1/workspace``);
    None before their first CLI VM."""
    from remotecli.errors import WorkspaceNotFound

    try:
        view, usage = workspaces.my_workspace(ctx, principal.user_id)
    except WorkspaceNotFound:
        return None
    vm = vm_manager.live_cli_vm(ctx, principal.user_id)
    return WorkspaceSummary(volume_status=view.status, volume_reason=view.status_reason,
                            used_bytes=usage.used_bytes, total_bytes=usage.total_bytes,
                            vm_status=vm.status if vm is not None else None, idle_stopped=_idle_stopped(vm))


@dataclass(frozen=True)
class TerminalState:
    """What connecting the terminal will do first (the terminal page says it in words).

    ``phase``: ``create`` (no live CLI VM: ``ensure`` makes one), ``start`` (the CLI VM is stopped,
    paused or starting: ``ensure`` starts it), ``connect`` (it runs)."""

    phase: str
    has_home: bool  # a home volume exists: a new VM comes with the user's files
    idle_stopped: bool


def terminal_state(ctx: AppContext, principal: Principal) -> TerminalState:
    vm = vm_manager.live_cli_vm(ctx, principal.user_id)
    has_home = workspaces.user_volume(ctx, principal.user_id) is not None
    if vm is None or vm.status == VmStatus.CREATING.value:
        phase = "create"
    elif vm.status == VmStatus.RUNNING.value:
        phase = "connect"
    else:
        phase = "start"
    return TerminalState(phase=phase, has_home=has_home, idle_stopped=_idle_stopped(vm))


# ----------------------------------------------------------------------------------------------
# The sign-in page


@dataclass(frozen=True)
class SignInPage:
    session: AuthSessionOut | None  # the one asked for, if any
    live: list[AuthSession]  # the user's other sign-ins in progress
    providers: list[ProviderChoice]


def sign_in_page(ctx: AppContext, principal: Principal, session_id: str = "") -> SignInPage:
    """The sign-in page: the session ``session_id`` (``AuthSessionNotFound`` if it is not the
    user's), the user's other live sign-ins, the providers."""
    me = own(principal)
    auth = session_out(ctx, auth_flow.get_session(ctx, me, session_id)) if session_id else None
    live = [s for s in auth_flow.list_sessions(ctx, me, limit=20)
            if AuthStatus(s.status) not in AUTH_TERMINAL and s.id != session_id]
    return SignInPage(session=auth, live=live, providers=provider_choices(ctx))


@dataclass(frozen=True)
class SignInState:
    """What the sign-in page polls: the session (as the API shows it, without a VNC ticket) and
    what its steps depend on."""

    session: AuthSessionOut
    terminal: bool
    cli_ready: bool  # a CLI VM of the user's runs (the session's own, or another one)
    ended_from: str | None  # for an ended session: the status it left
    expires_at: dt.datetime | None
    browser_ready: bool = False  # the session's Browser VM runs (a warm pool VM: from the start)


def sign_in_state(ctx: AppContext, principal: Principal, session_id: str) -> SignInState:
    auth = auth_flow.get_session(ctx, own(principal), session_id)
    terminal = AuthStatus(auth.status) in AUTH_TERMINAL
    with ctx.db.read() as session:
        cli_ready = False
        if auth.cli_vm_id:
            vm = session.get(Vm, auth.cli_vm_id)
            cli_ready = vm is not None and vm.status == VmStatus.RUNNING.value
        if not cli_ready:
            running = session.scalars(select(Vm).where(
                Vm.user_id == auth.user_id, Vm.vm_type == VmType.CLI.value, Vm.status == VmStatus.RUNNING.value,
            )).first()
            cli_ready = running is not None
        browser_ready = False
        if auth.browser_vm_id:
            browser = session.get(Vm, auth.browser_vm_id)
            browser_ready = browser is not None and browser.status == VmStatus.RUNNING.value
        ended_from = None
        if terminal:
            ended_from = session.scalars(
                select(Event.from_status).where(Event.session_id == auth.id, Event.to_status == auth.status)
                .order_by(Event.id.desc()).limit(1)
            ).first()
    return SignInState(session=session_out(ctx, auth), terminal=terminal, cli_ready=cli_ready,
                       ended_from=ended_from, expires_at=auth.expires_at, browser_ready=browser_ready)
