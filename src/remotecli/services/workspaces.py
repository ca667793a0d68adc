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

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from remotecli.agent.protocol import FileContent
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
# A volume row left in 'creating' this long by a caller that died is taken over.
_CREATING_TAKEOVER_S = 120.0
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
    """The user's home volume; made (formatted once) when the user has none."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        volume = user_volume(ctx, user_id)
        if volume is None:
            volume = _new_row(ctx, user_id, vm_id=vm_id, session_id=session_id)
            if volume is None:
                continue  # another caller inserted it first: wait for theirs
            return _format(ctx, volume, vm_id=vm_id)
        if volume.status != VolumeStatus.CREATING.value:
            return volume
        if (utcnow() - volume.status_changed_at).total_seconds() > _CREATING_TAKEOVER_S and _take_over(ctx, volume):
            return _format(ctx, volume, vm_id=vm_id)
        time.sleep(_POLL_S)
    raise WorkspaceBusy("Your workspace is still being prepared; try again in a minute.")


def _new_row(ctx: AppContext, user_id: str, *, vm_id: str | None, session_id: str | None) -> Volume | None:
    volume_id = f"vol-{uuid.uuid4()}"
    now = utcnow()
    size = ctx.settings.workspace_size_gib * 1024**3
    volume = Volume(
        id=volume_id, user_id=user_id, status=VolumeStatus.CREATING.value, size_bytes=size,
        driver=ctx.driver.name, location=location_for(ctx, volume_id), generation=0,
        created_at=now, updated_at=now, status_changed_at=now,
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


def _take_over(ctx: AppContext, volume: Volume) -> bool:
    """A 'creating' row whose creator died: claim it (conditional on its generation)."""
    with ctx.db.transaction() as session:
        result = session.execute(
            update(Volume)
            .where(Volume.id == volume.id, Volume.status == VolumeStatus.CREATING.value,
                   Volume.generation == volume.generation)
            .values(generation=Volume.generation + 1, status_changed_at=utcnow(), updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    volume.generation += 1
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _format(ctx: AppContext, volume: Volume, *, vm_id: str | None) -> Volume:
    """creating → (driver makes the volume) → available; or → failed with the reason."""
    started = time.monotonic()
    try:
        if ctx.driver.volume_problem(volume.location) is not None:
            # A file a dead creator completed is kept as it is (link-into-place makes it whole or absent).
            ctx.driver.create_volume(volume.location, volume.size_bytes, _cli_uid())
    except RemotecliError as exc:
        reason = f"it could not be made ({exc.message})"
        with ctx.db.transaction() as session:
            set_volume_status(session, volume, VolumeStatus.FAILED, module=MODULE, reason=reason,
                              message="Home volume could not be made", vm_id=vm_id,
                              details={"error": exc.log_detail or exc.message})
        raise _unavailable(volume, reason) from exc
    with ctx.db.transaction() as session:
        set_volume_status(session, volume, VolumeStatus.AVAILABLE, module=MODULE, message="Home volume made",
                          vm_id=vm_id, details={"format_s": round(time.monotonic() - started, 3)})
    return volume


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


def _lock(session: object, volume_id: str) -> None:
    """Row lock on PostgreSQL (SQLite's BEGIN IMMEDIATE already serialises writers)."""
    from sqlalchemy.orm import Session

    assert isinstance(session, Session)
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
