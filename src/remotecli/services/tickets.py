"""One-time websocket tickets: the VNC view of a sign-in and the terminal of a CLI VM.

A websocket cannot carry the API's bearer token or the dashboard's cookie from every client, so
the page first asks (authenticated) for a ticket and then opens the socket with it::

    issue_ticket ─► (unused, lives vnc_ticket_ttl_s) ─► redeem_ticket ─► used
                                   └─► expired                 (the GC purges both later)

Only the ticket's SHA-256 is stored. A ticket opens one socket, for one subject (a session id or
a VM id) and one kind (``vnc``, ``terminal``), for the user it was issued to, and only while that
user is enabled. What the socket may then reach is decided by its route (``vnc_target`` for the
login screen, the terminal route for the CLI VM).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid

from sqlalchemy import update

from remotecli.context import AppContext
from remotecli.db.models import AuthSession, User, Vm, WsTicket, utcnow
from remotecli.domain.states import AuthStatus, VmStatus
from remotecli.errors import AuthSessionEnded, AuthSessionNotFound, TicketInvalid
from remotecli.services import access
from remotecli.services.users import Principal

VNC = "vnc"
TERMINAL = "terminal"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_ticket(ctx: AppContext, principal: Principal, kind: str, subject_id: str) -> str:
    """A new one-time ticket of ``kind`` for ``subject_id``, owned by ``principal``."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with ctx.db.transaction() as session:
        session.add(WsTicket(
            id=str(uuid.uuid4()), token_hash=_digest(token), kind=kind,
            user_id=principal.user_id, subject_id=subject_id, created_at=now,
            expires_at=now + dt.timedelta(seconds=ctx.settings.vnc_ticket_ttl_s),
        ))
    return token


def vnc_ticket(ctx: AppContext, principal: Principal, auth: AuthSession) -> str | None:
    """A one-time ticket for the session's login screen, or ``None``: only while the session awaits
    the user, and only for its owner. An admin may read anyone's session, but the screen is the
    owner's (``vnc_target`` refuses everyone else), so no ticket is issued to anyone else."""
    if auth.user_id != principal.user_id:  # see access.ensure_own: the screen is the owner's
        return None
    if auth.status != AuthStatus.AWAITING_USER.value or not auth.browser_vm_id:
        return None
    return issue_ticket(ctx, principal, VNC, auth.id)


def redeem_ticket(ctx: AppContext, token: str, kind: str, subject_id: str) -> str:
    """Use a ticket once; returns its user id. ``TicketInvalid`` if unknown, used, expired or for another subject."""
    now = utcnow()
    with ctx.db.transaction() as session:
        result = session.execute(
            update(WsTicket)
            .where(WsTicket.token_hash == _digest(token), WsTicket.kind == kind, WsTicket.subject_id == subject_id,
                   WsTicket.used_at.is_(None), WsTicket.expires_at > now)
            .values(used_at=now)
            .returning(WsTicket.user_id)
        ).one_or_none()
        # A ticket lives 120 s; a user disabled meanwhile opens nothing with it.
        user = session.get(User, result[0]) if result is not None else None
    if result is None or user is None or user.disabled:
        raise TicketInvalid()
    return str(result[0])


def vnc_target(ctx: AppContext, user_id: str, session_id: str) -> Vm:
    """The Browser VM whose screen a ticket holder may see (only while the session awaits the user)."""
    with ctx.db.read() as session:
        auth = session.get(AuthSession, session_id)
        access.ensure_own(user_id, auth.user_id if auth else None, AuthSessionNotFound())
        assert auth is not None
        if auth.status != AuthStatus.AWAITING_USER.value or not auth.browser_vm_id:
            raise AuthSessionEnded("The login screen is not available any more.")
        vm = session.get(Vm, auth.browser_vm_id)
    if vm is None or vm.status != VmStatus.RUNNING.value:
        raise AuthSessionEnded("The secure browser is not running any more.")
    return vm
