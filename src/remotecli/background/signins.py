"""The sign-in worker: advances every live sign-in session, step by step, until it ends.

The steps (``services.signin_state`` has the state machine, ``services.credentials`` the
capture and the delivery)::

    pending ─► provisioning ─► awaiting_user ─► exchanging ─► transferring ─► completed
         (CLI VM ensured + Browser VM   (user logs in   (tokens captured,  (written 0600 in the
          booted + OAuth agent started)  over VNC)       encrypted, held)   CLI VM, read back)
    any non-terminal ─► failed (stable code) | expired | cancelled

``SigninWorker`` is one of the controller's background loops (``background.loops``): a
``LoopThread`` pass claims the lease of live sessions nobody works on (``background.leases``,
``SESSION_LEASES``) and hands each to a thread of its pool, where ``run_session`` advances it
while renewing the lease; sessions run for minutes (the user is logging in), so they do not run
on the loop thread itself. ``auth_flow.start_session`` wakes the loop through
``ctx.notifier`` (``Topic.AUTH_SESSIONS``) so a new session is claimed at once. After a restart,
or on another controller, an abandoned session's lease lapses and it is picked up again and
continues from its recorded status. Each step is load → act → apply: no database transaction is
open while a VM boots, a guest agent answers or a token is exchanged.

Stopping: the loop stops claiming, each worker sees the stop flag between steps (releasing its
lease, so the next worker, here or elsewhere, goes on), and ``stop`` waits (bounded) for a step in
progress, such as a VM boot, so nothing this controller started keeps running after it stopped.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

from remotecli.agent.protocol import OAuthFlowSpec, OAuthFlowStatus
from remotecli.background.common import LoopThread, new_owner
from remotecli.background.leases import SESSION_LEASES
from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Vm, utcnow
from remotecli.domain.states import AUTH_TERMINAL, VM_TERMINAL, AuthStatus, VmStatus, VmType
from remotecli.errors import AgentError, HostAtCapacity, RemotecliError
from remotecli.logging import get_logger, log_context
from remotecli.notifier import Topic
from remotecli.profiles import ProviderProfile
from remotecli.services import credentials, vm_manager
from remotecli.services import pool as warm_pool
from remotecli.services.signin_state import (
    BROWSER_READY,
    BROWSER_RESTARTING,
    MODULE,
    STEP_MESSAGES,
    WAITING_FOR_CAPACITY,
    SessionFailure,
    cleanup_browser,
    fail,
    load,
    move,
    principal_of,
    record,
    set_fields,
)
from remotecli.services.transitions import StatusChanged

log = get_logger(MODULE)

#: How often a worker asks the OAuth agent where the user is.
POLL_S = 0.5
# While the sign-in page loads the agent is asked more often: the user waits for that moment.
PAGE_POLL_S = 0.2
#: How often a sign-in waiting for room on the host tries its VM again.
CAPACITY_POLL_S = 1.0


class CapacityWaitEnded(Exception):
    """A wait for capacity ended without a VM: the session expired or changed, its lease was lost,
    the other VM of the step failed, or the controller is stopping. The worker's loop decides."""


def claim_sessions(ctx: AppContext, owner: str, limit: int = 8) -> list[str]:
    """Take the lease of live sessions nobody (alive) is working on, oldest first. Safe across controllers."""
    return SESSION_LEASES.claim(
        ctx.db, owner, ctx.settings.auth_lease_s,
        where=[AuthSession.status.not_in([s.value for s in AUTH_TERMINAL])],
        order_by=[AuthSession.created_at], limit=limit,
    )


def _renew_lease(ctx: AppContext, auth: AuthSession, owner: str) -> bool:
    return SESSION_LEASES.renew(ctx.db, owner, [auth.id], ctx.settings.auth_lease_s) == 1


def _never() -> bool:
    return False


def run_session(ctx: AppContext, session_id: str, owner: str, stopping: Callable[[], bool] = _never) -> None:
    """Advance one session until it ends, its lease is lost, or ``stopping()`` says the controller
    is shutting down (then the lease is released and the next worker, here or elsewhere, goes on
    from the recorded status; the step in progress, e.g. a VM boot, finishes first). Runs in a
    worker thread; the caller holds the session's lease."""
    with log_context(session_id=session_id):
        try:
            _run(ctx, session_id, owner, stopping)
        except Exception:
            log.exception("auth worker crashed", extra={"session_id": session_id})
            try:
                auth = load(ctx, session_id)
                if AuthStatus(auth.status) not in AUTH_TERMINAL:
                    fail(ctx, auth, "internal_error", "worker crashed", auth.provider)
                    cleanup_browser(ctx, auth)
            except Exception:
                log.exception("could not end the crashed session", extra={"session_id": session_id})
        finally:
            SESSION_LEASES.release(ctx.db, owner, [session_id])


def _run(ctx: AppContext, session_id: str, owner: str, stopping: Callable[[], bool] = _never) -> None:
    while True:
        if stopping():
            log.info("controller stopping: the session is left to the next worker")
            return
        auth = load(ctx, session_id)
        status = AuthStatus(auth.status)
        profile = ctx.providers.get(auth.provider)
        provider_name = profile.display_name if profile is not None else auth.provider
        if status in AUTH_TERMINAL:
            cleanup_browser(ctx, auth)
            return
        if not _renew_lease(ctx, auth, owner):
            log.info("lost the session's lease; another worker has it")
            return
        if auth.expires_at is not None and utcnow() >= auth.expires_at and status is not AuthStatus.TRANSFERRING:
            # A held credential is still delivered: expiry only ends the wait for the user.
            try:
                move(ctx, auth, AuthStatus.EXPIRED, credential_enc=None)
            except StatusChanged:
                continue
            cleanup_browser(ctx, auth)
            return
        if profile is None:
            fail(ctx, auth, "internal_error", f"provider profile {auth.provider!r} is gone", provider_name)
            continue
        try:
            if status is AuthStatus.PENDING:
                move(ctx, auth, AuthStatus.PROVISIONING)
            elif status is AuthStatus.PROVISIONING:
                _provision(ctx, auth, profile, owner, stopping)
            elif status in (AuthStatus.AWAITING_USER, AuthStatus.EXCHANGING):
                _await_login(ctx, auth, profile, owner, stopping)
            elif status is AuthStatus.TRANSFERRING:
                credentials.deliver(ctx, auth, profile)
        except (StatusChanged, CapacityWaitEnded):
            continue  # cancelled or expired meanwhile: the next pass sees it
        except SessionFailure as failure:
            fail(ctx, auth, failure.code, failure.detail, provider_name)


def _when_capacity(ctx: AppContext, auth: AuthSession, owner: str, stopping: Callable[[], bool],
                   create: Callable[[], Vm]) -> Vm:
    """``create()``; while the host has no room for the VM (``HostAtCapacity``), the session says
    so in words and tries again every ``CAPACITY_POLL_S``, renewing its lease, until the VM fits
    or the wait ends (``CapacityWaitEnded``: expiry, a change of the session, ``stopping()``)."""
    waiting = False
    last_lease = time.monotonic()
    while True:
        try:
            vm = create()
        except HostAtCapacity as exc:
            try:
                if not waiting:
                    waiting = True
                    record(ctx, auth, "auth.waiting_for_capacity", "Waiting for capacity on the host",
                           detail=(exc.log_detail or "")[:300])
                if stopping() or _expired_or_ended(ctx, auth):
                    raise CapacityWaitEnded()
                if load(ctx, auth.id).message != WAITING_FOR_CAPACITY:  # the session's other VM may have set it back
                    set_fields(ctx, auth, message=WAITING_FOR_CAPACITY)
            except StatusChanged as changed:
                raise CapacityWaitEnded() from changed
            if time.monotonic() - last_lease > ctx.settings.auth_lease_s / 3:
                if not _renew_lease(ctx, auth, owner):
                    raise CapacityWaitEnded() from None
                last_lease = time.monotonic()
            time.sleep(CAPACITY_POLL_S)
            continue
        if waiting:
            with contextlib.suppress(StatusChanged):
                set_fields(ctx, auth, message=STEP_MESSAGES[AuthStatus.PROVISIONING])
                record(ctx, auth, "auth.capacity_found", "The host has room again; starting", vm_id=vm.id)
        return vm


def _provision(ctx: AppContext, auth: AuthSession, profile: ProviderProfile, owner: str = "",
               stopping: Callable[[], bool] = _never) -> None:
    """Ensure the CLI VM and boot the Browser VM side by side, then start the OAuth agent. Either
    waits while the host has no room for it (``_when_capacity``)."""
    principal = principal_of(ctx, auth.user_id)
    abandoned = threading.Event()  # one of the two failed: the other stops waiting for capacity

    def stop_waiting() -> bool:
        return abandoned.is_set() or stopping()

    def ensure_cli() -> str | None:
        for attempt in range(2):  # a failed boot is retried once, like the Browser VM's
            try:
                vm = _when_capacity(ctx, auth, owner, stop_waiting,
                                    lambda: vm_manager.ensure_cli_vm(ctx, principal, session_id=auth.id)[0])
                return vm.id
            except RemotecliError as exc:
                if attempt == 1:
                    # Not fatal: the transfer step ensures a CLI VM again.
                    record(ctx, auth, "auth.cli_vm_deferred",
                           f"CLI workspace not ready yet ({exc.code}); will retry before saving credentials")
        return None

    def browser() -> Vm:
        browser_vm = _usable_browser_vm(ctx, auth)
        if browser_vm is not None:
            return browser_vm
        warm = _claim_warm(ctx, auth)
        if warm is not None:
            return warm
        last: RemotecliError | None = None
        for _attempt in range(2):  # a failed boot is retried once before the user hears of it
            try:
                return _when_capacity(ctx, auth, owner, stop_waiting, lambda: vm_manager.create_vm(
                    ctx, principal, VmType.BROWSER.value, session_id=auth.id))
            except RemotecliError as exc:
                last = exc
        raise SessionFailure("vm_boot_failed", last.log_detail or last.message if last else "")

    with ThreadPoolExecutor(max_workers=2) as pool:  # the two boots of this one session, side by side
        cli_future = pool.submit(ensure_cli)
        browser_future = pool.submit(browser)
        try:
            browser_vm = browser_future.result()
        except BaseException:
            abandoned.set()
            raise
        try:
            cli_vm_id = cli_future.result()
        except CapacityWaitEnded:
            # Not recorded on the session yet: nobody else would ever destroy it.
            with contextlib.suppress(RemotecliError):
                vm_manager.destroy_vm(ctx, None, browser_vm.id, reason="its sign-in stopped waiting for capacity",
                                      module=MODULE, session_id=auth.id)
            raise
    set_fields(ctx, auth, browser_vm_id=browser_vm.id, **({"cli_vm_id": cli_vm_id} if cli_vm_id else {}))

    flow_id = auth.oauth_flow_id or f"flow-{uuid.uuid4().hex[:16]}"
    agent = ctx.agent(browser_vm)
    try:
        agent.oauth_start(_oauth_spec(ctx, profile, flow_id))
        set_fields(ctx, auth, oauth_flow_id=flow_id)
        record(ctx, auth, "auth.browser_started", "Secure browser opening the sign-in page", vm_id=browser_vm.id)
        deadline = time.monotonic() + ctx.settings.auth_page_timeout_s
        while time.monotonic() < deadline:
            state = agent.oauth_status(flow_id)
            if state.status in (OAuthFlowStatus.AWAITING_USER, OAuthFlowStatus.EXCHANGING,
                                OAuthFlowStatus.COMPLETED, OAuthFlowStatus.DENIED):
                move(ctx, auth, AuthStatus.AWAITING_USER, f"Log in to {profile.display_name} below")
                return
            if state.status is OAuthFlowStatus.FAILED:
                raise SessionFailure("browser_failed", str(state.error_code))
            if _expired_or_ended(ctx, auth):
                return
            time.sleep(PAGE_POLL_S)
        raise SessionFailure("browser_failed", "the sign-in page did not appear in time")
    except AgentError as exc:
        raise SessionFailure("browser_failed", exc.log_detail or exc.code) from exc
    finally:
        agent.close()


def _claim_warm(ctx: AppContext, auth: AuthSession) -> Vm | None:
    """A Browser VM of the warm pool for ``auth`` (recorded on the session at once, so the page
    says "Secure browser ready"), or None when the pool has none ready."""
    warm = warm_pool.claim(ctx, auth.user_id, session_id=auth.id)
    if warm is None:
        return None
    try:
        set_fields(ctx, auth, browser_vm_id=warm.id, message=BROWSER_READY)
    except StatusChanged:
        # Cancelled or expired meanwhile: the VM is nobody's use now.
        vm_manager.destroy_vm(ctx, None, warm.id, reason="its sign-in ended before it was used", module=MODULE,
                              session_id=auth.id)
        raise
    record(ctx, auth, "auth.browser_warm", "Secure browser ready (a warm one from the pool)", vm_id=warm.id)
    return warm


def _oauth_spec(ctx: AppContext, profile: ProviderProfile, flow_id: str) -> OAuthFlowSpec:
    """The OAuth agent's flow request for ``profile``, run as the Browser VM's browser user."""
    return profile.oauth_spec(flow_id).with_browser(user=ctx.settings.browser_guest_user)


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
    cleanup_browser(ctx, auth)
    return None


def _expired_or_ended(ctx: AppContext, auth: AuthSession) -> bool:
    fresh = load(ctx, auth.id)
    if fresh.status != auth.status:
        raise StatusChanged(log_detail="session changed")
    return fresh.expires_at is not None and utcnow() >= fresh.expires_at


def _await_login(ctx: AppContext, auth: AuthSession, profile: ProviderProfile, owner: str,
                 stopping: Callable[[], bool] = _never) -> None:
    """Poll the OAuth agent until the user has logged in (or denied), then capture the tokens."""
    if not auth.browser_vm_id or not auth.oauth_flow_id:
        raise SessionFailure("exchange_interrupted", "no browser flow recorded")
    browser_vm = _usable_browser_vm(ctx, auth)
    if browser_vm is None:
        if auth.status == AuthStatus.EXCHANGING.value:
            raise SessionFailure("exchange_interrupted", "the Browser VM went away during the exchange")
        # Repairable: the user has not logged in yet; give them a fresh browser.
        record(ctx, auth, "auth.browser_restarted", BROWSER_RESTARTING)
        set_fields(ctx, auth, browser_vm_id=None, oauth_flow_id=None, message=BROWSER_RESTARTING)
        _reprovision_in_place(ctx, auth, profile, owner, stopping)
        return
    agent = ctx.agent(browser_vm)
    try:
        last_lease = time.monotonic()
        while True:
            state = agent.oauth_status(auth.oauth_flow_id)
            if state.status is OAuthFlowStatus.EXCHANGING and auth.status == AuthStatus.AWAITING_USER.value:
                move(ctx, auth, AuthStatus.EXCHANGING, f"Finishing sign-in with {profile.display_name}")
            elif state.status is OAuthFlowStatus.COMPLETED:
                credentials.capture(ctx, auth, profile, state.result.as_dict() if state.result else {})
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


def _reprovision_in_place(ctx: AppContext, auth: AuthSession, profile: ProviderProfile, owner: str = "",
                         stopping: Callable[[], bool] = _never) -> None:
    principal = principal_of(ctx, auth.user_id)
    try:
        vm = warm_pool.claim(ctx, auth.user_id, session_id=auth.id) or _when_capacity(
            ctx, auth, owner, stopping, lambda: vm_manager.create_vm(
                ctx, principal, VmType.BROWSER.value, session_id=auth.id))
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
    set_fields(ctx, auth, browser_vm_id=vm.id, oauth_flow_id=flow_id,
               message=f"A new secure browser is ready: log in to {profile.display_name} below")


class SigninWorker:
    """The sign-in loop of one controller: claims sessions (leases) on a ``LoopThread`` and runs
    each in a thread of its own pool (see the module docstring)."""

    def __init__(self, ctx: AppContext, *, owner: str | None = None, max_workers: int = 16,
                 interval_s: float = 1.0, stop_timeout_s: float = 60.0) -> None:
        self.ctx = ctx
        self.owner = owner or new_owner("ctl")
        self.stop_timeout_s = stop_timeout_s
        self._loop = LoopThread("signins", self.run_once, interval_s)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="signin-worker")
        self._lock = threading.Lock()
        self._running: dict[str, Future[None]] = {}  # session id → its worker (ours to wait for)
        self._stopping = threading.Event()
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self._unsubscribe = self.ctx.notifier.subscribe(Topic.AUTH_SESSIONS, self.wake)
        self._loop.start()

    def wake(self) -> None:
        self._loop.wake()

    def stop(self) -> None:
        self._stopping.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._loop.stop(10)
        with self._lock:
            running = list(self._running.values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        # Workers see the stop flag between steps; wait (bounded) for a step in progress, such as
        # a VM boot, so that nothing this controller started keeps running after it stopped.
        wait_futures(running, timeout=self.stop_timeout_s)

    def running(self) -> set[str]:
        """The sessions this controller's workers are advancing now."""
        with self._lock:
            return set(self._running)

    def run_once(self) -> list[str]:
        """One pass: claim the sessions nobody works on and start a worker for each; returns them."""
        if self._stopping.is_set():
            return []
        started = []
        for session_id in claim_sessions(self.ctx, self.owner):
            with self._lock:
                if session_id in self._running or self._stopping.is_set():
                    continue
                self._running[session_id] = self._pool.submit(self._work, session_id)
            started.append(session_id)
        return started

    def _work(self, session_id: str) -> None:
        try:
            run_session(self.ctx, session_id, self.owner, self._stopping.is_set)
        finally:
            with self._lock:
                self._running.pop(session_id, None)
