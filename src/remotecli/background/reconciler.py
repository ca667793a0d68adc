"""The reconciler: the database and the host are compared both ways, on a loop and at start-up.

Database → host (every non-terminal VM, under its per-VM lease, see ``background.leases``):

* ``running``/``paused``: ``driver.inspect``. DEAD → ``failed`` with the driver's reason (and any
  process left is stopped). UNKNOWN → one strike (``vms.unknown_strikes``); the second UNKNOWN in
  a row → ``failed``. ALIVE clears the strikes.
* ``running``/``paused`` whose driver says its host is unreachable (``member_unreachable`` in the
  inspection, the Incus driver) → ``unknown``; ``unknown`` → back to work when the host answers,
  ``failed`` when it is dead or after ``member_unreachable_grace_s`` (issue 14).
* ``stopped``: its directory must exist, else ``failed``.
* ``creating``/``starting``/``stopping`` held past ``reconciler_wedged_after_s``: ``failed`` as
  wedged, its process stopped (the directory stays for the post-mortem until GC).
* ``destroying`` held past ``reconciler_destroy_retry_after_s``: ``driver.destroy`` again (it is
  idempotent) → ``destroyed``; still failing past the wedge deadline → ``failed``.

Host → database (``driver.list_host_vms``): a VM directory/process/port that no row owns (no row,
or a ``destroyed`` one) is an orphan; its first sighting is written to ``host_orphans`` (shared by
all controllers) and it is destroyed once seen for ``reconciler_orphan_grace_s``. A ``failed``
row still owns its directory (GC removes it after the TTL) but any process it still has is stopped.

Home volumes (ADR 0011): when a pass fails or destroys a CLI VM it also detaches its home volume
once the driver has fenced the VM (process killed if it still ran, then proven dead). Any volume
still attached to an ending VM (failed, destroying, destroyed) after that is detached by the
``_volumes`` step the same way, so no volume stays attached to a dead VM after a pass. A volume
whose VM row is gone waits while the host still runs that VM (an orphan, removed after its grace).

Sign-in sessions: sessions past ``expires_at`` whose worker lease is free become ``expired``
(the same transition the sign-in worker makes; losing that race is fine). Browser VMs whose session
has ended, or that no session references long after they were made, are destroyed. Warm-pool VMs no
sign-in has claimed yet (``user_id`` NULL) are the pool's (``services.pool``); they are checked
like every VM above, and a dead one is failed here and replaced by the pool's next pass.

Every status change goes through ``services.transitions`` / ``vm_manager``; no transaction is open
during a driver call.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from remotecli.background.common import Finding, LoopThread, PassReport, chunks, host_spec, new_owner, run_pass
from remotecli.background.leases import ORPHAN_LEASES, SESSION_LEASES, VM_LEASES
from remotecli.context import AppContext
from remotecli.db.models import AuthSession, HostOrphan, Vm, Volume, utcnow
from remotecli.domain.states import AUTH_TERMINAL, VM_ENDING, VM_TERMINAL, AuthStatus, VmStatus, VmType
from remotecli.drivers.base import HostVm, Liveness, PowerState
from remotecli.errors import RemotecliError
from remotecli.logging import get_logger, log_context
from remotecli.services import vm_manager, workspaces
from remotecli.services.signin_state import STEP_MESSAGES
from remotecli.services.transitions import StatusChanged, record_event, set_auth_status, set_vm_status

MODULE = "reconciler"
log = get_logger(MODULE)

_UNKNOWN_STRIKES_TO_FAIL = 2
_STOP_TIMEOUT_S = 2.0


def _age_s(now: dt.datetime, then: dt.datetime | None) -> float:
    return 0.0 if then is None else (now - then).total_seconds()


def _safe_vm_id(vm_id: str) -> bool:
    return bool(vm_id) and vm_id not in (".", "..") and "/" not in vm_id and "\x00" not in vm_id


class Reconciler:
    """One controller's reconciler. ``run_once`` is a pass; ``start``/``stop`` run it on a loop."""

    def __init__(self, ctx: AppContext, *, owner: str | None = None, orphan_grace_s: float | None = None) -> None:
        self.ctx = ctx
        self.owner = owner or new_owner("rec")
        s = ctx.settings
        self.orphan_grace_s = s.reconciler_orphan_grace_s if orphan_grace_s is None else orphan_grace_s
        self._loop = LoopThread("reconciler", self.run_once, s.reconciler_interval_s)
        self._unwatch: Callable[[], None] | None = None

    # ------------------------------------------------------------------------------ loop
    def start(self) -> None:
        self._loop.start()
        # A driver with an event stream (Incus) wakes a pass as soon as an instance changes.
        self._unwatch = self.ctx.driver.watch_events(self.wake)

    def stop(self) -> None:
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        self._loop.stop()

    def wake(self) -> None:
        self._loop.wake()

    # ------------------------------------------------------------------------------ a pass
    def run_once(self, *, dry_run: bool = False) -> PassReport:
        """One pass. With ``dry_run`` nothing is written or changed: the findings say what would be."""
        steps = (self._expire_sessions, self._check_rows, self._check_host, self._volumes, self._idle_stop,
                 self._browser_vms, self._guest_firewall)
        return run_pass("reconciler", self.owner, steps, dry_run, log)

    # ------------------------------------------------------------------------------ host rules
    def _guest_firewall(self, report: PassReport, dry_run: bool) -> None:
        """The host rules that keep guests off the host are back within a pass after something
        removed them (an nftables restart flushes every table while the VMs keep running)."""
        before = self.ctx.driver.guest_confinement()
        if before is None or before.ok or before.facts.get("repairable") != "yes":
            return  # in force, or nothing a pass could change (not root: doctor and 'up' say so)
        finding = Finding("guest_firewall", "host", None, before.detail, "restore")
        report.findings.append(finding)
        if dry_run:
            return
        after = self.ctx.driver.guest_confinement(repair=True)
        finding.result = "done" if after is not None and after.ok else f"failed: {after.detail if after else '-'}"

    # ------------------------------------------------------------------------------ database → host
    def _check_rows(self, report: PassReport, dry_run: bool) -> None:
        s = self.ctx.settings
        with self.ctx.db.read() as session:
            ids = list(session.scalars(
                select(Vm.id).where(Vm.status.not_in([st.value for st in VM_TERMINAL])).order_by(Vm.id)
            ))
        for batch in chunks(ids, s.reconciler_batch_size):
            taken = list(batch) if dry_run else VM_LEASES.claim(self.ctx.db, self.owner, s.reconciler_lease_s,
                                                                ids=batch)
            if not taken:
                continue
            claimed_at = utcnow()
            renewed = time.monotonic()
            try:
                with self.ctx.db.read() as session:
                    vms = list(session.scalars(select(Vm).where(Vm.id.in_(taken)).order_by(Vm.id)))
                for vm in vms:
                    if not dry_run and time.monotonic() - renewed > s.reconciler_lease_s / 3:
                        VM_LEASES.renew(self.ctx.db, self.owner, taken, s.reconciler_lease_s)
                        renewed = time.monotonic()
                    try:
                        with log_context(vm_id=vm.id, user_id=vm.user_id):
                            self._check_vm(vm, report, dry_run)
                    except Exception:
                        report.errors += 1
                        log.exception("could not reconcile a VM; next pass retries", extra={"vm_id": vm.id})
                    if s.reconciler_audit_events and not dry_run:
                        self._audit(vm, claimed_at)
            finally:
                if not dry_run:
                    VM_LEASES.release(self.ctx.db, self.owner, taken)

    def _audit(self, vm: Vm, claimed_at: dt.datetime) -> None:
        with self.ctx.db.transaction() as session:
            record_event(session, module=MODULE, kind="reconcile.checked", message="Reconciler checked the VM",
                         user_id=vm.user_id, vm_id=vm.id,
                         details={"controller": self.owner, "lease_from": claimed_at.isoformat(),
                                  "lease_to": utcnow().isoformat()})

    def _check_vm(self, vm: Vm, report: PassReport, dry_run: bool) -> None:
        s = self.ctx.settings
        now = utcnow()
        status = VmStatus(vm.status)
        age = _age_s(now, vm.status_changed_at)
        spec = host_spec(self.ctx, vm)
        if status is VmStatus.DESTROYING:
            if age < s.reconciler_destroy_retry_after_s:
                return
            finding = Finding("destroy_retry", vm.id, vm.user_id, f"in destroying for {age:.0f} s", "destroy")
            report.findings.append(finding)
            if dry_run:
                return
            try:
                self.ctx.driver.destroy(spec)
            except Exception as exc:
                log.warning("destroy retry failed: %r", exc, extra={"vm_id": vm.id})
                if age >= s.reconciler_wedged_after_s:
                    finding.kind, finding.action = "wedged_vm", "fail"
                    finding.why = f"wedged in destroying for {age:.0f} s: destroy keeps failing"
                    finding.result = self._fail(vm, finding.why, status)
                else:
                    finding.result = "error"
                return
            try:
                with self.ctx.db.transaction() as session:
                    set_vm_status(session, vm, VmStatus.DESTROYED, module=MODULE, expected=VmStatus.DESTROYING,
                                  message="VM destroyed (reconciler retried the destroy)", endpoint=None,
                                  details={"controller": self.owner})
                finding.result = "done"
                self._release_home(vm)
            except StatusChanged:
                finding.result = "lost"
            return
        if status in (VmStatus.CREATING, VmStatus.STARTING, VmStatus.STOPPING):
            if age < s.reconciler_wedged_after_s:
                return  # someone is working on it (a boot or a graceful stop takes a while)
            why = f"wedged in {status.value} for {age:.0f} s"
            finding = Finding("wedged_vm", vm.id, vm.user_id, why, "fail")
            report.findings.append(finding)
            if not dry_run:
                finding.result = self._fail(vm, why, status)
                self._stop_process(spec)
                self._release_home(vm)
            return
        if status is VmStatus.STOPPED:
            if not self.ctx.driver.has_state(spec):
                why = "its directory is gone"
                finding = Finding("dead_vm", vm.id, vm.user_id, why, "fail")
                report.findings.append(finding)
                if not dry_run:
                    finding.result = self._fail(vm, why, status)
            return
        # running / paused (/ unknown): the hypervisor must confirm it.
        inspection = self.ctx.driver.inspect(spec)
        unreachable = inspection.details.get("member_unreachable") if inspection.liveness is Liveness.UNKNOWN else None
        if status is VmStatus.UNKNOWN:
            self._check_unknown(vm, inspection, report, dry_run)
            return
        if inspection.liveness is Liveness.ALIVE:
            if vm.unknown_strikes and not dry_run:
                self._set_strikes(vm, 0)
            self._note_member(vm, inspection.details.get("member"), dry_run)
            return
        if unreachable:
            # A partition is not a death (issue 14): 'unknown' for member_unreachable_grace_s.
            why = f"its host {unreachable} is unreachable"
            finding = Finding("unreachable_vm", vm.id, vm.user_id, why, "unknown")
            report.findings.append(finding)
            if not dry_run:
                try:
                    with self.ctx.db.transaction() as session:
                        set_vm_status(session, vm, VmStatus.UNKNOWN, module=MODULE, expected=status, reason=why,
                                      message="VM unknown: its host cannot be reached",
                                      details={"controller": self.owner, "member": str(unreachable)})
                    finding.result = "done"
                except StatusChanged:
                    finding.result = "lost"
            return
        if inspection.liveness is Liveness.DEAD:
            why = f"the hypervisor says it is dead ({inspection.reason})"
            finding = Finding("dead_vm", vm.id, vm.user_id, why, "fail")
            report.findings.append(finding)
            if not dry_run:
                finding.result = self._fail(vm, why, status)
                self._stop_process(spec)  # e.g. the directory is gone but QEMU still runs
                self._release_home(vm)
            return
        strikes = vm.unknown_strikes + 1
        if strikes < _UNKNOWN_STRIKES_TO_FAIL:
            finding = Finding("unknown_vm", vm.id, vm.user_id,
                              f"the hypervisor could not tell ({inspection.reason}); strike {strikes} of "
                              f"{_UNKNOWN_STRIKES_TO_FAIL}", "watch")
            report.findings.append(finding)
            if not dry_run:
                self._set_strikes(vm, strikes)
                finding.result = "waiting"
            return
        why = f"the hypervisor could not confirm it is alive {strikes} passes in a row ({inspection.reason})"
        finding = Finding("dead_vm", vm.id, vm.user_id, why, "fail")
        report.findings.append(finding)
        if not dry_run:
            finding.result = self._fail(vm, why, status)
            self._stop_process(spec)
            self._release_home(vm)

    def _check_unknown(self, vm: Vm, inspection: Any, report: PassReport, dry_run: bool) -> None:
        """A VM whose host was unreachable: back to work when the host answers again, failed when
        it is proven dead, failed after ``member_unreachable_grace_s`` of silence (then replaced by
        the next ensure; its instance is fenced, and its home freed, once the host is back)."""
        grace = self.ctx.settings.member_unreachable_grace_s
        age = _age_s(utcnow(), vm.status_changed_at)
        if inspection.liveness is Liveness.ALIVE:
            back = VmStatus.PAUSED if inspection.power is PowerState.PAUSED else VmStatus.RUNNING
            finding = Finding("host_back", vm.id, vm.user_id, f"its host answers again after {age:.0f} s", back.value)
            report.findings.append(finding)
            if not dry_run:
                try:
                    with self.ctx.db.transaction() as session:
                        set_vm_status(session, vm, back, module=MODULE, expected=VmStatus.UNKNOWN,
                                      message="VM reachable again", details={"controller": self.owner})
                    finding.result = "done"
                except StatusChanged:
                    finding.result = "lost"
            return
        if inspection.liveness is Liveness.UNKNOWN and age < grace:
            finding = Finding("unknown_vm", vm.id, vm.user_id,
                              f"its host is unreachable ({inspection.reason}) for {age:.0f} of {grace:.0f} s", "watch")
            report.findings.append(finding)
            finding.result = "waiting"
            return
        why = (f"the hypervisor says it is dead ({inspection.reason})" if inspection.liveness is Liveness.DEAD
               else f"its host was unreachable for {age:.0f} s ({inspection.reason})")
        finding = Finding("dead_vm", vm.id, vm.user_id, why, "fail")
        report.findings.append(finding)
        if not dry_run:
            finding.result = self._fail(vm, why, VmStatus.UNKNOWN)
            self._release_home(vm)  # freed only once the driver fences it (proven dead)

    def _note_member(self, vm: Vm, member: object, dry_run: bool) -> None:
        """Record the host (Incus member) a VM runs on, as the driver reports it."""
        if dry_run or not isinstance(member, str) or not member or member == vm.member:
            return
        with self.ctx.db.transaction() as session:
            session.execute(update(Vm).where(Vm.id == vm.id).values(member=member)
                            .execution_options(synchronize_session=False))

    def _set_strikes(self, vm: Vm, strikes: int) -> None:
        with self.ctx.db.transaction() as session:
            session.execute(update(Vm).where(Vm.id == vm.id, Vm.status == vm.status)
                            .values(unknown_strikes=strikes).execution_options(synchronize_session=False))

    def _fail(self, vm: Vm, reason: str, expected: VmStatus) -> str:
        """``expected → failed``, conditional: if the row moved meanwhile, its new owner decides."""
        try:
            with self.ctx.db.transaction() as session:
                set_vm_status(session, vm, VmStatus.FAILED, module=MODULE, expected=expected,
                              message="VM failed (found by the reconciler)", reason=reason,
                              details={"controller": self.owner})
            return "done"
        except StatusChanged:
            return "lost"

    def _release_home(self, vm: Vm) -> None:
        """The home volume of a VM this pass ended goes free once the VM is proven dead (part of the
        same action; what fails here is picked up by ``_volumes``)."""
        if vm.vm_type != VmType.CLI.value:
            return
        try:
            workspaces.release(self.ctx, vm.id, module=MODULE)
        except RemotecliError as exc:
            log.warning("home volume not detached yet: %s", exc.log_detail or exc.message, extra={"vm_id": vm.id})

    def _stop_process(self, spec: Any) -> None:
        try:
            self.ctx.driver.stop(spec, _STOP_TIMEOUT_S)
        except Exception:
            log.warning("could not stop the process of a failed VM; the next pass retries",
                        extra={"vm_id": spec.vm_id})

    # ------------------------------------------------------------------------------ host → database
    def _check_host(self, report: PassReport, dry_run: bool) -> None:
        host = {h.vm_id: h for h in self.ctx.driver.list_host_vms(self.ctx.settings.vms_dir)}
        # Rows are read after the host is listed: a VM's row is committed before its directory or
        # process exists, so anything listed above that has a row is seen here.
        rows: dict[str, tuple[str, str | None]] = {}
        for batch in chunks(sorted(host), 500):
            with self.ctx.db.read() as session:
                for vm_id, status, user_id in session.execute(
                    select(Vm.id, Vm.status, Vm.user_id).where(Vm.id.in_(batch))
                ):
                    rows[vm_id] = (status, user_id)
        orphans = [h for vm_id, h in host.items() if vm_id not in rows or rows[vm_id][0] == VmStatus.DESTROYED.value]
        stray = [h for vm_id, h in host.items()
                 if vm_id in rows and rows[vm_id][0] == VmStatus.FAILED.value and h.pid is not None]
        self._stop_stray(stray, rows, report, dry_run)
        self._remove_orphans(orphans, report, dry_run)

    def _stop_stray(self, stray: list[HostVm], rows: dict[str, tuple[str, str | None]], report: PassReport,
                    dry_run: bool) -> None:
        """A ``failed`` VM must not keep burning CPU and memory until GC: stop its process."""
        if not stray:
            return
        taken = [h.vm_id for h in stray] if dry_run else VM_LEASES.claim(
            self.ctx.db, self.owner, self.ctx.settings.reconciler_lease_s, ids=[h.vm_id for h in stray])
        try:
            for h in stray:
                if h.vm_id not in taken:
                    continue
                finding = Finding("stray_process", h.vm_id, rows[h.vm_id][1],
                                  f"failed VM still has a process (pid {h.pid})", "stop")
                report.findings.append(finding)
                if dry_run:
                    continue
                try:
                    self.ctx.driver.stop(host_spec(self.ctx, vm_id=h.vm_id, directory=h.directory), _STOP_TIMEOUT_S)
                    finding.result = "done"
                except Exception:
                    finding.result = "error"
                    log.warning("could not stop a failed VM's process", extra={"vm_id": h.vm_id})
        finally:
            if not dry_run:
                VM_LEASES.release(self.ctx.db, self.owner, taken)

    def _remove_orphans(self, orphans: list[HostVm], report: PassReport, dry_run: bool) -> None:
        now = utcnow()
        seen = self._track_orphans(orphans, now, dry_run)
        for h in orphans:
            if not _safe_vm_id(h.vm_id):
                continue
            seen_for = _age_s(now, seen.get(h.vm_id, now))
            what = ", ".join(part for part in (
                "directory" if h.directory is not None and self.ctx.driver.has_state(
                    host_spec(self.ctx, vm_id=h.vm_id, directory=h.directory)) else "",
                f"process {h.pid}" if h.pid is not None else "",
                f"port(s) {', '.join(map(str, h.ports))}" if h.ports else "",
            ) if part) or "host resources"
            finding = Finding("orphan", h.vm_id, None,
                              f"no VM row owns its {what} (seen for {seen_for:.0f} s)", "destroy")
            report.findings.append(finding)
            if dry_run:
                continue
            if seen_for < self.orphan_grace_s:
                finding.result = "waiting"
                continue
            finding.result = self._remove_orphan(h, seen_for)

    def _track_orphans(self, orphans: list[HostVm], now: dt.datetime, dry_run: bool) -> dict[str, dt.datetime]:
        """First sightings, shared by every controller (``host_orphans``); forget what is gone."""
        ids = {h.vm_id for h in orphans}
        if not dry_run:
            with self.ctx.db.transaction() as session:
                dialect = session.get_bind().dialect.name
                insert_fn: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
                for h in orphans:
                    session.execute(insert_fn(HostOrphan).values(
                        vm_id=h.vm_id, directory=str(h.directory) if h.directory else None, pid=h.pid,
                        ports=list(h.ports) or None, first_seen_at=now, last_seen_at=now,
                    ).on_conflict_do_update(index_elements=["vm_id"], set_={"last_seen_at": now, "pid": h.pid}))
                stale = select(HostOrphan.vm_id)
                if ids:
                    stale = stale.where(HostOrphan.vm_id.not_in(sorted(ids)))
                gone = list(session.scalars(stale))
                if gone:
                    session.execute(delete(HostOrphan).where(HostOrphan.vm_id.in_(gone)))
        if not ids:
            return {}
        with self.ctx.db.read() as session:
            return dict(session.execute(
                select(HostOrphan.vm_id, HostOrphan.first_seen_at).where(HostOrphan.vm_id.in_(sorted(ids)))
            ).all())

    def _remove_orphan(self, h: HostVm, seen_for: float) -> str:
        if not ORPHAN_LEASES.claim(self.ctx.db, self.owner, self.ctx.settings.reconciler_lease_s, ids=[h.vm_id]):
            return "lost"
        try:
            with self.ctx.db.read() as session:
                status = session.scalar(select(Vm.status).where(Vm.id == h.vm_id))
            if status is not None and status != VmStatus.DESTROYED.value:
                return "lost"  # a row owns it after all
            spec = host_spec(self.ctx, vm_id=h.vm_id, directory=self.ctx.settings.vms_dir / h.vm_id)
            self.ctx.driver.destroy(spec)
            if h.directory is not None and h.directory != spec.directory:
                self.ctx.driver.destroy(host_spec(self.ctx, vm_id=h.vm_id, directory=Path(h.directory)))
            try:  # a home volume left attached to it goes free in the same action (fenced: destroyed above)
                workspaces.release(self.ctx, h.vm_id, module=MODULE)
            except RemotecliError as exc:
                log.warning("home volume not detached yet: %s", exc.log_detail or exc.message,
                            extra={"vm_id": h.vm_id})
            with self.ctx.db.transaction() as session:
                session.execute(delete(HostOrphan).where(HostOrphan.vm_id == h.vm_id))
                record_event(session, module=MODULE, kind="reconcile.orphan_removed",
                             message=f"Removed host resources no VM row owns (seen for {seen_for:.0f} s)",
                             vm_id=h.vm_id,
                             details={"controller": self.owner, "directory": str(h.directory) if h.directory else None,
                                      "pid": h.pid, "ports": list(h.ports), "row_status": status})
            log.info("orphan removed", extra={"vm_id": h.vm_id})
            return "done"
        except Exception:
            log.exception("could not remove an orphan; the next pass retries", extra={"vm_id": h.vm_id})
            ORPHAN_LEASES.release(self.ctx.db, self.owner, [h.vm_id])
            return "error"

    # ------------------------------------------------------------------------------ home volumes
    def _volumes(self, report: PassReport, dry_run: bool) -> None:
        """Volumes attached to an ended (or vanished) VM are detached after fencing it; a volume
        left ``creating`` by a maker that died (its lease lapsed) is settled (``settle_creating``)."""
        for stuck in workspaces.stuck_creating(self.ctx):
            found = Finding("volume_stuck_creating", stuck.id, stuck.user_id,
                            "left creating by a maker whose lease lapsed", "settle")
            report.findings.append(found)
            if not dry_run:
                found.result = workspaces.settle_creating(self.ctx, stuck, self.owner, module=MODULE)
        with self.ctx.db.read() as session:
            held = list(session.execute(
                select(Volume.id, Volume.user_id, Volume.attached_vm_id, Vm.status)
                .outerjoin(Vm, Vm.id == Volume.attached_vm_id)
                .where(Volume.attached_vm_id.is_not(None))
            ).all())
        ending = {st.value for st in VM_ENDING}
        for volume_id, user_id, vm_id, vm_status in held:
            if vm_id is None or (vm_status is not None and vm_status not in ending):
                continue
            if vm_status is None and self.ctx.driver.inspect(
                    host_spec(self.ctx, vm_id=vm_id)).liveness is not Liveness.DEAD:
                continue  # a VM no row owns is an orphan: removed after its grace period, then detached here
            finding = Finding("volume_attached_to_dead_vm", volume_id, user_id,
                              f"attached to VM {vm_id}, which is {vm_status or 'gone'}", "detach")
            report.findings.append(finding)
            if dry_run:
                continue
            try:
                finding.result = "done" if workspaces.release(self.ctx, vm_id, module=MODULE) else "lost"
            except RemotecliError as exc:
                finding.result = "waiting"
                log.warning("home volume not detached yet: %s", exc.log_detail or exc.message,
                            extra={"vm_id": vm_id, "volume_id": volume_id})

    # ------------------------------------------------------------------------------ idle stop
    def _idle_stop(self, report: PassReport, dry_run: bool) -> None:
        """A running CLI VM unused (no terminal, exec, ensure or sign-in) for ``cli_vm_idle_stop_s``
        is stopped gracefully: its memory is freed, its home unmounted cleanly and kept attached;
        the next ensure, exec, terminal or sign-in starts it again."""
        s = self.ctx.settings
        if s.cli_vm_idle_stop_s <= 0:
            return
        cutoff = utcnow() - dt.timedelta(seconds=s.cli_vm_idle_stop_s)
        with self.ctx.db.read() as session:
            idle = list(session.scalars(select(Vm.id).where(
                Vm.vm_type == VmType.CLI.value, Vm.status == VmStatus.RUNNING.value,
                func.coalesce(Vm.last_active_at, Vm.status_changed_at) < cutoff,
            ).order_by(Vm.id)))
        if not idle:
            return
        taken = idle if dry_run else VM_LEASES.claim(self.ctx.db, self.owner, s.reconciler_lease_s, ids=idle)
        try:
            for vm_id in taken:
                with self.ctx.db.read() as session:
                    vm = session.get(Vm, vm_id)
                if vm is None or vm.status != VmStatus.RUNNING.value:
                    continue
                last = vm.last_active_at or vm.status_changed_at
                if last >= cutoff:
                    continue  # used since the list was read
                why = f"unused for {_age_s(utcnow(), last):.0f} s (cli_vm_idle_stop_s {s.cli_vm_idle_stop_s:.0f})"
                finding = Finding("idle_stop", vm_id, vm.user_id, why, "stop")
                report.findings.append(finding)
                if dry_run:
                    continue
                try:
                    vm_manager.stop_vm(self.ctx, None, vm_id, reason=f"{vm_manager.IDLE_STOP_REASON}: {why}",
                                       module=MODULE)
                    with self.ctx.db.transaction() as session:
                        record_event(session, module=MODULE, kind="vm.idle_stopped", user_id=vm.user_id,
                                     vm_id=vm_id, message=f"CLI VM stopped while idle ({why}); its home is kept",
                                     details={"controller": self.owner, "idle_s": round(_age_s(utcnow(), last))})
                    finding.result = "done"
                except StatusChanged:
                    finding.result = "lost"
                except RemotecliError as exc:
                    finding.result = "error"
                    log.warning("idle stop failed: %s", exc.code, extra={"vm_id": vm_id})
        finally:
            if not dry_run:
                VM_LEASES.release(self.ctx.db, self.owner, taken)

    # ------------------------------------------------------------------------------ sign-in sessions
    def _expire_sessions(self, report: PassReport, dry_run: bool) -> None:
        now = utcnow()
        with self.ctx.db.read() as session:
            sessions = list(session.scalars(select(AuthSession).where(
                AuthSession.status.not_in([st.value for st in AUTH_TERMINAL]),
                # A held credential is still delivered: expiry only ends the wait for the user.
                AuthSession.status != AuthStatus.TRANSFERRING.value,
                AuthSession.expires_at < now,
                SESSION_LEASES.free(now),
            )))
        for auth in sessions:
            finding = Finding("session_expired", auth.id, auth.user_id,
                              f"{auth.status} past its expiry and no worker holds it", "expire")
            report.findings.append(finding)
            if dry_run:
                continue
            try:
                with self.ctx.db.transaction() as session:
                    set_auth_status(session, auth, AuthStatus.EXPIRED, module=MODULE,
                                    message=STEP_MESSAGES[AuthStatus.EXPIRED], credential_enc=None,
                                    details={"controller": self.owner})
                finding.result = "done"
            except (StatusChanged, RemotecliError):
                finding.result = "lost"  # the sign-in worker got there first: fine

    def _browser_vms(self, report: PassReport, dry_run: bool) -> None:
        s = self.ctx.settings
        now = utcnow()
        unreferenced_after = 2 * s.vm_boot_timeout_s + s.reconciler_orphan_grace_s
        with self.ctx.db.read() as session:
            pairs = list(session.execute(
                select(Vm, AuthSession).outerjoin(AuthSession, AuthSession.browser_vm_id == Vm.id).where(
                    Vm.vm_type == VmType.BROWSER.value,
                    Vm.user_id.is_not(None),  # an unclaimed warm-pool VM waits for a sign-in (services/pool.py)
                    Vm.status.in_([VmStatus.RUNNING.value, VmStatus.PAUSED.value, VmStatus.STOPPED.value]),
                )
            ).all())
        doomed: list[tuple[Vm, str, str | None]] = []
        for vm, auth in pairs:
            if auth is None:
                if _age_s(now, vm.created_at) >= unreferenced_after:
                    doomed.append((vm, f"no sign-in session uses it ({_age_s(now, vm.created_at):.0f} s old)", None))
            elif AuthStatus(auth.status) in AUTH_TERMINAL:
                doomed.append((vm, f"its sign-in session is {auth.status}", auth.id))
        if not doomed:
            return
        taken = {vm.id for vm, _, _ in doomed} if dry_run else set(
            VM_LEASES.claim(self.ctx.db, self.owner, s.reconciler_lease_s, ids=[vm.id for vm, _, _ in doomed]))
        try:
            for vm, why, session_id in doomed:
                if vm.id not in taken:
                    continue
                finding = Finding("browser_vm", vm.id, vm.user_id, why, "destroy")
                report.findings.append(finding)
                if dry_run:
                    continue
                try:
                    vm_manager.destroy_vm(self.ctx, None, vm.id, reason=why, module=MODULE, session_id=session_id)
                    finding.result = "done"
                except StatusChanged:
                    finding.result = "lost"
                except RemotecliError:
                    finding.result = "error"  # left in destroying: the next passes retry
                    log.warning("could not destroy a Browser VM", extra={"vm_id": vm.id})
        finally:
            if not dry_run:
                VM_LEASES.release(self.ctx.db, self.owner, sorted(taken))
