"""The garbage collector: terminal VMs leave the host, old rows and tickets leave the database.

* ``failed`` VMs older than ``gc_failed_ttl_s`` (default 30 min) are removed with all their
  resources: ``failed → destroying → destroyed`` through ``vm_manager.destroy_vm`` (under the
  VM's lease). A destroy that fails leaves the row ``destroying``; the reconciler retries it.
* ``destroyed`` rows older than ``gc_destroyed_retention_s`` (default 7 days; ``None`` keeps them)
  are deleted. Their events stay: the timeline outlives the rows it describes.
* Expired and used websocket tickets are purged, and failed sign-ins older than the login limit's
  window (15 minutes).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import and_, delete, func, or_, select

from remotecli.background.common import Finding, LoopThread, PassReport, new_owner, run_pass
from remotecli.background.leases import VM_LEASES
from remotecli.context import AppContext
from remotecli.db.models import LoginFailure, Vm, WsTicket, utcnow
from remotecli.domain.states import VmStatus
from remotecli.errors import RemotecliError
from remotecli.logging import get_logger
from remotecli.services import vm_manager, workspaces
from remotecli.services.transitions import StatusChanged

MODULE = "gc"
log = get_logger(MODULE)


class GarbageCollector:
    def __init__(self, ctx: AppContext, *, owner: str | None = None, failed_ttl_s: float | None = None) -> None:
        self.ctx = ctx
        self.owner = owner or new_owner("gc")
        self.failed_ttl_s = ctx.settings.gc_failed_ttl_s if failed_ttl_s is None else failed_ttl_s
        self._loop = LoopThread("gc", self.run_once, ctx.settings.gc_interval_s)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def run_once(self, *, dry_run: bool = False) -> PassReport:
        steps = (self._failed_vms, self._destroyed_rows, self._orphan_volumes, self._tickets, self._login_failures)
        return run_pass("gc", self.owner, steps, dry_run, log)

    def _failed_vms(self, report: PassReport, dry_run: bool) -> None:
        cutoff = utcnow() - dt.timedelta(seconds=self.failed_ttl_s)
        with self.ctx.db.read() as session:
            vms = list(session.scalars(select(Vm).where(
                Vm.status == VmStatus.FAILED.value, Vm.status_changed_at <= cutoff,
            ).order_by(Vm.status_changed_at).limit(1000)))
        if not vms:
            return
        taken = {vm.id for vm in vms} if dry_run else set(
            VM_LEASES.claim(self.ctx.db, self.owner, self.ctx.settings.reconciler_lease_s, ids=[vm.id for vm in vms]))
        try:
            for vm in vms:
                if vm.id not in taken:
                    continue
                reason = (vm.status_reason or "unknown reason").splitlines()[0][:120]
                finding = Finding("failed_vm", vm.id, vm.user_id, f"failed ({reason}) and past its TTL", "destroy")
                report.findings.append(finding)
                if dry_run:
                    continue
                try:
                    vm_manager.destroy_vm(self.ctx, None, vm.id, reason="garbage collection of a failed VM",
                                          module=MODULE)
                    finding.result = "done"
                except StatusChanged:
                    finding.result = "lost"
                except RemotecliError:
                    finding.result = "error"  # stays destroying; the reconciler retries the destroy
        finally:
            if not dry_run:
                VM_LEASES.release(self.ctx.db, self.owner, sorted(taken))

    def _orphan_volumes(self, report: PassReport, dry_run: bool) -> None:
        """Home volumes whose user was deleted (kept by 'users delete' without --purge) are listed and,
        after ``workspace_orphan_retention_s``, deleted (ADR 0011)."""
        retention = self.ctx.settings.workspace_orphan_retention_s
        now = utcnow()
        for volume in workspaces.orphans(self.ctx):
            age = (now - volume.updated_at).total_seconds()
            due = retention is not None and age >= retention
            finding = Finding("orphan_volume", volume.id, volume.user_id,
                              f"its user is gone (volume {volume.status}, {volume.location})",
                              "delete" if due else "keep")
            report.findings.append(finding)
            if dry_run:
                continue
            if not due:
                finding.result = "waiting"
                continue
            try:
                workspaces.purge(self.ctx, volume, reason=f"its user was deleted {age:.0f} s ago")
                finding.result = "done"
            except (StatusChanged, RemotecliError) as exc:
                finding.result = "error"
                log.warning("could not delete an orphan volume: %s", exc, extra={"volume_id": volume.id})

    def _destroyed_rows(self, report: PassReport, dry_run: bool) -> None:
        retention = self.ctx.settings.gc_destroyed_retention_s
        if retention is None:
            return
        cutoff = utcnow() - dt.timedelta(seconds=retention)
        where = and_(Vm.status == VmStatus.DESTROYED.value, Vm.status_changed_at <= cutoff)
        with self.ctx.db.read() as session:
            rows = list(session.execute(select(Vm.id, Vm.user_id).where(where).limit(5000)).all())
        if not rows:
            return
        findings = [Finding("destroyed_row", vm_id, user_id, f"destroyed more than {retention:.0f} s ago", "delete")
                    for vm_id, user_id in rows]
        report.findings.extend(findings)
        if dry_run:
            return
        with self.ctx.db.transaction() as session:
            session.execute(delete(Vm).where(where, Vm.id.in_([vm_id for vm_id, _ in rows])))
        for finding in findings:
            finding.result = "done"

    def _tickets(self, report: PassReport, dry_run: bool) -> None:
        cutoff = utcnow() - dt.timedelta(seconds=self.ctx.settings.gc_ticket_retention_s)
        where = or_(WsTicket.expires_at < cutoff, and_(WsTicket.used_at.is_not(None), WsTicket.used_at < cutoff))
        with self.ctx.db.read() as session:
            count = session.scalar(select(func.count()).select_from(WsTicket).where(where)) or 0
        if not count:
            return
        finding = Finding("tickets", f"{count} ticket(s)", None, "websocket tickets expired or used", "purge")
        report.findings.append(finding)
        if dry_run:
            return
        with self.ctx.db.transaction() as session:
            session.execute(delete(WsTicket).where(where))
        finding.result = "done"

    def _login_failures(self, report: PassReport, dry_run: bool) -> None:
        from remotecli.services import login_limits

        cutoff = utcnow() - login_limits.WINDOW
        with self.ctx.db.read() as session:
            count = session.scalar(select(func.count()).select_from(LoginFailure).where(LoginFailure.at < cutoff)) or 0
        if not count:
            return
        finding = Finding("login_failures", f"{count} row(s)", None, "failed sign-ins older than the limit's window",
                          "purge")
        report.findings.append(finding)
        if dry_run:
            return
        login_limits.purge_old(self.ctx.db)
        finding.result = "done"

