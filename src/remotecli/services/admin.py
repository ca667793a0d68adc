"""What an operator sees on the admin page: every VM, sign-in and user, filtered; one object's
timeline; what the garbage collector would do now.

Read-only. Each function takes the caller's principal and refuses anyone but an admin
(``PermissionDenied``), so the page's own check is not the only one. Results are plain
dataclasses (rows stay ORM objects, detached, read-only): no query is built outside this module.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import select

from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Event, User, UserIdentity, Vm
from remotecli.domain.states import AuthStatus, VmStatus, VmType
from remotecli.errors import PermissionDenied
from remotecli.logging import get_logger
from remotecli.services import auth_flow, capacity, vm_manager
from remotecli.services.users import Principal

log = get_logger("admin")

#: How many VMs and sign-ins the admin page lists at most (newest first).
LIST_LIMIT = 200


def _ensure_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise PermissionDenied("This page is for operators with the admin role.")


# ----------------------------------------------------------------------------------------------
# The overview


@dataclass(frozen=True)
class AdminFilters:
    """The admin page's filters, as typed in the query string ('' = any). Unknown values of
    ``vm_type``, ``status`` and ``session_status`` filter nothing."""

    user: str = ""
    vm_type: str = ""
    status: str = ""
    provider: str = ""
    session_status: str = ""
    ended: str = ""  # "1": include removed VMs


@dataclass(frozen=True)
class UserSummary:
    """A user as the admin page lists them (no password hash, only whether one is set)."""

    id: str
    name: str
    is_admin: bool
    disabled: bool
    has_password: bool
    has_sso: bool
    created_at: dt.datetime


@dataclass(frozen=True)
class AdminOverview:
    users: list[UserSummary]
    names: dict[str, str]  # user id -> name, for every user
    vms: list[Vm]
    sessions: list[AuthSession]
    capacity: capacity.CapacityUsage  # the host's memory and vCPUs: held by live VMs and free


def overview(ctx: AppContext, principal: Principal, filters: AdminFilters) -> AdminOverview:
    """Every user; the newest VMs and sign-in sessions that match ``filters`` (removed VMs only
    when asked for, or when their status is the filter)."""
    _ensure_admin(principal)
    with ctx.db.read() as db:
        users = list(db.scalars(select(User).order_by(User.name)))
        sso_users = set(db.scalars(select(UserIdentity.user_id)))
        user_id = next((u.id for u in users if u.name == filters.user), None) if filters.user else None
        vm_stmt = select(Vm).order_by(Vm.created_at.desc()).limit(LIST_LIMIT)
        session_stmt = select(AuthSession).order_by(AuthSession.created_at.desc()).limit(LIST_LIMIT)
        if filters.user:
            vm_stmt = vm_stmt.where(Vm.user_id == (user_id or ""))
            session_stmt = session_stmt.where(AuthSession.user_id == (user_id or ""))
        if filters.vm_type in (VmType.CLI.value, VmType.BROWSER.value):
            vm_stmt = vm_stmt.where(Vm.vm_type == filters.vm_type)
        if filters.status in {s.value for s in VmStatus}:
            vm_stmt = vm_stmt.where(Vm.status == filters.status)
        elif filters.ended != "1":
            vm_stmt = vm_stmt.where(Vm.status != VmStatus.DESTROYED.value)
        if filters.provider:
            session_stmt = session_stmt.where(AuthSession.provider == filters.provider)
        if filters.session_status in {s.value for s in AuthStatus}:
            session_stmt = session_stmt.where(AuthSession.status == filters.session_status)
        vms = list(db.scalars(vm_stmt))
        sessions = list(db.scalars(session_stmt))
    summaries = [UserSummary(id=u.id, name=u.name, is_admin=u.is_admin, disabled=u.disabled,
                             has_password=bool(u.password_hash), has_sso=u.id in sso_users,
                             created_at=u.created_at) for u in users]
    return AdminOverview(users=summaries, names={u.id: u.name for u in users}, vms=vms, sessions=sessions,
                         capacity=capacity.usage(ctx))


# ----------------------------------------------------------------------------------------------
# One object's timeline


@dataclass(frozen=True)
class SessionDetail:
    session: AuthSession
    owner: str  # the owner's name ('' if the user is gone)
    events: list[Event]


@dataclass(frozen=True)
class VmDetail:
    vm: Vm
    owner: str
    events: list[Event]


def _owner_name(ctx: AppContext, user_id: str | None) -> str:
    if user_id is None:
        return "pool"  # a warm-pool Browser VM no sign-in has claimed yet
    with ctx.db.read() as db:
        owner = db.get(User, user_id)
    return owner.name if owner else ""


def session_detail(ctx: AppContext, principal: Principal, session_id: str) -> SessionDetail:
    """A sign-in session, its owner's name and its timeline; ``AuthSessionNotFound`` if unknown."""
    _ensure_admin(principal)
    auth = auth_flow.get_session(ctx, principal, session_id)
    events = auth_flow.session_events(ctx, principal, session_id)
    return SessionDetail(session=auth, owner=_owner_name(ctx, auth.user_id), events=events)


def vm_detail(ctx: AppContext, principal: Principal, vm_id: str) -> VmDetail:
    """A VM, its owner's name and its events in order; ``VmNotFound`` if unknown."""
    _ensure_admin(principal)
    vm = vm_manager.get_vm(ctx, principal, vm_id)
    with ctx.db.read() as db:
        events = list(db.scalars(select(Event).where(Event.vm_id == vm_id).order_by(Event.at, Event.id)))
    return VmDetail(vm=vm, owner=_owner_name(ctx, vm.user_id), events=events)


# ----------------------------------------------------------------------------------------------
# The garbage collector's dry run


class GcFinding(Protocol):
    """One thing a collector pass found (``background.common.Finding`` is one)."""

    @property
    def kind(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def owner(self) -> str | None: ...
    @property
    def why(self) -> str: ...
    @property
    def action(self) -> str: ...


class GcReport(Protocol):
    @property
    def findings(self) -> Sequence[GcFinding]: ...


class DryRunnable(Protocol):
    """A collector that can say what it would do without doing it
    (``background.gc.GarbageCollector``: the background layer sits above services, so the page
    hands its collector in rather than this module importing it)."""

    def run_once(self, *, dry_run: bool = ...) -> GcReport: ...


GC_KINDS = {
    "failed_vm": "Failed VM past its TTL", "destroyed_row": "Removed VM's row", "tickets": "Websocket tickets",
}


@dataclass(frozen=True)
class GcRow:
    kind: str  # in words
    subject: str
    owner: str  # the owner's name, '' if none
    why: str
    action: str


@dataclass(frozen=True)
class GcPreview:
    rows: list[GcRow] | None = None  # None when the dry run failed
    error: str = ""


def gc_preview(ctx: AppContext, principal: Principal, collector: DryRunnable) -> GcPreview:
    """What ``collector`` would do now (its dry run; changes nothing), with owners by name. A failing
    dry run is reported in ``error`` (and logged) rather than raised: the admin page still renders."""
    _ensure_admin(principal)
    try:
        report = collector.run_once(dry_run=True)
        with ctx.db.read() as db:
            names = {u.id: u.name for u in db.scalars(select(User))}
    except Exception as exc:
        log.exception("gc dry run failed")
        return GcPreview(error=f"The dry run failed ({type(exc).__name__}); see the controller log.")
    rows = [GcRow(kind=GC_KINDS.get(str(f.kind), str(f.kind)), subject=str(f.id),
                  owner=names.get(str(f.owner), "") if f.owner else "", why=str(f.why), action=str(f.action))
            for f in report.findings]
    return GcPreview(rows=rows)
