"""Sign-in sessions: log in to a CLI's provider in a Browser VM, deliver the credentials to the CLI VM.

The seed's flow, built so its failure cannot happen::

    pending ─► provisioning ─► awaiting_user ─► exchanging ─► transferring ─► completed
         (CLI VM ensured + Browser VM   (user logs in   (tokens captured,  (written 0600 in the
          booted + OAuth agent started)  over VNC)       encrypted, held)   CLI VM, read back)
    any non-terminal ─► failed (stable code) | expired | cancelled

A session is advanced by a worker thread of the controller that holds its *lease*
(``lease_owner``/``lease_expires_at``, taken with a conditional update), so that after a restart
or on another controller an abandoned session is picked up again and continues from its status.
Each step is load → act → apply: no database transaction is open while a VM boots, a guest agent
answers or a token is exchanged.

Credentials (the token response) are encrypted with AES-GCM while held, bound to the session id,
and deleted once delivered and read back. They never reach a log, an event, or an API response:
the API shows ``credential_meta`` (account, expiry, scopes) only.

A CLI VM that is dead at transfer time is not a reason to fail: it is marked ``failed``, a new one
is prepared, and the credentials are delivered there (the timeline says so).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, or_, select, update

from remotecli.agent.protocol import OAuthFlowSpec, OAuthFlowStatus
from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Event, User, Vm, utcnow
from remotecli.domain.states import AUTH_TERMINAL, VM_ENDING, VM_TERMINAL, AuthStatus, VmStatus, VmType
from remotecli.errors import (
    AgentError,
    AuthSessionEnded,
    AuthSessionNotFound,
    RemotecliError,
    TooManyAuthSessions,
    UnknownProvider,
)
from remotecli.logging import get_logger, log_context
from remotecli.services import access, vm_manager
from remotecli.services.transitions import StatusChanged, record_event, set_auth_status
from remotecli.services.users import Principal

MODULE = "browser-auth"
log = get_logger(MODULE)

#: Default worker lease; ``settings.auth_lease_s`` is the one used (re-claimed after it lapses).
LEASE_S = 30.0
POLL_S = 0.5

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

FAILURE_MESSAGES: dict[str, str] = {
    "oauth_denied": "You declined access at {provider}. Try again when you are ready.",
    "oauth_error": "{provider} did not complete the sign-in. Try again.",
    "token_exchange_failed": "{provider} accepted the login but did not hand out credentials. Try again.",
    "browser_failed": "The secure browser could not be started. Try again in a minute.",
    "vm_boot_failed": "A workspace could not be started. Try again in a minute.",
    "delivery_failed": "Your credentials could not be saved to your CLI workspace. Sign in again.",
    "exchange_interrupted": "The sign-in was interrupted before the credentials were saved. Sign in again.",
    "internal_error": "Something went wrong on our side. Try again.",
}


class SessionFailure(Exception):
    """A step failed for a reason the system cannot repair; ends the session ``failed`` with ``code``."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail


def _profiles(ctx: AppContext) -> dict[str, Any]:
    from remotecli.services.providers import load_profiles

    return load_profiles(ctx.settings)


def _credential_aad(session_id: str) -> bytes:
    return f"credential:{session_id}".encode()


# ----------------------------------------------------------------------------------------------
# Reading and user actions


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
    profiles = _profiles(ctx)
    if provider not in profiles:
        raise UnknownProvider(f"Unknown provider {provider!r}; choose one of: {', '.join(sorted(profiles))}.")
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
    runner = AuthRunner.instance_for(ctx)
    if runner is not None:
        runner.wake()
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
    _cleanup_browser(ctx, auth)
    return auth


# ----------------------------------------------------------------------------------------------
# The worker


def _principal_of(ctx: AppContext, user_id: str) -> Principal:
    with ctx.db.read() as session:
        user = session.get(User, user_id)
    assert user is not None
    return Principal(user_id=user.id, name=user.name, is_admin=user.is_admin)


def _event(ctx: AppContext, auth: AuthSession, kind: str, message: str, **details: Any) -> None:
    with ctx.db.transaction() as session:
        record_event(session, module=MODULE, kind=kind, message=message, user_id=auth.user_id,
                     session_id=auth.id, vm_id=details.pop("vm_id", None), details=details or None)


def _set_fields(ctx: AppContext, auth: AuthSession, **fields: Any) -> None:
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


def _move(ctx: AppContext, auth: AuthSession, new: AuthStatus, message: str | None = None, **fields: Any) -> None:
    with ctx.db.transaction() as session:
        set_auth_status(session, auth, new, module=MODULE, message=message or STEP_MESSAGES[new], **fields)


def _fail(ctx: AppContext, auth: AuthSession, code: str, detail: str, provider_name: str) -> None:
    message = FAILURE_MESSAGES.get(code, FAILURE_MESSAGES["internal_error"]).format(provider=provider_name)
    log.warning("Auth session failed: %s (%s)", code, detail, extra={"session_id": auth.id, "user_id": auth.user_id})
    try:
        with ctx.db.transaction() as session:
            set_auth_status(session, auth, AuthStatus.FAILED, module=MODULE, message=message, error_code=code,
                            error_message=message, credential_enc=None, details={"detail": detail[:500]})
    except (StatusChanged, RemotecliError):
        pass


def _cleanup_browser(ctx: AppContext, auth: AuthSession) -> None:
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


def _renew_lease(ctx: AppContext, auth: AuthSession, owner: str) -> bool:
    with ctx.db.transaction() as session:
        result = session.execute(
            update(AuthSession).where(AuthSession.id == auth.id, AuthSession.lease_owner == owner)
            .values(lease_expires_at=utcnow() + dt.timedelta(seconds=ctx.settings.auth_lease_s))
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _release_lease(ctx: AppContext, session_id: str, owner: str) -> None:
    with ctx.db.transaction() as session:
        session.execute(
            update(AuthSession).where(AuthSession.id == session_id, AuthSession.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None).execution_options(synchronize_session=False)
        )


def claim_sessions(ctx: AppContext, owner: str, limit: int = 8) -> list[str]:
    """Take the lease of live sessions nobody (alive) is working on. Safe across controllers."""
    now = utcnow()
    with ctx.db.read() as session:
        candidates = list(session.scalars(
            select(AuthSession.id).where(
                AuthSession.status.not_in([s.value for s in AUTH_TERMINAL]),
                or_(AuthSession.lease_owner.is_(None), AuthSession.lease_expires_at < now),
            ).order_by(AuthSession.created_at).limit(limit)
        ))
    claimed = []
    for session_id in candidates:
        with ctx.db.transaction() as session:
            result = session.execute(
                update(AuthSession).where(
                    AuthSession.id == session_id,
                    or_(AuthSession.lease_owner.is_(None), AuthSession.lease_expires_at < now),
                ).values(lease_owner=owner, lease_expires_at=now + dt.timedelta(seconds=ctx.settings.auth_lease_s))
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append(session_id)
    return claimed


def _never() -> bool:
    return False


def run_session(ctx: AppContext, session_id: str, owner: str, stopping: Callable[[], bool] = _never) -> None:
    """Advance one session until it ends, its lease is lost, or ``stopping()`` says the controller
    is shutting down (then the lease is released and the next worker, here or elsewhere, goes on
    from the recorded status; the step in progress, e.g. a VM boot, finishes first). Runs in a
    worker thread."""
    with log_context(session_id=session_id):
        try:
            _run(ctx, session_id, owner, stopping)
        except Exception:
            log.exception("auth worker crashed", extra={"session_id": session_id})
            try:
                auth = get_session(ctx, None, session_id)
                if AuthStatus(auth.status) not in AUTH_TERMINAL:
                    _fail(ctx, auth, "internal_error", "worker crashed", auth.provider)
                    _cleanup_browser(ctx, auth)
            except Exception:
                log.exception("could not end the crashed session", extra={"session_id": session_id})
        finally:
            _release_lease(ctx, session_id, owner)


def _run(ctx: AppContext, session_id: str, owner: str, stopping: Callable[[], bool] = _never) -> None:
    profiles = _profiles(ctx)
    while True:
        if stopping():
            log.info("controller stopping: the session is left to the next worker")
            return
        auth = get_session(ctx, None, session_id)
        status = AuthStatus(auth.status)
        profile = profiles.get(auth.provider)
        provider_name = getattr(profile, "display_name", auth.provider)
        if status in AUTH_TERMINAL:
            _cleanup_browser(ctx, auth)
            return
        if not _renew_lease(ctx, auth, owner):
            log.info("lost the session's lease; another worker has it")
            return
        if auth.expires_at is not None and utcnow() >= auth.expires_at and status is not AuthStatus.TRANSFERRING:
            # A held credential is still delivered: expiry only ends the wait for the user.
            try:
                _move(ctx, auth, AuthStatus.EXPIRED, credential_enc=None)
            except StatusChanged:
                continue
            _cleanup_browser(ctx, auth)
            return
        if profile is None:
            _fail(ctx, auth, "internal_error", f"provider profile {auth.provider!r} is gone", provider_name)
            continue
        try:
            if status is AuthStatus.PENDING:
                _move(ctx, auth, AuthStatus.PROVISIONING)
            elif status is AuthStatus.PROVISIONING:
                _provision(ctx, auth, profile)
            elif status in (AuthStatus.AWAITING_USER, AuthStatus.EXCHANGING):
                _await_login(ctx, auth, profile, owner, stopping)
            elif status is AuthStatus.TRANSFERRING:
                _deliver(ctx, auth, profile)
        except StatusChanged:
            continue  # cancelled or expired meanwhile: the next pass sees it
        except SessionFailure as failure:
            _fail(ctx, auth, failure.code, failure.detail, provider_name)


def _provision(ctx: AppContext, auth: AuthSession, profile: Any) -> None:
    """Ensure the CLI VM and boot the Browser VM side by side, then start the OAuth agent."""
    principal = _principal_of(ctx, auth.user_id)

    def ensure_cli() -> str | None:
        for attempt in range(2):  # a failed boot is retried once, like the Browser VM's
            try:
                vm, _created = vm_manager.ensure_cli_vm(ctx, principal, session_id=auth.id)
                return vm.id
            except RemotecliError as exc:
                if attempt == 1:
                    # Not fatal: the transfer step ensures a CLI VM again.
                    _event(ctx, auth, "auth.cli_vm_deferred",
                           f"CLI workspace not ready yet ({exc.code}); will retry before saving credentials")
        return None

    def browser() -> Vm:
        browser_vm = _usable_browser_vm(ctx, auth)
        if browser_vm is not None:
            return browser_vm
        last: RemotecliError | None = None
        for _attempt in range(2):  # a failed boot is retried once before the user hears of it
            try:
                return vm_manager.create_vm(ctx, principal, VmType.BROWSER.value, session_id=auth.id)
            except RemotecliError as exc:
                last = exc
        raise SessionFailure("vm_boot_failed", last.log_detail or last.message if last else "")

    with ThreadPoolExecutor(max_workers=2) as pool:
        cli_future = pool.submit(ensure_cli)
        browser_future = pool.submit(browser)
        browser_vm = browser_future.result()
        cli_vm_id = cli_future.result()
    _set_fields(ctx, auth, browser_vm_id=browser_vm.id, **({"cli_vm_id": cli_vm_id} if cli_vm_id else {}))

    flow_id = auth.oauth_flow_id or f"flow-{uuid.uuid4().hex[:16]}"
    agent = ctx.agent(browser_vm)
    try:
        agent.oauth_start(_oauth_spec(ctx, profile, flow_id))
        _set_fields(ctx, auth, oauth_flow_id=flow_id)
        _event(ctx, auth, "auth.browser_started", "Secure browser opening the sign-in page",
               vm_id=browser_vm.id)
        deadline = time.monotonic() + ctx.settings.auth_page_timeout_s
        while time.monotonic() < deadline:
            state = agent.oauth_status(flow_id)
            if state.status in (OAuthFlowStatus.AWAITING_USER, OAuthFlowStatus.EXCHANGING,
                                OAuthFlowStatus.COMPLETED, OAuthFlowStatus.DENIED):
                _move(ctx, auth, AuthStatus.AWAITING_USER, f"Log in to {profile.display_name} below")
                return
            if state.status is OAuthFlowStatus.FAILED:
                raise SessionFailure("browser_failed", str(state.error_code))
            if _expired_or_ended(ctx, auth):
                return
            time.sleep(POLL_S)
        raise SessionFailure("browser_failed", "the sign-in page did not appear in time")
    except AgentError as exc:
        raise SessionFailure("browser_failed", exc.log_detail or exc.code) from exc
    finally:
        agent.close()


def _oauth_spec(ctx: AppContext, profile: Any, flow_id: str) -> OAuthFlowSpec:
    """The OAuth agent's flow request for ``profile``, run as the Browser VM's browser user."""
    spec: OAuthFlowSpec = profile.oauth_spec(flow_id)
    return spec.with_browser(user=ctx.settings.browser_guest_user)


def _usable_browser_vm(ctx: AppContext, auth: AuthSession) -> Vm | None:
    """After a restart: the session's Browser VM if it is still proven alive, else None (and cleaned)."""
    if not auth.browser_vm_id:
        return None
    try:
        vm = vm_manager.get_vm(ctx, None, auth.browser_vm_id)
    except RemotecliError:
        return None
    if vm.status == VmStatus.RUNNING.value and vm_manager.prove_alive(ctx, vm) is None:
        return vm
    if VmStatus(vm.status) not in VM_TERMINAL:
        vm_manager.fail_vm(ctx, vm.id, "not usable for the sign-in any more", session_id=auth.id)
    _cleanup_browser(ctx, auth)
    return None


def _expired_or_ended(ctx: AppContext, auth: AuthSession) -> bool:
    fresh = get_session(ctx, None, auth.id)
    if fresh.status != auth.status:
        raise StatusChanged(log_detail="session changed")
    return fresh.expires_at is not None and utcnow() >= fresh.expires_at


def _await_login(ctx: AppContext, auth: AuthSession, profile: Any, owner: str,
                 stopping: Callable[[], bool] = _never) -> None:
    """Poll the OAuth agent until the user has logged in (or denied), then capture the tokens."""
    if not auth.browser_vm_id or not auth.oauth_flow_id:
        raise SessionFailure("exchange_interrupted", "no browser flow recorded")
    browser_vm = _usable_browser_vm(ctx, auth)
    if browser_vm is None:
        if auth.status == AuthStatus.EXCHANGING.value:
            raise SessionFailure("exchange_interrupted", "the Browser VM went away during the exchange")
        # Repairable: the user has not logged in yet; give them a fresh browser.
        _event(ctx, auth, "auth.browser_restarted", "The secure browser stopped; starting a new one")
        _set_fields(ctx, auth, browser_vm_id=None, oauth_flow_id=None)
        _reprovision_in_place(ctx, auth, profile)
        return
    agent = ctx.agent(browser_vm)
    try:
        last_lease = time.monotonic()
        while True:
            state = agent.oauth_status(auth.oauth_flow_id)
            if state.status is OAuthFlowStatus.EXCHANGING and auth.status == AuthStatus.AWAITING_USER.value:
                _move(ctx, auth, AuthStatus.EXCHANGING, f"Finishing sign-in with {profile.display_name}")
            elif state.status is OAuthFlowStatus.COMPLETED:
                _capture(ctx, auth, profile, state.result.as_dict() if state.result else {})
                with contextlib.suppress(AgentError):
                    agent.oauth_cancel(auth.oauth_flow_id)  # wipes the tokens from the guest's memory
                return
            elif state.status is OAuthFlowStatus.DENIED:
                raise SessionFailure("oauth_denied", state.error_code or "access_denied")
            elif state.status is OAuthFlowStatus.FAILED:
                code = state.error_code or "oauth_error"
                raise SessionFailure("token_exchange_failed" if "exchange" in code else "oauth_error", code)
            if _expired_or_ended(ctx, auth) or stopping():
                return
            if time.monotonic() - last_lease > ctx.settings.auth_lease_s / 3:
                if not _renew_lease(ctx, auth, owner):
                    return
                last_lease = time.monotonic()
            time.sleep(POLL_S)
    except AgentError as exc:
        # The Browser VM stopped answering; the next pass decides (repair, or interrupted).
        vm_manager.fail_vm(ctx, browser_vm.id, f"guest agent stopped answering ({exc.code})", session_id=auth.id)
    finally:
        agent.close()


def _reprovision_in_place(ctx: AppContext, auth: AuthSession, profile: Any) -> None:
    principal = _principal_of(ctx, auth.user_id)
    try:
        vm = vm_manager.create_vm(ctx, principal, VmType.BROWSER.value, session_id=auth.id)
    except RemotecliError as exc:
        raise SessionFailure("vm_boot_failed", exc.log_detail or exc.message) from exc
    flow_id = f"flow-{uuid.uuid4().hex[:16]}"
    agent = ctx.agent(vm)
    try:
        agent.oauth_start(_oauth_spec(ctx, profile, flow_id))
    except AgentError as exc:
        raise SessionFailure("browser_failed", exc.log_detail or exc.code) from exc
    finally:
        agent.close()
    _set_fields(ctx, auth, browser_vm_id=vm.id, oauth_flow_id=flow_id)


def _capture(ctx: AppContext, auth: AuthSession, profile: Any, result: dict[str, Any]) -> None:
    """Hold the token response encrypted, record its metadata, and move on to the transfer."""
    from remotecli.services.providers import render_credentials

    if not result.get("access_token"):
        raise SessionFailure("token_exchange_failed", "the token response had no access token")
    rendered = render_credentials(profile, result, utcnow())  # validates the shape before we hold it
    sealed = ctx.box.encrypt(json.dumps(result).encode(), _credential_aad(auth.id))
    if auth.status == AuthStatus.AWAITING_USER.value:
        _move(ctx, auth, AuthStatus.EXCHANGING, f"Finishing sign-in with {profile.display_name}")
    _move(ctx, auth, AuthStatus.TRANSFERRING, credential_enc=sealed,
          credential_meta=_jsonable(rendered.metadata))
    _cleanup_browser(ctx, auth)


def _jsonable(metadata: Any) -> dict[str, Any]:
    data = dict(metadata) if isinstance(metadata, dict) else dict(vars(metadata))
    return json.loads(json.dumps(data, default=str))  # type: ignore[no-any-return]


def _deliver(ctx: AppContext, auth: AuthSession, profile: Any) -> None:
    """Write the credential files into a CLI VM proven alive, read them back, then forget them."""
    from remotecli.services.providers import render_credentials

    if auth.credential_enc is None:
        raise SessionFailure("exchange_interrupted", "no held credential to deliver")
    result = json.loads(ctx.box.decrypt(auth.credential_enc, _credential_aad(auth.id)))
    rendered = render_credentials(profile, result, utcnow())
    principal = _principal_of(ctx, auth.user_id)
    for attempt in range(3):
        cli_vm = _live_cli_vm(ctx, auth)
        reason = "no CLI workspace yet" if cli_vm is None else vm_manager.prove_alive(ctx, cli_vm)
        if cli_vm is None or reason is not None:
            if cli_vm is not None:
                _event(ctx, auth, "auth.cli_vm_replaced",
                       f"CLI workspace {cli_vm.id} is not usable ({reason}); preparing a new one",
                       vm_id=cli_vm.id)
                _set_fields(ctx, auth, message="Your CLI workspace stopped unexpectedly; a new one is being prepared")
                vm_manager.fail_vm(ctx, cli_vm.id, f"not usable for delivery: {reason}", session_id=auth.id)
            try:
                new_vm, _ = vm_manager.ensure_cli_vm(ctx, principal, session_id=auth.id)
            except RemotecliError as exc:
                if attempt == 2:
                    raise SessionFailure("vm_boot_failed", exc.log_detail or exc.message) from exc
                continue
            _set_fields(ctx, auth, cli_vm_id=new_vm.id)
            cli_vm = new_vm
        try:
            _write_and_verify(ctx, cli_vm, rendered.files)
        except (AgentError, _VerifyFailed) as exc:
            _event(ctx, auth, "auth.delivery_retry", f"Writing to {cli_vm.id} failed; retrying", vm_id=cli_vm.id,
                   error=getattr(exc, "code", "verify_failed"))
            vm_manager.fail_vm(ctx, cli_vm.id, "credential delivery failed", session_id=auth.id)
            continue
        _event(ctx, auth, "auth.delivered",
               f"Credentials written to {cli_vm.id} ({len(rendered.files)} file(s), mode 0600) and read back",
               vm_id=cli_vm.id, files=[str(f.path) for f in rendered.files])
        _move(ctx, auth, AuthStatus.COMPLETED, f"Done: {profile.display_name} is signed in on your CLI workspace",
              credential_enc=None, delivered_at=utcnow(), cli_vm_id=cli_vm.id)
        return
    raise SessionFailure("delivery_failed", "three delivery attempts failed")


class _VerifyFailed(Exception):
    code = "verify_failed"


def _live_cli_vm(ctx: AppContext, auth: AuthSession) -> Vm | None:
    if auth.cli_vm_id:
        try:
            vm = vm_manager.get_vm(ctx, None, auth.cli_vm_id)
        except RemotecliError:
            vm = None
        if vm is not None and VmStatus(vm.status) not in VM_ENDING:
            return vm
    with ctx.db.read() as session:
        return session.scalars(select(Vm).where(
            Vm.user_id == auth.user_id, Vm.vm_type == VmType.CLI.value,
            Vm.status.not_in([s.value for s in VM_ENDING]),
        )).one_or_none()


def _write_and_verify(ctx: AppContext, vm: Vm, files: list[Any]) -> None:
    from remotecli.agent.client import AgentFileNotFound
    from remotecli.services.providers import merge_json_file

    user = ctx.settings.cli_guest_user
    home = ctx.settings.cli_guest_home.rstrip("/")
    agent = ctx.agent(vm)
    try:
        for item in files:
            path = f"{home}/{str(item.path).lstrip('/')}"
            mode = int(getattr(item, "mode", 0o600))
            content = item.content
            if getattr(item, "merge_json", False):
                try:
                    existing: bytes | None = agent.read_file(path).data
                except AgentFileNotFound:
                    existing = None
                content = merge_json_file(existing, content)
            agent.write_file(path, content, mode=mode, owner=user)
            back = agent.read_file(path)
            if back.data != content or (back.mode & 0o777) != mode or back.owner != user:
                raise _VerifyFailed()
    finally:
        agent.close()


# ----------------------------------------------------------------------------------------------
# The runner: claims sessions and runs their workers


@dataclass
class _Registry:
    runners: dict[int, AuthRunner]


_registry = _Registry(runners={})


class AuthRunner:
    """Background loop: claim live sessions (leases) and advance each in a worker thread."""

    def __init__(self, ctx: AppContext, *, max_workers: int = 16, interval_s: float = 1.0,
                 stop_timeout_s: float = 60.0) -> None:
        self.ctx = ctx
        self.owner = f"ctl-{uuid.uuid4().hex[:12]}"
        self.interval_s = interval_s
        self.stop_timeout_s = stop_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="auth-worker")
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_error: Callable[[Exception], None] | None = None

    @classmethod
    def instance_for(cls, ctx: AppContext) -> AuthRunner | None:
        return _registry.runners.get(id(ctx))

    def start(self) -> None:
        _registry.runners[id(self.ctx)] = self
        self._thread = threading.Thread(target=self._loop, name="auth-runner", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        # Workers see the stop flag between steps; wait (bounded) for a step in progress, such as
        # a VM boot, so that nothing this controller started keeps running after it stopped.
        deadline = time.monotonic() + self.stop_timeout_s
        for worker in list(getattr(self._pool, "_threads", ())):
            worker.join(max(0.0, deadline - time.monotonic()))
        _registry.runners.pop(id(self.ctx), None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # a loop that fails logs and goes on
                log.exception("auth runner pass failed")
                if self.on_error:
                    self.on_error(exc)
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def tick(self) -> None:
        for session_id in claim_sessions(self.ctx, self.owner):
            with self._lock:
                if session_id in self._active:
                    continue
                self._active.add(session_id)
            self._pool.submit(self._work, session_id)
        # Expired and used websocket tickets are purged by the garbage collector (background/gc.py).

    def _work(self, session_id: str) -> None:
        try:
            run_session(self.ctx, session_id, self.owner, self._stop.is_set)
        finally:
            with self._lock:
                self._active.discard(session_id)

