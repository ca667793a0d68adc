"""Persistent workspaces: each user's home volume, attached to exactly one CLI VM at a time (ADR 0011).

A volume row (``volumes``) is made with the user's first CLI VM; the driver makes the volume (for
the QEMU and Firecracker drivers a sparse ext4 file under ``<data_dir>/volumes``). Every CLI VM of
the user gets it as its home disk; the guest's init checks it (``e2fsck -p``) and mounts it at the
cli user's home before the guest agent starts.

Fencing. The database allows one attachment per volume (``volumes.attached_vm_id`` is unique, and
every change is a conditional update through ``transitions.set_volume_status``). A volume leaves
the VM it is attached to only when

1. that VM's row is ending (failed, destroying, destroyed, or gone): a live VM keeps its home; and
2. the driver has proven its hypervisor process dead (``driver.fence``: killed if it still ran,
   then inspected from the host). A VM presumed dead is not enough.

Then, in one transaction, the volume is detached and (when a new VM asked) attached to the new VM.
Like the rest of the services this is load → act → apply: no transaction is open during the driver
calls; a row that changed meanwhile makes the conditional update fail and the caller look again.

The controller never formats a volume that existed: a volume whose file is missing or unreadable
becomes ``failed`` (and so does the VM that wanted it) until an operator restores the file.

Why one module of about 450 lines: the volume's whole life (make, attach, fence, detach, idle
stop, orphans, usage) follows the one fencing rule above; kept together, every path that moves a
volume can be checked against it in one read. Export and import are ``services.workspace_transfer``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from remotecli.agent.protocol import FileContent
from remotecli.background.leases import VOLUME_LEASES, holder_dead, process_owner
from remotecli.context import AppContext
from remotecli.db.models import Vm, Volume, utcnow
from remotecli.domain.states import VM_ENDING, VOLUME_LIVE, VmStatus, VolumeStatus
from remotecli.drivers.base import HomeDisk, Liveness, VmSpec
from remotecli.errors import RemotecliError, WorkspaceBusy, WorkspaceUnavailable
from remotecli.logging import get_logger
from remotecli.services.transitions import StatusChanged, record_event, set_volume_status

MODULE = "workspaces"
log = get_logger(MODULE)

#: Where the guest's init writes what it did with the home volume (read through the agent).
HOME_STATUS_PATH = "/run/remotecli/home.json"
_POLL_S = 0.1
#: A volume being made is held by a lease (``background.leases.VOLUME_LEASES``) that its maker
#: renews every third of it while the driver makes the volume. A maker that died renews nothing:
#: the lease lapses within this time and the next ensure (any controller) or reconciler pass
#: takes the row over.
CREATING_LEASE_S = 6.0
_RENEW_EVERY_S = CREATING_LEASE_S / 3
_FENCE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class WorkspaceView:
    """A home volume as the API and CLI show it."""

    id: str
    user_id: str
    status: str
    status_reason: str | None
    size_bytes: int
    attached_vm_id: str | None
    created_at: dt.datetime
    attached_at: dt.datetime | None

    @classmethod
    def of(cls, volume: Volume) -> WorkspaceView:
        return cls(
            id=volume.id,
            user_id=volume.user_id,
            status=volume.status,
            status_reason=volume.status_reason,
            size_bytes=volume.size_bytes,
            attached_vm_id=volume.attached_vm_id,
            created_at=volume.created_at,
            attached_at=volume.attached_at,
        )


def location_for(ctx: AppContext, volume_id: str) -> str:
    return str(ctx.settings.volumes_dir / f"{volume_id}.ext4")


def _cli_uid() -> int:
    from remotecli.images.recipes import CLI

    return CLI.primary_user.uid


def home_disk(ctx: AppContext, volume: Volume) -> HomeDisk:
    return HomeDisk(volume_id=volume.id, location=volume.location, mount_path=ctx.settings.cli_guest_home)


def user_volume(ctx: AppContext, user_id: str) -> Volume | None:
    """The user's home volume (not deleted), or None."""
    with ctx.db.read() as session:
        return session.scalars(
            select(Volume).where(Volume.user_id == user_id, Volume.status.in_([s.value for s in VOLUME_LIVE]))
        ).one_or_none()


def attached_to(ctx: AppContext, vm_id: str) -> Volume | None:
    with ctx.db.read() as session:
        return session.scalars(select(Volume).where(Volume.attached_vm_id == vm_id)).one_or_none()


def _unavailable(volume: Volume | None, reason: str | None) -> WorkspaceUnavailable:
    return WorkspaceUnavailable(
        f"Your workspace's storage cannot be used: {reason or 'it is not ready'}. Nothing in it was changed or "
        "replaced; an operator must restore it (see 'remotecli workspace show').",
        log_detail=f"volume {volume.id if volume else '-'}: {reason}",
    )


# ----------------------------------------------------------------------------------------------
# Creating


def ensure_volume(ctx: AppContext, user_id: str, *, vm_id: str | None = None,
                  session_id: str | None = None) -> Volume:
    """The user's home volume; made (formatted once) when the user has none.

    Whoever inserts the ``creating`` row holds its lease (``VOLUME_LEASES``) and renews it while
    the driver makes the volume. Others wait; once the lease lapses (its holder died: a killed
    controller renews nothing), or at once when the holder is a process of this host that no
    longer exists (``holder_dead``: a SIGKILLed controller, seen by its restarted successor), the
    next caller takes the row over and finishes it, keeping a volume file the dead maker completed.
    """
    owner = process_owner("vol")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        volume = user_volume(ctx, user_id)
        if volume is None:
            volume = _new_row(ctx, user_id, owner, vm_id=vm_id, session_id=session_id)
            if volume is None:
                continue  # another caller inserted it first: wait for theirs
            made = _make(ctx, volume, owner, vm_id=vm_id)
        elif volume.status != VolumeStatus.CREATING.value:
            return volume
        elif (_lease_lapsed(volume) or holder_dead(volume.lease_owner)) and (
                taken := _take_over(ctx, volume, owner, vm_id=vm_id)) is not None:
            made = _make(ctx, taken, owner, vm_id=vm_id)
        else:
            time.sleep(_POLL_S)
            continue
        if made is not None:
            return made
    raise WorkspaceBusy("Your workspace is still being prepared; try again in a minute.")


def _lease_lapsed(volume: Volume) -> bool:
    return volume.lease_owner is None or volume.lease_expires_at is None or volume.lease_expires_at < utcnow()


def _new_row(ctx: AppContext, user_id: str, owner: str, *, vm_id: str | None,
             session_id: str | None) -> Volume | None:
    volume_id = f"vol-{uuid.uuid4()}"
    now = utcnow()
    size = ctx.settings.workspace_size_gib * 1024**3
    volume = Volume(
        id=volume_id, user_id=user_id, status=VolumeStatus.CREATING.value, size_bytes=size,
        driver=ctx.driver.name, location=location_for(ctx, volume_id), generation=0,
        created_at=now, updated_at=now, status_changed_at=now,
        lease_owner=owner, lease_expires_at=now + dt.timedelta(seconds=CREATING_LEASE_S),
    )
    try:
        with ctx.db.transaction() as session:
            session.add(volume)
            session.flush()
            record_event(session, module=MODULE, kind="volume.status", message="Home volume requested",
                         user_id=user_id, to_status=VolumeStatus.CREATING.value,
                         details={"volume_id": volume_id, "vm_id": vm_id, "session_id": session_id,
                                  "size_bytes": size, "driver": ctx.driver.name})
    except IntegrityError:
        return None
    return volume


def _take_over(ctx: AppContext, volume: Volume, owner: str, *, vm_id: str | None,
               module: str = MODULE) -> Volume | None:
    """Claim the lapsed lease of a ``creating`` row whose maker died; the row as now held, or None
    when someone else claimed it or it is no longer being made."""
    dead = [volume.lease_owner] if volume.lease_owner and holder_dead(volume.lease_owner) else []
    if not VOLUME_LEASES.claim(ctx.db, owner, CREATING_LEASE_S, ids=[volume.id], dead_holders=dead,
                               where=[Volume.status == VolumeStatus.CREATING.value]):
        return None
    with ctx.db.transaction() as session:
        fresh = session.get(Volume, volume.id)
        if fresh is None or fresh.status != VolumeStatus.CREATING.value or fresh.lease_owner != owner:
            return None
        record_event(session, module=module, kind="volume.taken_over", user_id=fresh.user_id,
                     message="Home volume's making taken over: whoever was making it "
                             + ("is a process that no longer exists" if dead else "stopped renewing its lease"),
                     details={"volume_id": fresh.id, "previous_owner": volume.lease_owner, "holder_dead": bool(dead),
                              "lease_expired_at": volume.lease_expires_at.isoformat()
                              if volume.lease_expires_at else None, "vm_id": vm_id})
    log.info("took over the making of a home volume", extra={"volume_id": volume.id, "user_id": volume.user_id})
    return fresh


@contextlib.contextmanager
def _renewing(ctx: AppContext, volume_id: str, owner: str) -> Iterator[None]:
    """Keep ``owner``'s lease of the volume row fresh while the block runs (a driver call)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(_RENEW_EVERY_S):
            try:
                if VOLUME_LEASES.renew(ctx.db, owner, [volume_id], CREATING_LEASE_S) == 0:
                    return  # taken over: the apply step below finds out
            except Exception:  # a dropped connection: try again at the next beat
                log.warning("could not renew a home volume's lease", exc_info=True, extra={"volume_id": volume_id})

    thread = threading.Thread(target=beat, name=f"lease-{volume_id[:16]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _held(session: Session, volume_id: str, owner: str) -> Volume | None:
    """In a transaction: the volume row, locked, if ``owner`` still holds it while it is made."""
    _lock(session, volume_id)
    fresh = session.get(Volume, volume_id)
    if fresh is None or fresh.status != VolumeStatus.CREATING.value or fresh.lease_owner != owner:
        return None
    return fresh


def _make(ctx: AppContext, volume: Volume, owner: str, *, vm_id: str | None) -> Volume | None:
    """creating → (driver makes the volume) → available; or → failed with the reason. Under the
    row's lease; None when the lease was lost meanwhile (the caller looks again)."""
    started = time.monotonic()
    made_file = False
    error: RemotecliError | None = None
    with _renewing(ctx, volume.id, owner):
        if ctx.driver.volume_problem(volume.location) is not None:
            # A file a dead maker completed is kept as it is (link-into-place makes it whole or
            # absent); create_volume refuses to run where any file exists.
            try:
                ctx.driver.create_volume(volume.location, volume.size_bytes, _cli_uid())
                made_file = True
            except RemotecliError as exc:
                if ctx.driver.volume_problem(volume.location) is not None:
                    error = exc  # not a complete volume someone else linked into place meanwhile
    with ctx.db.transaction() as session:
        fresh = _held(session, volume.id, owner)
        if fresh is not None and error is not None:
            reason = f"it could not be made ({error.message})"
            set_volume_status(session, fresh, VolumeStatus.FAILED, module=MODULE, reason=reason,
                              message="Home volume could not be made", vm_id=vm_id,
                              lease_owner=None, lease_expires_at=None,
                              details={"error": error.log_detail or error.message})
        elif fresh is not None:
            set_volume_status(session, fresh, VolumeStatus.AVAILABLE, module=MODULE, message="Home volume made",
                              vm_id=vm_id, lease_owner=None, lease_expires_at=None,
                              details={"format_s": round(time.monotonic() - started, 3), "formatted": made_file})
    if fresh is None:
        _lost_lease(ctx, volume, made_file)
        return None
    if error is not None:
        raise _unavailable(fresh, fresh.status_reason) from error
    return fresh


def _lost_lease(ctx: AppContext, volume: Volume, made_file: bool) -> None:
    """This caller's lease lapsed while it made the volume and someone else settled the row. A
    file made just now for a row that ended (the reconciler found no file) is removed: nothing
    else can ever use it (locations are never reused)."""
    with ctx.db.read() as session:
        now = session.get(Volume, volume.id)
    log.warning("lost the lease of a home volume being made", extra={"volume_id": volume.id})
    if made_file and (now is None or now.status in (VolumeStatus.DELETING.value, VolumeStatus.DELETED.value)):
        ctx.driver.delete_volume(volume.location)


def stuck_creating(ctx: AppContext) -> list[Volume]:
    """Volume rows left ``creating`` whose maker's lease lapsed (the maker died)."""
    now = utcnow()
    with ctx.db.read() as session:
        return list(session.scalars(
            select(Volume).where(Volume.status == VolumeStatus.CREATING.value, VOLUME_LEASES.free(now))
            .order_by(Volume.created_at)
        ))


def settle_creating(ctx: AppContext, volume: Volume, owner: str, *, module: str = MODULE) -> str:
    """The reconciler's answer to a row left ``creating`` by a maker that died, under the row's
    lease: a complete volume file → ``available`` (kept as it is); no file → the row ends
    (``deleting → deleted``: nothing was made, the next ensure makes a volume); a file that is not
    a usable volume → ``failed`` (never formatted over). Returns what it did, or "busy" when
    someone else holds the row (an ensure taking it over)."""
    taken = _take_over(ctx, volume, owner, vm_id=None, module=module)
    if taken is None:
        return "busy"
    problem = ctx.driver.volume_problem(taken.location)
    absent = not os.path.lexists(taken.location)  # every driver's location is a host file (ADR 0011)
    with ctx.db.transaction() as session:
        fresh = _held(session, taken.id, owner)
        if fresh is None:
            return "lost"
        done = {"lease_owner": None, "lease_expires_at": None}
        if problem is None:
            set_volume_status(session, fresh, VolumeStatus.AVAILABLE, module=module, **done,
                              message="Home volume found complete after its maker died")
            return "available"
        if absent:
            set_volume_status(session, fresh, VolumeStatus.DELETING, module=module, **done,
                              reason="its maker died before making it",
                              message="Home volume was never made: its maker died first")
            set_volume_status(session, fresh, VolumeStatus.DELETED, module=module,
                              expected=VolumeStatus.DELETING, reason="its maker died before making it",
                              message="Home volume row removed; the next CLI VM makes the volume")
            return "removed"
        set_volume_status(session, fresh, VolumeStatus.FAILED, module=module, reason=problem, **done,
                          message="Home volume left by a maker that died cannot be used")
        return "failed"


# ----------------------------------------------------------------------------------------------
# Attaching and fencing


def _spec_for_fence(ctx: AppContext, vm_id: str, vm: Vm | None) -> VmSpec:
    if vm is not None:
        return VmSpec(vm_id=vm.id, vm_type=vm.vm_type, vcpus=vm.vcpus, memory_mib=vm.memory_mib,
                      directory=Path(vm.directory), agent_secret="")
    return VmSpec(vm_id=vm_id, vm_type="cli", vcpus=1, memory_mib=128,
                  directory=ctx.settings.vms_dir / vm_id, agent_secret="")


def prepare_home(ctx: AppContext, user_id: str, *, session_id: str | None = None) -> Volume:
    """Before a new CLI VM's row exists: the user's volume exists (made on the first CLI VM), is
    usable, and is no longer attached to an ended VM (fenced and detached here)."""
    volume = ensure_volume(ctx, user_id, session_id=session_id)
    if volume.status == VolumeStatus.FAILED.value:
        raise _unavailable(volume, volume.status_reason)
    if volume.attached_vm_id is not None:
        with ctx.db.read() as session:
            holder = session.get(Vm, volume.attached_vm_id)
        if holder is None or VmStatus(holder.status) in VM_ENDING:
            release(ctx, volume.attached_vm_id, session_id=session_id)
    return volume


def attach_home(ctx: AppContext, vm: Vm, *, session_id: str | None = None) -> HomeDisk:
    """Attach the user's home volume to ``vm`` (a CLI VM being booted) and return it.

    Makes the volume on the user's first CLI VM. When the volume is still attached to an earlier
    VM, that VM must be ending and is fenced first (see the module docstring). Raises
    ``WorkspaceUnavailable`` when the volume's file is missing or unreadable (the volume is marked
    ``failed``; the controller never makes a new one over it) and ``WorkspaceBusy`` when the
    earlier VM could not be proven dead.
    """
    assert vm.user_id is not None  # a CLI VM always has its user (only pool Browser VMs have none)
    volume = ensure_volume(ctx, vm.user_id, vm_id=vm.id, session_id=session_id)
    for _ in range(20):
        with ctx.db.read() as session:
            fresh = session.get(Volume, volume.id)
        if fresh is None:
            raise _unavailable(volume, "its record is gone")
        volume = fresh
        status = VolumeStatus(volume.status)
        if status is VolumeStatus.FAILED or status not in (VolumeStatus.AVAILABLE, VolumeStatus.ATTACHED):
            raise _unavailable(volume, volume.status_reason or f"it is {volume.status}")
        if volume.attached_vm_id is not None and volume.attached_vm_id != vm.id:
            release(ctx, volume.attached_vm_id, wanted_by=vm.id, session_id=session_id)
            continue
        problem = ctx.driver.volume_problem(volume.location)
        if problem is not None:
            mark_failed(ctx, volume, problem, vm_id=vm.id)
            raise _unavailable(volume, problem)
        if volume.attached_vm_id == vm.id:
            return home_disk(ctx, volume)
        try:
            with ctx.db.transaction() as session:
                _lock(session, volume.id)
                owner = session.get(Vm, vm.id)
                if owner is None or VmStatus(owner.status) in VM_ENDING:
                    raise StatusChanged(log_detail=f"{vm.id} ended before its home was attached")
                set_volume_status(session, volume, VolumeStatus.ATTACHED, module=MODULE, vm_id=vm.id,
                                  expected=VolumeStatus.AVAILABLE, attached_vm_id=vm.id, attached_at=utcnow(),
                                  message="Home volume attached to the CLI VM")
        except (StatusChanged, IntegrityError):
            continue
        return home_disk(ctx, volume)
    raise WorkspaceBusy(log_detail=f"volume {volume.id}: could not attach to {vm.id} after 20 attempts")


def _lock(session: Session, volume_id: str) -> None:
    """Row lock on PostgreSQL (SQLite's BEGIN IMMEDIATE already serialises writers)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Volume.id).where(Volume.id == volume_id).with_for_update())


def release(ctx: AppContext, vm_id: str, *, wanted_by: str | None = None, session_id: str | None = None,
            module: str = MODULE) -> bool:
    """Detach the volume attached to ``vm_id`` once that VM is proven dead. True when nothing is
    attached to it any more; raises ``WorkspaceBusy`` when the VM is live or not proven dead."""
    with ctx.db.read() as session:
        volume = session.scalars(select(Volume).where(Volume.attached_vm_id == vm_id)).one_or_none()
        vm = session.get(Vm, vm_id)
    if volume is None:
        return True
    if vm is not None and VmStatus(vm.status) not in VM_ENDING:
        raise WorkspaceBusy(
            "Your workspace is in use by your CLI VM; stop or destroy that VM first.",
            log_detail=f"volume {volume.id} is attached to live VM {vm_id} ({vm.status})",
        )
    spec = _spec_for_fence(ctx, vm_id, vm)
    try:
        inspection = ctx.driver.fence(spec, _FENCE_TIMEOUT_S)
    except RemotecliError as exc:
        log.warning("could not fence VM %s: %s", vm_id, exc.log_detail or exc.message,
                    extra={"vm_id": vm_id, "volume_id": volume.id})
        raise WorkspaceBusy(log_detail=f"fence {vm_id}: {exc.log_detail or exc.message}") from exc
    if inspection.liveness is not Liveness.DEAD:
        with ctx.db.transaction() as session:
            record_event(session, module=module, kind="volume.fence_failed", user_id=volume.user_id,
                         message=f"Home volume kept on the old VM: it could not be proven stopped "
                                 f"({inspection.liveness.value}: {inspection.reason})",
                         details={"volume_id": volume.id, "vm_id": vm_id, "wanted_by": wanted_by,
                                  "session_id": session_id})
        raise WorkspaceBusy(log_detail=f"fence {vm_id}: {inspection.liveness.value} ({inspection.reason})")
    try:
        with ctx.db.transaction() as session:
            _lock(session, volume.id)
            fresh = session.get(Volume, volume.id)
            if fresh is None or fresh.attached_vm_id != vm_id:
                return True  # someone else detached it meanwhile
            details = {"fence": inspection.reason or "dead", "wanted_by": wanted_by}
            message = "Home volume detached: the old VM's process is proven dead"
            if fresh.status == VolumeStatus.ATTACHED.value:
                set_volume_status(session, fresh, VolumeStatus.AVAILABLE, module=module, vm_id=vm_id,
                                  attached_vm_id=None, attached_at=None, message=message, details=details)
            else:
                session.execute(update(Volume).where(Volume.id == fresh.id, Volume.attached_vm_id == vm_id)
                                .values(attached_vm_id=None, attached_at=None, updated_at=utcnow())
                                .execution_options(synchronize_session=False))
                record_event(session, module=module, kind="volume.detached", user_id=fresh.user_id,
                             message=message, details={"volume_id": fresh.id, "vm_id": vm_id, **details})
    except StatusChanged:
        return False
    return True


def mark_failed(ctx: AppContext, volume: Volume, reason: str, *, vm_id: str | None = None) -> None:
    """The volume cannot be used (file missing or unreadable): ``failed`` until an operator acts."""
    try:
        with ctx.db.transaction() as session:
            fresh = session.get(Volume, volume.id)
            if fresh is None or fresh.status in (VolumeStatus.FAILED.value, VolumeStatus.DELETED.value):
                return
            set_volume_status(session, fresh, VolumeStatus.FAILED, module=MODULE, reason=reason, vm_id=vm_id,
                              message="Home volume cannot be used")
    except StatusChanged:
        log.warning("volume changed while marking it failed", extra={"volume_id": volume.id})


def check_guest_home(home: HomeDisk, read_file: Callable[[str], FileContent]) -> tuple[str, bool] | None:
    """None when the guest mounted ``home`` (its init's status file says so); else why not, and
    whether the volume itself is at fault (the guest's e2fsck or mount refused it)."""
    from remotecli.errors import AgentError

    try:
        content = read_file(HOME_STATUS_PATH)
    except AgentError as exc:
        return f"the guest did not report mounting its home volume ({exc.code})", False
    try:
        state = json.loads(content.data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "the guest's home volume report is unreadable", False
    if not isinstance(state, dict) or state.get("volume_id") != home.volume_id:
        return "the guest mounted a different home volume", False
    if state.get("state") != "mounted":
        return f"the guest could not mount it: {str(state.get('error') or 'unknown error')[:300]}", True
    return None


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class WorkspaceUsage:
    """How full a home is: what its filesystem says (from the guest, when its VM runs) and what the
    sparse file takes on the host. ``None`` where it cannot be known right now."""

    used_bytes: int | None
    total_bytes: int | None
    host_allocated_bytes: int | None


def _guest_usage(ctx: AppContext, vm_id: str, mount_path: str) -> tuple[int, int] | None:
    from remotecli.errors import AgentError

    with ctx.db.read() as session:
        vm = session.get(Vm, vm_id)
    if vm is None or vm.status != VmStatus.RUNNING.value or not vm.endpoint:
        return None
    try:
        agent = ctx.agent(vm, timeout=10.0)
        try:
            result = agent.exec(["df", "-B1", "--output=used,size", mount_path], timeout_s=5)
        finally:
            agent.close()
    except AgentError:
        return None
    lines = result.stdout.decode("ascii", "replace").split("\n")
    if result.exit_code != 0 or len(lines) < 2:
        return None
    try:
        used, size = (int(part) for part in lines[1].split())
    except ValueError:
        return None
    return used, size


def my_workspace(ctx: AppContext, user_id: str) -> tuple[WorkspaceView, WorkspaceUsage]:
    """The user's home volume and its usage; ``WorkspaceNotFound`` before their first CLI VM."""
    from remotecli.errors import WorkspaceNotFound

    volume = user_volume(ctx, user_id)
    if volume is None:
        raise WorkspaceNotFound()
    guest = (_guest_usage(ctx, volume.attached_vm_id, ctx.settings.cli_guest_home)
             if volume.attached_vm_id else None)
    host = ctx.driver.volume_usage(volume.location)
    usage = WorkspaceUsage(
        used_bytes=guest[0] if guest else None,
        total_bytes=guest[1] if guest else volume.size_bytes,
        host_allocated_bytes=host[0] if host else None,
    )
    return WorkspaceView.of(volume), usage


def list_volumes(ctx: AppContext, *, include_deleted: bool = False) -> list[Volume]:
    stmt = select(Volume).order_by(Volume.created_at)
    if not include_deleted:
        stmt = stmt.where(Volume.status != VolumeStatus.DELETED.value)
    with ctx.db.read() as session:
        return list(session.scalars(stmt))


# ----------------------------------------------------------------------------------------------
# Removing (operator only)


def purge(ctx: AppContext, volume: Volume, *, reason: str) -> Volume:
    """Delete a volume for good: ``→ deleting → (driver) → deleted``. Only an operator's command or
    the orphan retention does this; a volume attached to a VM is refused (``WorkspaceBusy``)."""
    with ctx.db.read() as session:
        fresh = session.get(Volume, volume.id)
    if fresh is None or fresh.status == VolumeStatus.DELETED.value:
        return fresh or volume
    if fresh.attached_vm_id is not None:
        release(ctx, fresh.attached_vm_id)
        with ctx.db.read() as session:
            fresh = session.get(Volume, volume.id)
        assert fresh is not None
    if fresh.status != VolumeStatus.DELETING.value:
        with ctx.db.transaction() as session:
            set_volume_status(session, fresh, VolumeStatus.DELETING, module=MODULE, reason=reason,
                              message="Deleting the home volume")
    ctx.driver.delete_volume(fresh.location)
    with ctx.db.transaction() as session:
        set_volume_status(session, fresh, VolumeStatus.DELETED, module=MODULE, reason=reason,
                          message="Home volume deleted", expected=VolumeStatus.DELETING)
    return fresh


def orphans(ctx: AppContext) -> list[Volume]:
    """Volumes (not deleted) whose user no longer exists."""
    from remotecli.db.models import User

    with ctx.db.read() as session:
        return list(session.scalars(
            select(Volume).outerjoin(User, User.id == Volume.user_id)
            .where(User.id.is_(None), Volume.status != VolumeStatus.DELETED.value)
            .order_by(Volume.created_at)
        ))
