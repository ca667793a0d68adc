"""Deleting a user: their VMs are destroyed first, their home volume is kept unless purged (ADR 0011).

A kept volume belongs to no user any more: it is an orphan that ``gc`` lists and removes after
``workspace_orphan_retention_s`` (so an operator who deleted the wrong user can still copy the
home out of ``<data_dir>/volumes``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select, update

from remotecli.context import AppContext
from remotecli.db.models import User, Vm, Volume, utcnow
from remotecli.domain.states import VmStatus
from remotecli.errors import UserNotFound
from remotecli.logging import get_logger
from remotecli.services import vm_manager, workspaces
from remotecli.services.transitions import record_event

MODULE = "users"
log = get_logger(MODULE)


@dataclass(frozen=True)
class UserRemoval:
    user_id: str
    vms_destroyed: list[str]
    volume_id: str | None
    volume_kept: bool


def delete_user(ctx: AppContext, name: str, *, purge: bool = False) -> UserRemoval:
    with ctx.db.read() as session:
        user = session.scalars(select(User).where(User.name == name)).one_or_none()
        if user is None:
            raise UserNotFound()
        vm_ids = list(session.scalars(select(Vm.id).where(Vm.user_id == user.id,
                                                          Vm.status != VmStatus.DESTROYED.value)))
    for vm_id in vm_ids:
        vm_manager.destroy_vm(ctx, None, vm_id, reason="its user was deleted")
    volume = workspaces.user_volume(ctx, user.id)
    if volume is not None and purge:
        workspaces.purge(ctx, volume, reason="its user was deleted with --purge")
    with ctx.db.transaction() as session:
        if volume is not None and not purge:  # the orphan retention counts from now
            session.execute(update(Volume).where(Volume.id == volume.id).values(updated_at=utcnow()))
        session.execute(delete(User).where(User.id == user.id))
        record_event(session, module=MODULE, kind="user.deleted", user_id=user.id,
                     message="User deleted" + ("" if volume is None else
                                               " and home volume purged" if purge else "; home volume kept"),
                     details={"vms_destroyed": vm_ids, "volume_id": volume.id if volume else None,
                              "volume_kept": bool(volume and not purge)})
    log.info("user deleted", extra={"user_id": user.id})
    return UserRemoval(user.id, vm_ids, volume.id if volume else None, bool(volume and not purge))
