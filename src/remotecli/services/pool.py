"""The warm pool: Browser VMs booted ahead of sign-ins (issue 13, ADR 0012).

``browser_pool_size`` Browser VMs (0: no pool) are booted in the background
(``background.pool.PoolKeeper``) to the point where Chromium runs on a blank page and the OAuth
agent waits for a flow. Such a VM belongs to no user (``vms.user_id`` NULL, ``vms.pool`` true)::

    booting (creating/starting, or running before Chromium is up)
       └─► ready (running, pool_ready_at set) ──claim──► a sign-in's Browser VM (user_id set)
                                                          └─► destroyed when that session ends

* **Claim** (``claim``): ONE conditional ``UPDATE`` takes the oldest ready VM
  (``... WHERE id = (SELECT ... LIMIT 1 [FOR UPDATE SKIP LOCKED]) AND user_id IS NULL AND status
  = 'running'``), so two sign-ins never get the same VM; the winner then proves it alive (rule 1)
  like any VM selected for work. A VM that fails the proof is marked ``failed`` and the next one
  is tried; with none left the sign-in boots a Browser VM as before.
* **One session, never reused**: a claimed VM is the session's Browser VM; the session's cleanup
  destroys it like any other (``signin_state.cleanup_browser``).
* **Refill** (``refill``): after each claim (the keeper is woken) and on every pass, idle VMs are
  counted and the missing ones booted, one at a time, but not while a sign-in is on its way to its
  login page (``signin_starting``: a boot beside it would take its CPUs); idle VMs of an older
  image are retired.
* **Every VM rule holds**: status changes go through ``services.transitions`` (via
  ``vm_manager``); the reconciler checks pool VMs like any other (a dead one becomes ``failed``
  and the next refill replaces it); ``/metrics`` counts them; the admin page shows their owner as
  "pool".
* **Capacity**: pool VMs are the first to go when the host needs the memory:
  ``release_for_capacity`` retires idle pool VMs (``capacity.register_releaser``; the keeper
  registers it). The pool's own boots never retire pool VMs.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import aliased

from remotecli.agent.protocol import OAuthBrowser
from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Vm, utcnow
from remotecli.domain.states import VM_ENDING, AuthStatus, VmStatus, VmType
from remotecli.errors import AgentError, RemotecliError
from remotecli.logging import get_logger, log_context
from remotecli.notifier import Topic
from remotecli.services import vm_manager
from remotecli.services.transitions import StatusChanged, record_event, set_vm_status

MODULE = "pool"
log = get_logger(MODULE)

# Set while this thread boots a pool VM: the pool does not give way to its own boots.
_refilling = threading.local()


def _idle() -> list[ColumnElement[bool]]:
    """A Browser VM of the pool that no sign-in has claimed."""
    return [Vm.pool.is_(True), Vm.user_id.is_(None), Vm.vm_type == VmType.BROWSER.value]


def warm_browser(ctx: AppContext) -> OAuthBrowser:
    """Chromium as the sign-in's flow runs it (``background.signins._oauth_spec``): a flow with the
    same settings takes the warm browser over."""
    return OAuthBrowser(display=":0", executable="chromium", extra_args=(), user=ctx.settings.browser_guest_user)


@dataclass(frozen=True)
class PoolState:
    size: int  # browser_pool_size
    ready: int  # running, Chromium up, claimable
    booting: int  # on their way to ready


def state(ctx: AppContext) -> PoolState:
    with ctx.db.read() as session:
        rows = list(session.execute(
            select(Vm.status, Vm.pool_ready_at).where(*_idle(), Vm.status.not_in([s.value for s in VM_ENDING]))
        ))
    ready = sum(1 for status, at in rows if status == VmStatus.RUNNING.value and at is not None)
    return PoolState(size=ctx.settings.browser_pool_size, ready=ready, booting=len(rows) - ready)


# ----------------------------------------------------------------------------------------------
# Claiming


def _claim_one(ctx: AppContext, user_id: str, session_id: str | None) -> str | None:
    """ONE conditional update: the oldest ready idle pool VM becomes ``user_id``'s; its id or None."""
    now = utcnow()
    with ctx.db.transaction() as session:
        other = aliased(Vm)
        candidate = (
            select(other.id)
            .where(other.pool.is_(True), other.user_id.is_(None), other.vm_type == VmType.BROWSER.value,
                   other.status == VmStatus.RUNNING.value, other.pool_ready_at.is_not(None))
            .order_by(other.pool_ready_at, other.id)
            .limit(1)
        )
        if session.get_bind().dialect.name == "postgresql":
            candidate = candidate.with_for_update(skip_locked=True)
        got = session.execute(
            update(Vm)
            .where(Vm.id == candidate.scalar_subquery(), *_idle(), Vm.status == VmStatus.RUNNING.value)
            .values(user_id=user_id, updated_at=now, last_active_at=now)
            .returning(Vm.id)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if got is not None:
            record_event(session, module=MODULE, kind="vm.claimed",
                         message="Warm Browser VM taken from the pool for a sign-in",
                         user_id=user_id, vm_id=got, session_id=session_id)
    return got


def claim(ctx: AppContext, user_id: str, *, session_id: str | None = None) -> Vm | None:
    """A ready pool VM, now ``user_id``'s and proven alive; None when the pool has none (the caller
    boots a Browser VM as without a pool). Wakes the keeper to refill."""
    if ctx.settings.browser_pool_size <= 0:
        return None
    try:
        for _ in range(ctx.settings.browser_pool_size + 2):
            vm_id = _claim_one(ctx, user_id, session_id)
            if vm_id is None:
                return None
            vm = vm_manager.get_vm(ctx, None, vm_id)
            reason = vm_manager.prove_alive(ctx, vm)
            if reason is None:
                log.info("warm Browser VM claimed", extra={"vm_id": vm.id, "user_id": user_id,
                                                           "session_id": session_id})
                return vm
            # It is the session's now: fail it (the session's cleanup destroys it) and try the next.
            vm_manager.fail_vm(ctx, vm.id, f"warm-pool VM not usable: {reason}", session_id=session_id, module=MODULE)
        return None
    finally:
        ctx.notifier.notify(Topic.BROWSER_POOL)


# ----------------------------------------------------------------------------------------------
# Giving way and retiring


def _retire(ctx: AppContext, vm_id: str, reason: str) -> Vm | None:
    """Destroy an idle pool VM, unless a sign-in claimed it meanwhile: the move to ``destroying``
    is made in the transaction that locked the still-unclaimed row. Returns the VM if retired."""
    with ctx.db.transaction() as session:
        query = select(Vm).where(Vm.id == vm_id, *_idle(), Vm.status.not_in([s.value for s in VM_ENDING]))
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        vm = session.scalars(query).one_or_none()
        if vm is None:
            return None
        try:
            set_vm_status(session, vm, VmStatus.DESTROYING, module=MODULE,
                          message=f"Destroying the warm-pool VM ({reason})", details={"reason": reason})
        except (StatusChanged, RemotecliError):
            return None
    try:
        vm_manager.destroy_vm(ctx, None, vm_id, reason=reason, module=MODULE)
    except RemotecliError:
        log.warning("could not destroy a retired pool VM; the reconciler will", extra={"vm_id": vm_id})
    return vm


def release_for_capacity(ctx: AppContext, mib_needed: int) -> int:
    """Give up idle pool VMs until ``mib_needed`` MiB are freed (ready ones last, newest first);
    returns the MiB freed. For ``services.capacity`` (registered as a releaser). Claimed VMs are
    never touched; the pool's own boots get 0."""
    if getattr(_refilling, "active", False) or mib_needed <= 0:
        return 0
    with ctx.db.read() as session:
        idle = list(session.scalars(
            select(Vm).where(*_idle(), Vm.status.not_in([s.value for s in VM_ENDING]))
            .order_by(Vm.pool_ready_at.is_not(None), Vm.created_at.desc())
        ))
    freed = 0
    for vm in idle:
        if freed >= mib_needed:
            break
        if _retire(ctx, vm.id, "the host needs its memory for a new VM") is not None:
            freed += vm.memory_mib
    if freed:
        log.info("warm pool gave way: %s MiB freed", freed)
    return freed


# ----------------------------------------------------------------------------------------------
# Refilling


def _current_image_hash(ctx: AppContext) -> str | None:
    if not ctx.driver.capabilities.guest_image:
        return None
    from remotecli import images

    image = images.resolve(ctx.settings, VmType.BROWSER.value)
    return image.recipe_hash if image is not None else None


def warm(ctx: AppContext, vm: Vm) -> bool:
    """Start Chromium on a blank page in ``vm`` and mark it ready (claimable); False (and the VM
    failed) when the browser did not come up."""
    try:
        agent = ctx.agent(vm, timeout=ctx.settings.auth_page_timeout_s)
        try:
            agent.oauth_warm(warm_browser(ctx), timeout_s=ctx.settings.auth_page_timeout_s)
        finally:
            agent.close()
    except AgentError as exc:
        vm_manager.fail_vm(ctx, vm.id, f"its warm browser did not start ({exc.code})", module=MODULE)
        return False
    with ctx.db.transaction() as session:
        done = session.execute(
            update(Vm).where(Vm.id == vm.id, *_idle(), Vm.status == VmStatus.RUNNING.value)
            .values(pool_ready_at=utcnow()).execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if done == 1:
            record_event(session, module=MODULE, kind="vm.pool_ready",
                         message="Warm pool: Chromium up on a blank page, ready for a sign-in", vm_id=vm.id)
    return bool(done == 1)


def boot_one(ctx: AppContext) -> Vm | None:
    """Boot one pool VM and warm its browser; the VM when ready, None when it failed (logged)."""
    _refilling.active = True
    try:
        vm = vm_manager.create_vm(ctx, None, VmType.BROWSER.value)
    except StatusChanged:
        return None  # retired (capacity) or failed while it booted
    except RemotecliError as exc:
        log.warning("warm pool: could not boot a Browser VM (%s)", exc.code,
                    extra={"x_detail": exc.log_detail or exc.message})
        return None
    finally:
        _refilling.active = False
    with log_context(vm_id=vm.id):
        return vm if warm(ctx, vm) else None


def refill(ctx: AppContext, *, stopping: threading.Event | None = None) -> int:
    """One pass: retire idle VMs of an older image or beyond ``browser_pool_size``, then boot the
    missing ones one after the other. Returns how many became ready."""
    size = ctx.settings.browser_pool_size
    current = _current_image_hash(ctx)
    with ctx.db.read() as session:
        idle = list(session.scalars(
            select(Vm).where(*_idle(), Vm.status.not_in([s.value for s in VM_ENDING]))
            .order_by(Vm.pool_ready_at.is_(None), Vm.created_at)
        ))
    keep: list[Vm] = []
    for vm in idle:
        stale = current is not None and vm.image_hash not in (None, current) and vm.pool_ready_at is not None
        if stale:
            _retire(ctx, vm.id, "its image is not the current Browser image")
        elif len(keep) >= size and vm.status == VmStatus.RUNNING.value:
            _retire(ctx, vm.id, f"the pool holds {size} VMs")
        else:
            keep.append(vm)
    # A running VM without its browser (its warm-up was cut short, e.g. by a restart) is warmed now.
    booted = 0
    for vm in keep:
        if vm.status == VmStatus.RUNNING.value and vm.pool_ready_at is None and _unclaimed_age_s(vm) > 5:
            booted += int(warm(ctx, vm))
    missing = size - len(keep)
    for _ in range(max(0, missing)):
        if stopping is not None and stopping.is_set():
            break
        if signin_starting(ctx):
            log.info("warm pool: a sign-in is starting; the refill waits for it")
            break
        if boot_one(ctx) is not None:
            booted += 1
    return booted


#: How long a sign-in that is starting holds the refill back (a bound, so a stream of sign-ins
#: cannot keep the pool empty for ever).
REFILL_DEFER_S = 60.0


def signin_starting(ctx: AppContext) -> bool:
    """A sign-in (started in the last ``REFILL_DEFER_S``) is still on its way to the login page. A
    pool VM booting beside it takes the CPUs its Browser VM needs right then: on a 2-core TCG host a
    refill started at the claim made the warm sign-in ten seconds slower (bench/auth.py)."""
    since = utcnow() - dt.timedelta(seconds=REFILL_DEFER_S)
    with ctx.db.read() as session:
        count = session.scalar(select(func.count()).select_from(AuthSession).where(
            AuthSession.status.in_([AuthStatus.PENDING.value, AuthStatus.PROVISIONING.value]),
            AuthSession.created_at >= since))
    return bool(count)


def _unclaimed_age_s(vm: Vm) -> float:
    return (utcnow() - vm.status_changed_at).total_seconds()


def pool_counts(ctx: AppContext) -> dict[str, int]:
    """For /metrics: live pool VMs by ``ready`` / ``booting`` / ``claimed``."""
    with ctx.db.read() as session:
        rows = list(session.execute(
            select(Vm.user_id.is_(None), Vm.pool_ready_at.is_not(None), func.count())
            .where(Vm.pool.is_(True), Vm.status.not_in([s.value for s in VM_ENDING]))
            .group_by(Vm.user_id.is_(None), Vm.pool_ready_at.is_not(None))
        ))
    counts = {"ready": 0, "booting": 0, "claimed": 0}
    for unclaimed, ready, count in rows:
        key = "claimed" if not unclaimed else "ready" if ready else "booting"
        counts[key] += int(count)
    return counts
