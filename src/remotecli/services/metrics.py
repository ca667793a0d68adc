"""The gauges ``/metrics`` reports from the database at scrape time (counts only, no rows)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Vm
from remotecli.domain.states import VmStatus


@dataclass(frozen=True)
class RecordCounts:
    vms: dict[tuple[str, str], int]  # (vm_type, status) -> rows
    sessions: dict[str, int]  # status -> sign-in sessions
    failed_reasons: list[str | None]  # status_reason of every failed VM row (bucketed by the caller)


def record_counts(ctx: AppContext) -> RecordCounts:
    with ctx.db.read() as session:
        vms = {(t, s): n for t, s, n in session.execute(
            select(Vm.vm_type, Vm.status, func.count()).group_by(Vm.vm_type, Vm.status)).all()}
        sessions = {s: n for s, n in session.execute(
            select(AuthSession.status, func.count()).group_by(AuthSession.status)).all()}
        failed = list(session.scalars(select(Vm.status_reason).where(Vm.status == VmStatus.FAILED.value)))
    return RecordCounts(vms=vms, sessions=sessions, failed_reasons=failed)
