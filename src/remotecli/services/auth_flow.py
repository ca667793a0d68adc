"""Sign-in sessions, as a user sees them: start one, follow it, cancel it.

A session logs the user in to a CLI's provider in a Browser VM and delivers the credentials to
their CLI VM::

    pending ─► provisioning ─► awaiting_user ─► exchanging ─► transferring ─► completed
         (CLI VM ensured + Browser VM   (user logs in   (tokens captured,  (written 0600 in the
          booted + OAuth agent started)  over VNC)       encrypted, held)   CLI VM, read back)
    any non-terminal ─► failed (stable code) | expired | cancelled

This module holds the user's actions only. Where the rest lives:

* ``services.signin_state``: the state machine's writes (status, fields, timeline, Browser VM
  cleanup) and the step and failure messages;
* ``services.credentials``: capturing the tokens and delivering them to a CLI VM;
* ``background.signins``: the worker that advances sessions (woken by ``start_session`` through
  ``ctx.notifier``), on the same loop and lease machinery as the reconciler and GC;
* ``services.tickets``: the one-time websocket ticket of the login screen.
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import func, select

from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Event, utcnow
from remotecli.domain.states import AUTH_TERMINAL, AuthStatus
from remotecli.errors import AuthSessionEnded, AuthSessionNotFound, TooManyAuthSessions, UnknownProvider
from remotecli.logging import get_logger
from remotecli.notifier import Topic
from remotecli.services import access
from remotecli.services.signin_state import FAILURE_MESSAGES, MODULE, STEP_MESSAGES, cleanup_browser
from remotecli.services.transitions import StatusChanged, record_event, set_auth_status
from remotecli.services.users import Principal

__all__ = [
    "FAILURE_MESSAGES",
    "STEP_MESSAGES",
    "cancel_session",
    "get_session",
    "list_sessions",
    "session_events",
    "start_session",
]

log = get_logger(MODULE)


def _visible(auth: AuthSession | None, principal: Principal | None) -> AuthSession:
    access.ensure_visible(principal, auth.user_id if auth else None, AuthSessionNotFound())
    assert auth is not None
    return auth


def get_session(ctx: AppContext, principal: Principal | None, session_id: str) -> AuthSession:
    with ctx.db.read() as session:
        return _visible(session.get(AuthSession, session_id), principal)


def list_sessions(ctx: AppContext, principal: Principal | None, *, all_users: bool = False,
                  limit: int = 100) -> list[AuthSession]:
    stmt = select(AuthSession).order_by(AuthSession.created_at.desc()).limit(limit)
    owner = access.owner_filter(principal, all_users=all_users)
    if owner is not None:
        stmt = stmt.where(AuthSession.user_id == owner)
    with ctx.db.read() as session:
        return list(session.scalars(stmt))


def session_events(ctx: AppContext, principal: Principal | None, session_id: str) -> list[Event]:
    """The session's timeline: its own events and those of the VMs it used, in order."""
    auth = get_session(ctx, principal, session_id)
    vm_ids = [vm_id for vm_id in (auth.cli_vm_id, auth.browser_vm_id) if vm_id]
    with ctx.db.read() as session:
        events = list(session.scalars(
            select(Event).where(Event.session_id == session_id).order_by(Event.id)
        ))
        seen = {e.id for e in events}
        if vm_ids:
            # VM events from the session's lifetime (e.g. the CLI VM failing before the transfer).
            extra = session.scalars(
                select(Event).where(Event.vm_id.in_(vm_ids), Event.at >= auth.created_at).order_by(Event.id)
            )
            events += [e for e in extra if e.id not in seen]
    return sorted(events, key=lambda e: (e.at, e.id))


def start_session(ctx: AppContext, principal: Principal, provider: str) -> AuthSession:
    """Create a sign-in session for ``provider``; a controller worker advances it from here."""
    if provider not in ctx.providers:
        raise UnknownProvider(
            f"Unknown provider {provider!r}; choose one of: {', '.join(sorted(ctx.providers))}.")
    with ctx.db.read() as session:
        live = session.scalar(select(func.count()).select_from(AuthSession).where(
            AuthSession.user_id == principal.user_id,
            AuthSession.status.not_in([s.value for s in AUTH_TERMINAL]),
        ))
    if int(live or 0) >= ctx.settings.max_live_auth_sessions_per_user:
        raise TooManyAuthSessions()
    now = utcnow()
    auth = AuthSession(
        id=str(uuid.uuid4()),
        user_id=principal.user_id,
        provider=provider,
        status=AuthStatus.PENDING.value,
        message=STEP_MESSAGES[AuthStatus.PENDING],
        generation=0,
        created_at=now,
        updated_at=now,
        expires_at=now + dt.timedelta(seconds=ctx.settings.auth_session_ttl_s),
    )
    with ctx.db.transaction() as session:
        session.add(auth)
        record_event(session, module=MODULE, kind="auth.status", message=f"Sign-in to {provider} requested",
                     user_id=principal.user_id, session_id=auth.id, to_status=AuthStatus.PENDING.value,
                     details={"provider": provider})
    log.info("Auth session created", extra={"session_id": auth.id, "user_id": principal.user_id})
    ctx.notifier.notify(Topic.AUTH_SESSIONS)  # this controller's sign-in worker claims it now
    return auth


def cancel_session(ctx: AppContext, principal: Principal | None, session_id: str) -> AuthSession:
    auth = get_session(ctx, principal, session_id)
    if AuthStatus(auth.status) in AUTH_TERMINAL:
        raise AuthSessionEnded()
    for _ in range(5):
        try:
            with ctx.db.transaction() as session:
                set_auth_status(session, auth, AuthStatus.CANCELLED, module=MODULE,
                                message=STEP_MESSAGES[AuthStatus.CANCELLED], credential_enc=None)
            break
        except StatusChanged:
            auth = get_session(ctx, principal, session_id)
            if AuthStatus(auth.status) in AUTH_TERMINAL:
                raise AuthSessionEnded() from None
    cleanup_browser(ctx, auth)
    return auth
