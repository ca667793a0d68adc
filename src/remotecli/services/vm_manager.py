"""VM lifecycle: create, select, stop, pause, resume, start, destroy (commands in a guest:
``services.vm_exec``).

Every function follows load → act → apply: read rows in a short transaction, call the driver or
the guest agent with no transaction open, then write the result with a conditional status change
(``services.transitions.set_vm_status``). A row that changed meanwhile makes the write fail with
``StatusChanged`` instead of silently overwriting someone else's decision.

``ensure_cli_vm`` is the seed's lookup done right: it only selects a live VM, proves it alive on the
host and through its guest agent before returning it, and marks anything that fails the proof
``failed`` (with the reason, in the timeline) before creating a new one. The database's partial
unique index guarantees one live CLI VM per user, even under concurrent calls.

Why one module of over 700 lines: every function here changes or selects VM rows under the same
rules (the creation limits, the liveness proof, the conditional status change and its event, the
driver's spec built from a row); split by verb, each part would import the others' private
helpers. Reads for pages live in ``services.dashboard``/``services.admin``, sign-ins elsewhere.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from remotecli.context import AppContext, vm_agent_aad
from remotecli.db.models import User, Vm, utcnow
from remotecli.domain.states import VM_ENDING, VM_TERMINAL, VmStatus, VmType
from remotecli.drivers.base import HomeDisk, ImageRef, Liveness, NotSupported, PowerState, VmGone, VmSpec
from remotecli.errors import (
    AgentError,
    AlreadyExists,
    DriverError,
    ImageMissing,
    InvalidInput,
    InvalidTransition,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    RemotecliError,
    UnknownVmType,
    VmBootFailed,
    VmNotFound,
    VmNotRunning,
    VmRateLimited,
    VmTerminal,
    WorkspaceBusy,
    WorkspaceUnavailable,
)
from remotecli.logging import get_logger, log_context
from remotecli.services import access, capacity, workspaces
from remotecli.services.transitions import StatusChanged, load_vm, record_event, set_vm_status
from remotecli.services.users import Principal

MODULE = "vm-manager"
log = get_logger(MODULE)

class TooManyLiveVms(LimitExceeded):
    code = "too_many_live_vms"
    default_message = "You already have as many VMs as allowed; destroy one you no longer need first."


class BrowserVmNotAllowed(PermissionDenied):
    code = "browser_vm_not_allowed"
    default_message = ("Browser VMs are started by sign-ins only (POST /api/v1/auth-sessions); "
                       "create a CLI VM instead.")


# How often a caller waiting on another caller's boot looks at the row again.
_WAIT_POLL_S = 0.1


@dataclass(frozen=True)
class VmView:
    """A VM as the API and CLI show it (no secrets)."""

    id: str
    user_id: str | None  # None: a warm-pool Browser VM no sign-in has claimed yet
    vm_type: str
    status: str
    status_reason: str | None
    driver: str
    vcpus: int
    memory_mib: int
    endpoint: str | None
    generation: int
    created_at: Any
    updated_at: Any
    last_seen_at: Any
    expires_at: Any

    @classmethod
    def of(cls, vm: Vm) -> VmView:
        return cls(
            id=vm.id,
            user_id=vm.user_id,
            vm_type=vm.vm_type,
            status=vm.status,
            status_reason=vm.status_reason,
            driver=vm.driver,
            vcpus=vm.vcpus,
            memory_mib=vm.memory_mib,
            endpoint=vm.endpoint,
            generation=vm.generation,
            created_at=vm.created_at,
            updated_at=vm.updated_at,
            last_seen_at=vm.last_seen_at,
            expires_at=vm.expires_at,
        )


# ----------------------------------------------------------------------------------------------
# Reading


def _visible(vm: Vm | None, principal: Principal | None) -> Vm:
    if vm is not None and vm.user_id is None:  # an unclaimed warm-pool VM: the operator's and admins' only
        if principal is None or principal.is_admin:
            return vm
        raise VmNotFound()
    access.ensure_visible(principal, vm.user_id if vm else None, VmNotFound())
    assert vm is not None
    return vm


def get_vm(ctx: AppContext, principal: Principal | None, vm_id: str) -> Vm:
    with ctx.db.read() as session:
        return _visible(session.get(Vm, vm_id), principal)


def list_vms(
    ctx: AppContext,
    principal: Principal | None,
    *,
    all_users: bool = False,
    include_ended: bool = True,
    vm_type: str | None = None,
    status: str | None = None,
) -> list[Vm]:
    stmt = select(Vm).order_by(Vm.created_at.desc())
    owner = access.owner_filter(principal, all_users=all_users)
    if owner is not None:
        stmt = stmt.where(Vm.user_id == owner)
    if not include_ended:
        stmt = stmt.where(Vm.status.not_in([s.value for s in VM_TERMINAL]))
    if vm_type:
        stmt = stmt.where(Vm.vm_type == vm_type)
    if status:
        stmt = stmt.where(Vm.status == status)
    with ctx.db.read() as session:
        return list(session.scalars(stmt))


def spec_of(ctx: AppContext, vm: Vm, image: ImageRef | None = None, home: HomeDisk | None = None) -> VmSpec:
    from pathlib import Path

    return VmSpec(
        vm_id=vm.id,
        vm_type=vm.vm_type,
        vcpus=vm.vcpus,
        memory_mib=vm.memory_mib,
        directory=Path(vm.directory),
        agent_secret=ctx.agent_secret(vm),
        image=image,
        home=home,
    )


# ----------------------------------------------------------------------------------------------
# Creating


def _validate_type(vm_type: str) -> VmType:
    try:
        return VmType(vm_type)
    except ValueError:
        raise UnknownVmType(f"Unknown VM type {vm_type!r}; use 'cli' or 'browser'.") from None


def _resolve_image(ctx: AppContext, vm_type: VmType) -> ImageRef | None:
    if not ctx.driver.capabilities.guest_image:
        return None
    from remotecli import images

    image = images.resolve(ctx.settings, vm_type.value)
    if image is None:
        raise ImageMissing(
            f"The {vm_type.value} guest image is not built yet; run 'remotecli images build {vm_type.value}'."
        )
    return image


def create_vm(
    ctx: AppContext,
    principal: Principal | None,
    vm_type: str,
    *,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    session_id: str | None = None,
) -> Vm:
    """Create and boot a VM; returns it ``running`` once its guest agent answers.

    A CLI VM when the user already has a live one raises ``AlreadyExists`` (the database refuses
    it); use ``ensure_cli_vm`` to get-or-create. A boot that fails leaves the row ``failed`` with
    the console's last lines as the reason, and raises ``VmBootFailed``.

    ``principal=None`` makes a Browser VM of the warm pool (``services.pool``): no user's, no
    user's limits, claimed by a sign-in later.
    """
    kind = _validate_type(vm_type)
    if principal is None and kind is not VmType.BROWSER:
        raise InvalidInput("Only Browser VMs of the warm pool are made without a user.")
    user_id = principal.user_id if principal is not None else None
    default_vcpus, default_memory = ctx.settings.vm_defaults(kind.value)
    vcpus = default_vcpus if vcpus is None else vcpus
    memory_mib = default_memory if memory_mib is None else memory_mib
    if not 1 <= vcpus <= ctx.settings.max_vm_vcpus:
        raise InvalidInput(f"vcpus must be between 1 and {ctx.settings.max_vm_vcpus}.")
    if not 128 <= memory_mib <= ctx.settings.max_vm_memory_mib:
        raise InvalidInput(f"memory_mib must be between 128 and {ctx.settings.max_vm_memory_mib}.")
    image = _resolve_image(ctx, kind)
    # The host has room for it (warm-pool VMs give way first), before anything of it exists; the
    # insert below checks again under the capacity lock (services/capacity.py).
    capacity.admit_now(ctx, vcpus=vcpus, memory_mib=memory_mib, vm_type=kind.value)
    if kind is VmType.CLI and principal is not None:
        # The user's home volume exists and no ended VM holds it any more (fenced), before a row
        # exists: a workspace that cannot be used refuses the VM instead of failing it. A request
        # the limits refuse changes nothing, the home included (they are checked again below).
        with ctx.db.transaction() as session:
            _check_creation_limits(ctx, session, principal)
        workspaces.prepare_home(ctx, principal.user_id, session_id=session_id)

    vm_id = f"vm-{uuid.uuid4()}"
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    vm = Vm(
        id=vm_id,
        user_id=user_id,
        pool=principal is None,
        vm_type=kind.value,
        status=VmStatus.CREATING.value,
        driver=ctx.driver.name,
        vcpus=vcpus,
        memory_mib=memory_mib,
        directory=str(ctx.settings.vms_dir / vm_id),
        agent_secret_enc=ctx.box.encrypt_text(secret, vm_agent_aad(vm_id)),
        image_hash=image.recipe_hash if image else None,
        generation=0,
        created_at=now,
        updated_at=now,
        status_changed_at=now,
    )
    try:
        with ctx.db.transaction() as session:
            # The limits are checked and the row inserted in one transaction that holds the user's
            # lock, so concurrent requests of one user are counted one after the other.
            if principal is not None:
                _check_creation_limits(ctx, session, principal)
            capacity.admit(ctx, session, vcpus=vcpus, memory_mib=memory_mib, vm_type=kind.value)
            session.add(vm)
            session.flush()
            record_event(
                session, module=MODULE, kind="vm.status", message=f"{kind.value} VM requested",
                user_id=user_id, vm_id=vm_id, session_id=session_id, to_status=VmStatus.CREATING.value,
                details={"vcpus": vcpus, "memory_mib": memory_mib, "driver": ctx.driver.name,
                         **({"pool": True} if principal is None else {})},
            )
    except IntegrityError:
        raise AlreadyExists(
            "You already have a CLI workspace; use it, or destroy it before creating another.",
            log_detail=f"live CLI VM exists for user {user_id}",
        ) from None
    with log_context(vm_id=vm_id, user_id=user_id, session_id=session_id):
        home = _attach_home(ctx, vm, session_id) if kind is VmType.CLI else None
        _boot(ctx, vm, image, first_boot=True, session_id=session_id, home=home)
    return vm


def _attach_home(ctx: AppContext, vm: Vm, session_id: str | None) -> HomeDisk:
    """The user's home volume, attached to ``vm``; on failure the VM is ``failed`` with the reason."""
    try:
        return workspaces.attach_home(ctx, vm, session_id=session_id)
    except (WorkspaceUnavailable, WorkspaceBusy) as exc:
        _fail_quietly(ctx, vm, f"its home volume cannot be attached: {exc.log_detail or exc.message}",
                      session_id=session_id)
        raise


def create_vm_for_user(
    ctx: AppContext, principal: Principal, vm_type: str, *, vcpus: int | None = None, memory_mib: int | None = None
) -> Vm:
    """``POST /api/v1/vms``: users (admins included) create CLI VMs only. Browser VMs exist for
    sign-ins: the sign-in worker creates them through :func:`create_vm` (ADR 0009)."""
    if _validate_type(vm_type) is VmType.BROWSER:
        raise BrowserVmNotAllowed(log_detail=f"user {principal.user_id} asked for a browser VM")
    return create_vm(ctx, principal, vm_type, vcpus=vcpus, memory_mib=memory_mib)


def _check_creation_limits(ctx: AppContext, session: Session, principal: Principal) -> None:
    """At most ``max_vm_creations_per_user_per_minute`` VMs per user per minute, and at most
    ``settings.live_vms_limit`` live ones (counted from the rows).

    Runs inside the inserting transaction, after taking the user's lock: on PostgreSQL
    ``SELECT ... FOR NO KEY UPDATE`` on the user's row (it does not block inserts that only
    reference the user); on SQLite the write transaction itself
    (``BEGIN IMMEDIATE``, db/session.py: one writer at a time). So a burst of concurrent requests
    of one user is counted one request after the other and never exceeds either limit.
    """
    if session.get_bind().dialect.name != "sqlite":
        session.execute(select(User.id).where(User.id == principal.user_id).with_for_update(key_share=True))
    since = utcnow() - dt.timedelta(minutes=1)
    recent = session.scalar(
        select(func.count()).select_from(Vm).where(Vm.user_id == principal.user_id, Vm.created_at >= since)
    )
    if int(recent or 0) >= ctx.settings.max_vm_creations_per_user_per_minute:
        raise VmRateLimited(log_detail=f"user {principal.user_id}: {recent} VMs in the last minute")
    live = session.scalar(
        select(func.count()).select_from(Vm).where(
            Vm.user_id == principal.user_id, Vm.status.not_in([s.value for s in VM_ENDING])
        )
    )
    if int(live or 0) >= ctx.settings.live_vms_limit:
        raise TooManyLiveVms(log_detail=f"user {principal.user_id}: {live} live VMs")


def _boot(ctx: AppContext, vm: Vm, image: ImageRef | None, *, first_boot: bool, session_id: str | None,
          home: HomeDisk | None = None) -> None:
    """creating/stopped → starting → (driver) → wait for agent (and its home mounted) → running; or → failed."""
    with ctx.db.transaction() as session:
        if not first_boot:  # a stopped VM holds no capacity: it must fit again to start
            capacity.admit(ctx, session, vcpus=vm.vcpus, memory_mib=vm.memory_mib, vm_type=vm.vm_type,
                           exclude_vm_id=vm.id)
        set_vm_status(session, vm, VmStatus.STARTING, module=MODULE,
                      message="Booting the VM" if first_boot else "Starting the VM again", session_id=session_id)
    spec = spec_of(ctx, vm, image, home)
    started = time.monotonic()
    try:
        boot = ctx.driver.create(spec) if first_boot else ctx.driver.start(spec)
    except RemotecliError as exc:
        console = ctx.driver.console_tail(spec, 20)
        _fail_quietly(ctx, vm, f"the hypervisor did not start: {exc.message}", console=console, session_id=session_id)
        raise VmBootFailed(
            "The VM did not start; its console log is in the VM's timeline.",
            log_detail=exc.log_detail or exc.message,
        ) from exc
    except Exception as exc:
        _fail_quietly(ctx, vm, f"the hypervisor did not start: {type(exc).__name__}", session_id=session_id)
        raise VmBootFailed(log_detail=repr(exc)) from exc
    with ctx.db.transaction() as session:
        fresh = load_vm(session, vm.id)
        if fresh.status != VmStatus.STARTING.value:
            # Someone (the reconciler, a destroy) took the VM over while it booted.
            raise StatusChanged(log_detail=f"{vm.id} became {fresh.status} while booting")
        fresh.endpoint = boot.endpoint
        fresh.updated_at = utcnow()
        if boot.warning:  # a snapshot restore failed or did not fit: booted cold (ADR 0012)
            record_event(session, module=MODULE, kind="vm.restore_fallback", message=boot.warning,
                         user_id=vm.user_id, vm_id=vm.id, session_id=session_id)
        record_event(session, module=MODULE, kind="vm.booted",
                     message="Restored from the snapshot; waiting for the guest agent" if boot.restored
                     else "Hypervisor running; waiting for the guest agent",
                     user_id=vm.user_id, vm_id=vm.id, session_id=session_id,
                     details={"accel": boot.accel, "driver": ctx.driver.name, "restored": boot.restored})
    vm.endpoint = boot.endpoint
    remaining = max(1.0, ctx.settings.vm_boot_timeout_s - (time.monotonic() - started))
    home_problem: tuple[str, bool] | None = None
    try:
        agent = ctx.agent(vm, timeout=min(5.0, remaining))
        try:
            agent.wait_ready(remaining)
            if home is not None:
                home_problem = workspaces.check_guest_home(home, agent.read_file)
        finally:
            agent.close()
    except AgentError as exc:
        console = ctx.driver.console_tail(spec, 20)
        try:
            ctx.driver.stop(spec, timeout=1.0)
        except Exception:
            log.exception("could not stop a VM whose agent never answered", extra={"vm_id": vm.id})
        _fail_quietly(ctx, vm, f"the guest agent did not answer within {ctx.settings.vm_boot_timeout_s:.0f} s",
                      console=console, session_id=session_id)
        raise VmBootFailed(log_detail=exc.log_detail or exc.message) from exc
    if home is not None and home_problem is not None:
        problem, volume_broken = home_problem
        console = ctx.driver.console_tail(spec, 20)
        try:
            ctx.driver.stop(spec, timeout=2.0)
        except Exception:
            log.exception("could not stop a VM whose home did not mount", extra={"vm_id": vm.id})
        _fail_quietly(ctx, vm, f"its home volume was not mounted: {problem}", console=console, session_id=session_id)
        if volume_broken:
            volume = workspaces.attached_to(ctx, vm.id)
            if volume is not None:
                workspaces.mark_failed(ctx, volume, problem, vm_id=vm.id)
        raise WorkspaceUnavailable(
            f"Your workspace's home could not be mounted ({problem}); nothing in it was changed. "
            "An operator can see the details in the VM's timeline.",
            log_detail=problem,
        )
    elapsed = time.monotonic() - started
    with ctx.db.transaction() as session:
        set_vm_status(session, vm, VmStatus.RUNNING, module=MODULE, message="Guest agent ready",
                      session_id=session_id, last_seen_at=utcnow(), last_active_at=utcnow(),
                      details={"boot_s": round(elapsed, 3)})


def _fail_quietly(ctx: AppContext, vm: Vm, reason: str, *, console: str = "", session_id: str | None = None) -> None:
    try:
        fail_vm(ctx, vm.id, reason, console=console, session_id=session_id)
    except Exception:
        log.exception("could not mark VM failed", extra={"vm_id": vm.id})


def fail_vm(
    ctx: AppContext, vm_id: str, reason: str, *, console: str = "", session_id: str | None = None,
    module: str = MODULE,
) -> Vm | None:
    """Mark a VM ``failed`` from whatever non-terminal status it has now. No-op if already terminal."""
    for _ in range(5):
        with ctx.db.transaction() as session:
            vm = load_vm(session, vm_id)
            if VmStatus(vm.status) in VM_TERMINAL:
                return vm
            try:
                status_reason = reason if not console else f"{reason}\n--- console (last lines) ---\n{console}"
                return set_vm_status(session, vm, VmStatus.FAILED, module=module, message="VM failed",
                                     reason=status_reason, session_id=session_id)
            except StatusChanged:
                continue
    return None


# ----------------------------------------------------------------------------------------------
# Selecting a VM for work


def prove_alive(ctx: AppContext, vm: Vm) -> str | None:
    """None when ``vm`` is proven alive (host process, directory, guest agent); else the reason."""
    spec = spec_of(ctx, vm)
    if not ctx.driver.has_state(spec):
        return "its directory is gone"
    inspection = ctx.driver.inspect(spec)
    if inspection.liveness is Liveness.DEAD:
        return f"the hypervisor says it is dead ({inspection.reason})"
    if inspection.liveness is Liveness.UNKNOWN:
        return f"the hypervisor could not confirm it is alive ({inspection.reason})"
    if vm.status == VmStatus.RUNNING.value and inspection.power not in (PowerState.RUNNING, PowerState.UNKNOWN):
        return f"its CPUs are {inspection.power.value}, not running"
    if vm.status == VmStatus.RUNNING.value:
        try:
            agent = ctx.agent(vm, timeout=min(5.0, ctx.settings.agent_request_timeout_s))
            try:
                agent.health()
            finally:
                agent.close()
        except AgentError as exc:
            return f"its guest agent does not answer ({exc.code})"
    return None


def live_cli_vm(ctx: AppContext, user_id: str) -> Vm | None:
    """The user's CLI VM row that is not ending (failed, destroying, destroyed): the one ``ensure``
    would take, not yet proven alive. The database allows at most one."""
    with ctx.db.read() as session:
        return session.scalars(select(Vm).where(
            Vm.user_id == user_id, Vm.vm_type == VmType.CLI.value,
            Vm.status.not_in([s.value for s in VM_ENDING]),
        )).one_or_none()


def ensure_cli_vm(ctx: AppContext, principal: Principal, *, session_id: str | None = None) -> tuple[Vm, bool]:
    """The user's live CLI VM, proven alive; or a new one. Returns ``(vm, created)``.

    Selection takes only ``running`` (proven alive) or ``creating``/``starting`` (waited for) VMs.
    A ``paused`` VM is resumed and a ``stopped`` one started again, after proving its host
    resources exist (see docs/decisions/0005-selecting-a-cli-vm.md). Anything that fails a proof is
    marked ``failed`` with the reason and a new VM is created. ``failed`` and ``destroyed`` rows
    are never looked at.
    """
    deadline = time.monotonic() + ctx.settings.vm_boot_timeout_s * 2 + 30
    with log_context(user_id=principal.user_id, session_id=session_id):
        while time.monotonic() < deadline:
            vm = live_cli_vm(ctx, principal.user_id)
            if vm is None:
                try:
                    return create_vm(ctx, principal, VmType.CLI.value, session_id=session_id), True
                except AlreadyExists:
                    continue  # another caller created it first: take theirs
                except StatusChanged:
                    continue
            status = VmStatus(vm.status)
            if status is VmStatus.UNKNOWN:
                # Its host is unreachable (issue 14): not dead, so no second CLI VM until the
                # reconciler fails it after member_unreachable_grace_s.
                raise WorkspaceUnavailable(
                    "Your workspace's host cannot be reached right now; try again in a few minutes.",
                    log_detail=f"{vm.id} is unknown: {vm.status_reason}")
            if status in (VmStatus.CREATING, VmStatus.STARTING, VmStatus.STOPPING):
                _wait_while(ctx, vm, status, session_id=session_id)
                continue
            if status is VmStatus.RUNNING:
                reason = prove_alive(ctx, vm)
                if reason is None:
                    _touch(ctx, vm)
                    return vm, False
                _skip_stale(ctx, vm, reason, session_id)
                continue
            if status is VmStatus.PAUSED:
                reason = prove_alive(ctx, vm)
                if reason is None:
                    try:
                        resume_vm(ctx, None, vm.id, session_id=session_id)
                    except (StatusChanged, InvalidTransition, VmTerminal):
                        pass
                    except RemotecliError as exc:
                        _skip_stale(ctx, vm, f"it could not be resumed ({exc.code})", session_id)
                    continue
                _skip_stale(ctx, vm, reason, session_id)
                continue
            if status is VmStatus.STOPPED:
                if not ctx.driver.has_state(spec_of(ctx, vm)):
                    _skip_stale(ctx, vm, "its directory is gone", session_id)
                    continue
                try:
                    start_vm(ctx, None, vm.id, session_id=session_id)
                except (StatusChanged, InvalidTransition, VmTerminal):
                    pass
                except VmBootFailed:
                    pass  # _boot marked it failed; the next pass creates a new one
                continue
        raise VmBootFailed("Your CLI workspace could not be prepared in time; try again in a minute.")


def _touch(ctx: AppContext, vm: Vm) -> None:
    """Record that ``vm`` was just proven alive and used (at most every few seconds: it is a write)."""
    now = utcnow()
    if vm.last_seen_at is not None and (now - vm.last_seen_at).total_seconds() < 5:
        return
    with ctx.db.transaction() as session:
        session.execute(update(Vm).where(Vm.id == vm.id).values(last_seen_at=now, last_active_at=now))
    vm.last_seen_at = now
    vm.last_active_at = now


def mark_active(ctx: AppContext, vm_id: str) -> None:
    """The VM is in use (exec, an open terminal): it is not idle (``cli_vm_idle_stop_s``)."""
    with ctx.db.transaction() as session:
        session.execute(update(Vm).where(Vm.id == vm_id).values(last_active_at=utcnow())
                        .execution_options(synchronize_session=False))


def _skip_stale(ctx: AppContext, vm: Vm, reason: str, session_id: str | None) -> None:
    log.warning("Skipping stale CLI VM: %s", reason, extra={"vm_id": vm.id, "user_id": vm.user_id})
    fail_vm(ctx, vm.id, f"not usable: {reason}", session_id=session_id)
    # A failed VM must not keep burning memory until garbage collection: stop its process now,
    # keeping the directory (console log) for the post-mortem.
    try:
        ctx.driver.stop(spec_of(ctx, vm), timeout=2.0)
    except Exception:
        log.warning("could not stop the stale VM's process; the reconciler will", extra={"vm_id": vm.id})
    _release_quietly(ctx, vm.id, session_id=session_id)
    with ctx.db.transaction() as session:
        record_event(session, module=MODULE, kind="vm.skipped",
                     message=f"Stale CLI VM skipped ({reason}); a new one will be prepared",
                     user_id=vm.user_id, vm_id=vm.id, session_id=session_id)


def _release_quietly(ctx: AppContext, vm_id: str, *, session_id: str | None = None, module: str = MODULE) -> None:
    """Detach the home volume of an ended VM once it is proven dead; else the reconciler will."""
    try:
        workspaces.release(ctx, vm_id, session_id=session_id, module=module)
    except RemotecliError as exc:
        log.warning("home volume stays attached to the ended VM for now: %s", exc.log_detail or exc.message,
                    extra={"vm_id": vm_id})


def _wait_while(ctx: AppContext, vm: Vm, status: VmStatus, *, session_id: str | None) -> None:
    """Wait for another caller to move ``vm`` out of a transient ``status``; fail it if wedged."""
    limit = ctx.settings.vm_boot_timeout_s + 15
    while True:
        with ctx.db.read() as session:
            fresh = session.get(Vm, vm.id)
        if fresh is None or fresh.status != status.value:
            return
        age = (utcnow() - fresh.status_changed_at).total_seconds()
        if age > limit:
            fail_vm(ctx, vm.id, f"wedged in {status.value} for {age:.0f} s", session_id=session_id)
            return
        time.sleep(_WAIT_POLL_S)


# ----------------------------------------------------------------------------------------------
# Actions on one VM


def _load_for_action(ctx: AppContext, principal: Principal | None, vm_id: str) -> Vm:
    vm = get_vm(ctx, principal, vm_id)
    if VmStatus(vm.status) in VM_TERMINAL:
        raise VmTerminal()
    return vm


def _driver_failed(ctx: AppContext, vm: Vm, action: str, exc: Exception, session_id: str | None = None) -> None:
    reason = f"{action} failed: {exc.message if isinstance(exc, RemotecliError) else type(exc).__name__}"
    log.warning("%s", reason, extra={"vm_id": vm.id})
    fail_vm(ctx, vm.id, reason, session_id=session_id)


#: The status reason of a CLI VM the reconciler stopped while idle: its next use starts it again
#: (a VM someone stopped on purpose stays stopped until they start it).
IDLE_STOP_REASON = "stopped while idle"


def stop_vm(ctx: AppContext, principal: Principal | None, vm_id: str, *, reason: str | None = None,
            module: str = MODULE) -> Vm:
    vm = _load_for_action(ctx, principal, vm_id)
    if vm.status == VmStatus.STOPPED.value:
        return vm
    with ctx.db.transaction() as session:
        set_vm_status(session, vm, VmStatus.STOPPING, module=module, message="Stopping the VM", reason=reason)
    try:
        ctx.driver.stop(spec_of(ctx, vm), ctx.settings.vm_stop_timeout_s)
    except Exception as exc:
        _driver_failed(ctx, vm, "stop", exc)
        raise DriverError(log_detail=repr(exc)) from exc
    with ctx.db.transaction() as session:
        return set_vm_status(session, vm, VmStatus.STOPPED, module=module, message="VM stopped", endpoint=None,
                             reason=reason)


def start_vm(ctx: AppContext, principal: Principal | None, vm_id: str, *, session_id: str | None = None) -> Vm:
    vm = _load_for_action(ctx, principal, vm_id)
    if vm.status == VmStatus.RUNNING.value:
        return vm
    if vm.status != VmStatus.STOPPED.value:
        raise InvalidTransition(f"Only a stopped VM can be started; this one is {vm.status}.")
    image = _resolve_image(ctx, VmType(vm.vm_type))
    with log_context(vm_id=vm.id, user_id=vm.user_id):
        home = _attach_home(ctx, vm, session_id) if vm.vm_type == VmType.CLI.value else None
        _boot(ctx, vm, image, first_boot=False, session_id=session_id, home=home)
    return vm


def pause_vm(ctx: AppContext, principal: Principal | None, vm_id: str) -> Vm:
    vm = _load_for_action(ctx, principal, vm_id)
    if not ctx.driver.capabilities.pause:
        raise NotSupported(f"The {ctx.driver.name} driver cannot pause VMs.")
    if vm.status == VmStatus.PAUSED.value:
        return vm
    if vm.status != VmStatus.RUNNING.value:
        raise VmNotRunning(f"Only a running VM can be paused; this one is {vm.status}.")
    try:
        ctx.driver.pause(spec_of(ctx, vm))
    except VmGone as exc:
        _driver_failed(ctx, vm, "pause", exc)
        raise VmTerminal("The VM stopped unexpectedly and was marked failed.") from exc
    with ctx.db.transaction() as session:
        return set_vm_status(session, vm, VmStatus.PAUSED, module=MODULE, message="VM paused",
                             expected=VmStatus.RUNNING)


def resume_vm(ctx: AppContext, principal: Principal | None, vm_id: str, *, session_id: str | None = None) -> Vm:
    vm = _load_for_action(ctx, principal, vm_id)
    if not ctx.driver.capabilities.pause:
        raise NotSupported(f"The {ctx.driver.name} driver cannot pause or resume VMs.")
    if vm.status == VmStatus.RUNNING.value:
        return vm
    if vm.status != VmStatus.PAUSED.value:
        raise InvalidTransition(f"Only a paused VM can be resumed; this one is {vm.status}.")
    try:
        ctx.driver.resume(spec_of(ctx, vm))
    except VmGone as exc:
        _driver_failed(ctx, vm, "resume", exc, session_id)
        raise VmTerminal("The VM stopped unexpectedly and was marked failed.") from exc
    with ctx.db.transaction() as session:
        return set_vm_status(session, vm, VmStatus.RUNNING, module=MODULE, message="VM resumed",
                             expected=VmStatus.PAUSED, session_id=session_id, last_seen_at=utcnow())


def destroy_vm(ctx: AppContext, principal: Principal | None, vm_id: str, *, reason: str = "destroyed on request",
               module: str = MODULE, session_id: str | None = None) -> Vm:
    """Remove a VM and everything it owns on the host. Idempotent: a destroyed VM stays destroyed."""
    vm = get_vm(ctx, principal, vm_id)
    if vm.status == VmStatus.DESTROYED.value:
        return vm
    if vm.status != VmStatus.DESTROYING.value:
        with ctx.db.transaction() as session:
            set_vm_status(session, vm, VmStatus.DESTROYING, module=module, message=f"Destroying the VM ({reason})",
                          session_id=session_id, details={"reason": reason})
    try:
        ctx.driver.destroy(spec_of(ctx, vm))
    except Exception as exc:
        log.exception("destroy failed; the reconciler will retry", extra={"vm_id": vm.id})
        raise DriverError(log_detail=repr(exc)) from exc
    with ctx.db.transaction() as session:
        set_vm_status(session, vm, VmStatus.DESTROYED, module=module, message="VM destroyed",
                      expected=VmStatus.DESTROYING, session_id=session_id, endpoint=None)
    if vm.vm_type == VmType.CLI.value:
        _release_quietly(ctx, vm.id, session_id=session_id, module=module)
    return vm


def rebuild_cli_vm(ctx: AppContext, principal: Principal | None, vm_id: str) -> Vm:
    """A new CLI VM on the current image with the same home (the way to take a new image or new
    CLI versions). The old VM is shut down gracefully when it runs (its home is unmounted cleanly),
    then destroyed; the home moves to the new VM after the old one is proven gone (ADR 0011).

    Rebuilding is *use* of the VM: only its owner may (the operator's CLI may on any VM).
    """
    vm = get_vm(ctx, principal, vm_id)
    if principal is not None:
        access.ensure_own(principal.user_id, vm.user_id, VmNotFound())
    if vm.vm_type != VmType.CLI.value:
        raise InvalidInput("Only a CLI VM can be rebuilt; it keeps the user's home.")
    with log_context(vm_id=vm.id, user_id=vm.user_id):
        if vm.status in (VmStatus.RUNNING.value, VmStatus.PAUSED.value):
            try:
                stop_vm(ctx, None, vm.id)
            except RemotecliError as exc:  # the destroy below kills it anyway
                log.warning("graceful stop before a rebuild failed: %s", exc.code, extra={"vm_id": vm.id})
        if vm_manager_status(ctx, vm.id) != VmStatus.DESTROYED.value:
            destroy_vm(ctx, None, vm.id, reason="rebuilt on the current image")
        with ctx.db.read() as session:
            from remotecli.db.models import User

            user = session.get(User, vm.user_id)
        if user is None:
            raise NotFound("The VM's user no longer exists.")
        new, _ = ensure_cli_vm(ctx, Principal(user.id, user.name, user.is_admin))
        with ctx.db.transaction() as session:
            record_event(session, module=MODULE, kind="vm.rebuilt", message="CLI VM rebuilt with the same home",
                         user_id=vm.user_id, vm_id=new.id, details={"replaces": vm.id, "image": new.image_hash})
    return new


def vm_manager_status(ctx: AppContext, vm_id: str) -> str | None:
    with ctx.db.read() as session:
        return session.scalar(select(Vm.status).where(Vm.id == vm_id))


def require_running(ctx: AppContext, principal: Principal | None, vm_id: str) -> Vm:
    vm = _load_for_action(ctx, principal, vm_id)
    if vm.status != VmStatus.RUNNING.value:
        raise VmNotRunning(f"The VM is {vm.status}; it must be running for that.")
    return vm
