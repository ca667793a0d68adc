"""The only functions that change a VM's, a home volume's or an auth session's status.

Each one checks the transition table (``domain.states``), updates conditionally
(``UPDATE ... WHERE id = ? AND status = ?``), checks that exactly one row changed, and writes the
event, all in the caller's transaction. A refused or lost transition changes nothing.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from remotecli.db.models import AuthSession, Event, Vm, Volume, utcnow
from remotecli.domain.states import (
    AUTH_TERMINAL,
    VM_TERMINAL,
    AuthStatus,
    VmStatus,
    VolumeStatus,
    auth_transition_allowed,
    vm_transition_allowed,
    volume_transition_allowed,
)
from remotecli.errors import Conflict, InvalidTransition, VmNotFound, VmTerminal
from remotecli.logging import get_logger

log = get_logger("state")


class StatusChanged(Conflict):
    """The row's status was not the expected one when the conditional update ran."""

    code = "status_changed"
    default_message = "The VM changed state at the same moment; look again and retry."


def _reload(session: Session, obj: Vm | AuthSession | Volume) -> None:
    """Refresh ``obj`` from its row, whether it is attached to ``session`` or detached."""
    model = type(obj)
    fresh = session.execute(
        select(model).where(model.id == obj.id).execution_options(populate_existing=True)
    ).scalar_one()
    if fresh is not obj:
        for column in model.__table__.columns:
            set_committed_value(obj, column.key, getattr(fresh, column.key))


def record_event(
    session: Session,
    *,
    module: str,
    kind: str,
    message: str,
    user_id: str | None = None,
    vm_id: str | None = None,
    session_id: str | None = None,
    from_status: str | None = None,
    to_status: str | None = None,
    details: dict[str, Any] | None = None,
) -> Event:
    """Append an event to the timeline (in the caller's transaction). Never pass secrets here."""
    event = Event(
        at=utcnow(),
        module=module,
        kind=kind,
        message=message,
        user_id=user_id,
        vm_id=vm_id,
        session_id=session_id,
        from_status=from_status,
        to_status=to_status,
        details=details,
    )
    session.add(event)
    return event


def set_vm_status(
    session: Session,
    vm: Vm,
    new: VmStatus,
    *,
    module: str,
    message: str,
    reason: str | None = None,
    expected: VmStatus | None = None,
    session_id: str | None = None,
    details: dict[str, Any] | None = None,
    **fields: Any,
) -> Vm:
    """Move ``vm`` from ``expected`` (default: its loaded status) to ``new``.

    Raises ``InvalidTransition`` (or ``VmTerminal`` when leaving a terminal status for work) if the
    table forbids it, and ``StatusChanged`` if the row's status in the database is not
    ``expected`` any more. On success the loaded object is refreshed from the row.
    """
    current = VmStatus(expected or vm.status)
    if not vm_transition_allowed(current, new):
        if current in VM_TERMINAL:
            raise VmTerminal(log_detail=f"{vm.id}: {current} -> {new} refused")
        raise InvalidTransition(
            f"A VM that is {current.value} cannot become {new.value}.",
            log_detail=f"{vm.id}: {current} -> {new} refused",
        )
    now = utcnow()
    values: dict[str, Any] = {
        "status": new.value,
        "generation": Vm.generation + 1,
        "updated_at": now,
        "status_changed_at": now,
        **fields,
    }
    if reason is not None or new in (VmStatus.RUNNING, VmStatus.STARTING):
        values["status_reason"] = reason
    result = session.execute(
        update(Vm)
        .where(Vm.id == vm.id, Vm.status == current.value)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise StatusChanged(log_detail=f"{vm.id}: expected {current}, row has changed")
    record_event(
        session,
        module=module,
        kind="vm.status",
        message=message,
        user_id=vm.user_id,
        vm_id=vm.id,
        session_id=session_id,
        from_status=current.value,
        to_status=new.value,
        details={**(details or {}), **({"reason": reason} if reason else {})} or None,
    )
    _reload(session, vm)
    log.info(
        "%s: %s -> %s%s", message, current.value, new.value, f" ({reason})" if reason else "",
        extra={"vm_id": vm.id, "user_id": vm.user_id},
    )
    return vm


def set_volume_status(
    session: Session,
    volume: Volume,
    new: VolumeStatus,
    *,
    module: str,
    message: str,
    reason: str | None = None,
    expected: VolumeStatus | None = None,
    vm_id: str | None = None,
    details: dict[str, Any] | None = None,
    **fields: Any,
) -> Volume:
    """The volume twin of ``set_vm_status``: table check, conditional update, event.

    The update is also conditioned on the VM the loaded volume is attached to (``attached_vm_id``,
    ``NULL`` included), so an attach or a detach never overwrites someone else's.
    """
    current = VolumeStatus(expected or volume.status)
    if not volume_transition_allowed(current, new):
        raise InvalidTransition(
            f"A workspace volume that is {current.value} cannot become {new.value}.",
            log_detail=f"{volume.id}: {current} -> {new} refused",
        )
    now = utcnow()
    values: dict[str, Any] = {
        "status": new.value,
        "generation": Volume.generation + 1,
        "updated_at": now,
        "status_changed_at": now,
        "status_reason": reason,
        **fields,
    }
    was_attached_to = volume.attached_vm_id
    stmt = update(Volume).where(
        Volume.id == volume.id,
        Volume.status == current.value,
        Volume.attached_vm_id.is_(None) if was_attached_to is None else Volume.attached_vm_id == was_attached_to,
    )
    result = session.execute(stmt.values(**values).execution_options(synchronize_session=False))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise StatusChanged(
            "The workspace changed state at the same moment; try again.",
            log_detail=f"{volume.id}: expected {current}, row has changed",
        )
    record_event(
        session,
        module=module,
        kind="volume.status",
        message=message,
        user_id=volume.user_id,
        # The VM goes in the details, not vm_id: a VM's timeline of statuses stays its own.
        from_status=current.value,
        to_status=new.value,
        details={"volume_id": volume.id, "vm_id": vm_id or fields.get("attached_vm_id") or was_attached_to,
                 **(details or {}), **({"reason": reason} if reason else {})},
    )
    _reload(session, volume)
    log.info("%s: %s -> %s%s", message, current.value, new.value, f" ({reason})" if reason else "",
             extra={"volume_id": volume.id, "user_id": volume.user_id})
    return volume


def load_vm(session: Session, vm_id: str, *, for_update: bool = False) -> Vm:
    stmt = select(Vm).where(Vm.id == vm_id)
    if for_update and session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    vm = session.scalars(stmt).one_or_none()
    if vm is None:
        raise VmNotFound()
    return vm


def set_auth_status(
    session: Session,
    auth: AuthSession,
    new: AuthStatus,
    *,
    module: str,
    message: str,
    expected: AuthStatus | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    details: dict[str, Any] | None = None,
    **fields: Any,
) -> AuthSession:
    """The auth-session twin of ``set_vm_status``: table check, conditional update, event."""
    current = AuthStatus(expected or auth.status)
    if not auth_transition_allowed(current, new):
        raise InvalidTransition(
            "This sign-in session has already ended." if current in AUTH_TERMINAL
            else f"A sign-in session that is {current.value} cannot become {new.value}.",
            log_detail=f"{auth.id}: {current} -> {new} refused",
        )
    now = utcnow()
    values: dict[str, Any] = {
        "status": new.value,
        "generation": AuthSession.generation + 1,
        "updated_at": now,
        "message": message,
        **fields,
    }
    if error_code is not None:
        values["error_code"] = error_code
        values["error_message"] = error_message
    result = session.execute(
        update(AuthSession)
        .where(AuthSession.id == auth.id, AuthSession.status == current.value)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise StatusChanged(
            "The sign-in session changed state at the same moment.",
            log_detail=f"{auth.id}: expected {current}",
        )
    record_event(
        session,
        module=module,
        kind="auth.status",
        message=message,
        user_id=auth.user_id,
        session_id=auth.id,
        vm_id=fields.get("cli_vm_id") or fields.get("browser_vm_id"),
        from_status=current.value,
        to_status=new.value,
        details={**(details or {}), **({"error_code": error_code} if error_code else {})} or None,
    )
    _reload(session, auth)
    log.info("%s: %s -> %s", message, current.value, new.value, extra={"session_id": auth.id, "user_id": auth.user_id})
    return auth
