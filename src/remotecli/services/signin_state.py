"""How a sign-in session's row changes: its status, its fields, its timeline, its Browser VM.

The session's states (``domain.states.AuthStatus``)::

    pending ─► provisioning ─► awaiting_user ─► exchanging ─► transferring ─► completed
    any non-terminal ─► failed (stable code) | expired | cancelled

Every status change goes through ``move`` or ``fail`` (``services.transitions.set_auth_status``:
the transition table, a conditional update, an event); other fields of a live session change
through ``set_fields`` (conditional on its status). A session that changed meanwhile raises
``StatusChanged``: whoever changed it decided. The user actions (``services.auth_flow``), the
credential delivery (``services.credentials``) and the worker (``background.signins``) all
write sessions through this module.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from remotecli.context import AppContext
from remotecli.db.models import AuthSession, User, utcnow
from remotecli.domain.states import AuthStatus, VmStatus
from remotecli.errors import RemotecliError
from remotecli.logging import get_logger
from remotecli.services import vm_manager
from remotecli.services.transitions import StatusChanged, record_event, set_auth_status
from remotecli.services.users import Principal

MODULE = "browser-auth"
log = get_logger(MODULE)

STEP_MESSAGES: dict[AuthStatus, str] = {
    AuthStatus.PENDING: "Getting ready",
    AuthStatus.PROVISIONING: "Preparing your CLI workspace and starting a secure browser",
    AuthStatus.AWAITING_USER: "Log in below",
    AuthStatus.EXCHANGING: "Finishing sign-in",
    AuthStatus.TRANSFERRING: "Saving credentials to your workspace",
    AuthStatus.COMPLETED: "Done",
    AuthStatus.EXPIRED: "This sign-in took too long and expired. Start again when you are ready.",
    AuthStatus.CANCELLED: "Sign-in cancelled.",
}

#: The session's message while its CLI or Browser VM waits for room on the host (``provisioning``).
WAITING_FOR_CAPACITY = "Waiting for capacity on the host…"

#: The session's message once a warm Browser VM from the pool is its own (issue 13).
BROWSER_READY = "Secure browser ready; opening the sign-in page"
#: The session's message when its Browser VM died before the user logged in; a new one follows.
BROWSER_RESTARTING = "The secure browser stopped unexpectedly; starting a new one for you"

FAILURE_MESSAGES: dict[str, str] = {
    "oauth_denied": "You declined access at {provider}. Try again when you are ready.",
    "oauth_error": "{provider} did not complete the sign-in. Try again.",
    "token_exchange_failed": "{provider} accepted the login but did not hand out credentials. Try again.",
    "browser_failed": "The secure browser could not be started. Try again in a minute.",
    "vm_boot_failed": "A workspace could not be started. Try again in a minute.",
    "delivery_failed": "Your credentials could not be saved to your CLI workspace. Sign in again.",
    "workspace_full": "Your workspace's home is full, so the credentials could not be saved. Free some space "
                      "in your home (for example delete build outputs or caches), then sign in again.",
    "exchange_interrupted": "The sign-in was interrupted before the credentials were saved. Sign in again.",
    "internal_error": "Something went wrong on our side. Try again.",
}

class SessionFailure(Exception):
    """A step failed for a reason the system cannot repair; ends the session ``failed`` with ``code``."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail


def load(ctx: AppContext, session_id: str) -> AuthSession:
    """The session as it is now (whoever's it is). ``StatusChanged`` if its row is gone."""
    with ctx.db.read() as session:
        auth = session.get(AuthSession, session_id)
    if auth is None:
        raise StatusChanged(log_detail=f"{session_id} is gone")
    return auth


def principal_of(ctx: AppContext, user_id: str) -> Principal:
    """The session owner, as the VM calls made on their behalf need them."""
    with ctx.db.read() as session:
        user = session.get(User, user_id)
    assert user is not None
    return Principal(user_id=user.id, name=user.name, is_admin=user.is_admin)


def record(ctx: AppContext, auth: AuthSession, kind: str, message: str, *, vm_id: str | None = None,
           **details: object) -> None:
    """An event on the session's timeline (never a secret in ``message`` or ``details``)."""
    with ctx.db.transaction() as session:
        record_event(session, module=MODULE, kind=kind, message=message, user_id=auth.user_id,
                     session_id=auth.id, vm_id=vm_id, details=dict(details) or None)


def set_fields(ctx: AppContext, auth: AuthSession, **fields: object) -> None:
    """Update non-status fields of a live session (conditional on its status not having changed)."""
    with ctx.db.transaction() as session:
        result = session.execute(
            update(AuthSession).where(AuthSession.id == auth.id, AuthSession.status == auth.status)
            .values(updated_at=utcnow(), **fields).execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise StatusChanged(log_detail=f"{auth.id} changed while updating fields")
    for key, value in fields.items():
        setattr(auth, key, value)


def move(ctx: AppContext, auth: AuthSession, new: AuthStatus, message: str | None = None,
         **fields: Any) -> None:
    """``auth.status → new`` (conditional), with the step's message unless ``message`` is given."""
    with ctx.db.transaction() as session:
        set_auth_status(session, auth, new, module=MODULE, message=message or STEP_MESSAGES[new], **fields)


def fail(ctx: AppContext, auth: AuthSession, code: str, detail: str, provider_name: str) -> None:
    """End the session ``failed`` with a stable ``code`` and its user-facing message (``detail``
    goes to the log and the event's details only). Losing the race to another ending is fine."""
    message = FAILURE_MESSAGES.get(code, FAILURE_MESSAGES["internal_error"]).format(provider=provider_name)
    log.warning("Auth session failed: %s (%s)", code, detail, extra={"session_id": auth.id, "user_id": auth.user_id})
    try:
        with ctx.db.transaction() as session:
            set_auth_status(session, auth, AuthStatus.FAILED, module=MODULE, message=message, error_code=code,
                            error_message=message, credential_enc=None, details={"detail": detail[:500]})
    except (StatusChanged, RemotecliError):
        pass


def cleanup_browser(ctx: AppContext, auth: AuthSession) -> None:
    """Destroy the session's Browser VM (every terminal state, and once the tokens are held)."""
    if not auth.browser_vm_id:
        return
    try:
        vm = vm_manager.get_vm(ctx, None, auth.browser_vm_id)
    except RemotecliError:
        return
    if vm.status == VmStatus.DESTROYED.value:
        return
    try:
        vm_manager.destroy_vm(ctx, None, vm.id, reason=f"sign-in session {auth.status}", module=MODULE,
                              session_id=auth.id)
    except RemotecliError:
        log.exception("could not destroy the Browser VM; the reconciler will", extra={"vm_id": vm.id})
