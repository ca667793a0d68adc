"""What the background loops share: findings and pass reports, counters for /metrics, the loop thread.

Every loop of a controller (the reconciler, the garbage collector, the sign-in worker) runs on a
``LoopThread``: one pass at start-up, then one every ``interval_s`` or as soon as it is woken.
A pass that fails is logged and the loop goes on. Rows are leased before a loop acts on them
(``background.leases``); ``background.loops.BackgroundLoops`` starts and stops them all.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from remotecli.context import AppContext
from remotecli.db.models import Vm, utcnow
from remotecli.drivers.base import VmSpec
from remotecli.logging import get_logger

T = TypeVar("T")


@dataclass
class Finding:
    """One thing a loop found (and, unless planning only, did something about)."""

    kind: str  # dead_vm, unknown_vm, wedged_vm, destroy_retry, stray_process, orphan, browser_vm,
    #            session_expired, failed_vm, destroyed_row, tickets, login_failures, guest_firewall
    id: str
    owner: str | None
    why: str
    action: str  # fail, watch, destroy, stop, expire, delete, purge
    result: str = "planned"  # planned | done | waiting | lost (someone else changed it) | error


@dataclass
class PassReport:
    loop: str
    controller: str
    started_at: dt.datetime
    duration_s: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    errors: int = 0

    def count(self, result: str = "done") -> Counter[str]:
        return Counter(f.kind for f in self.findings if f.result == result)


def reason_bucket(reason: str | None) -> str:
    """A small, fixed set of labels for failure reasons (Prometheus label values must not explode)."""
    text = (reason or "").lower()
    for needle, bucket in (
        ("wedged", "wedged"),
        ("directory", "directory_missing"),
        ("control socket", "unresponsive"),
        ("could not confirm", "unresponsive"),
        ("process exited", "process_exited"),
        ("dead", "process_exited"),
        ("agent", "agent_unresponsive"),
        ("did not start", "boot_failed"),
        ("boot", "boot_failed"),
        ("deliver", "delivery_failed"),
        ("resume", "driver_error"),
        ("stop failed", "driver_error"),
    ):
        if needle in text:
            return bucket
    return "other" if text else "none"


class LoopStats:
    """Process-wide counters the loops update and ``/metrics`` reads. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.passes: Counter[str] = Counter()
        self.pass_seconds_sum: dict[str, float] = {}
        self.last_pass_seconds: dict[str, float] = {}
        self.pass_errors: Counter[str] = Counter()
        self.actions: Counter[tuple[str, str]] = Counter()  # (kind, result)
        self.failures: Counter[str] = Counter()  # reason bucket of VMs the loops marked failed
        self.orphans_removed = 0

    def record(self, report: PassReport) -> None:
        with self._lock:
            self.passes[report.loop] += 1
            self.pass_seconds_sum[report.loop] = self.pass_seconds_sum.get(report.loop, 0.0) + report.duration_s
            self.last_pass_seconds[report.loop] = report.duration_s
            self.pass_errors[report.loop] += report.errors
            for finding in report.findings:
                if finding.result == "planned":
                    continue
                self.actions[(finding.kind, finding.result)] += 1
                if finding.result == "done" and finding.kind == "orphan":
                    self.orphans_removed += 1
                if finding.result == "done" and finding.action == "fail":
                    self.failures[reason_bucket(finding.why)] += 1


STATS = LoopStats()


def run_pass(loop: str, owner: str, steps: Sequence[Callable[[PassReport, bool], None]], dry_run: bool,
             log: logging.Logger) -> PassReport:
    """Run one pass of a background loop: every step, a failing step logged and skipped (the loop
    goes on), the pass timed, and (unless a dry run) recorded for /metrics and logged."""
    report = PassReport(loop=loop, controller=owner, started_at=utcnow())
    started = time.monotonic()
    for step in steps:
        try:
            step(report, dry_run)
        except Exception:
            report.errors += 1
            log.exception("%s step %s failed; going on", loop, step.__name__)
    report.duration_s = time.monotonic() - started
    if not dry_run:
        STATS.record(report)
        done = report.count("done")
        if done:
            log.info("%s pass: %s", loop, dict(done),
                     extra={"x_duration_s": round(report.duration_s, 3)})
    return report


def new_owner(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def host_spec(ctx: AppContext, vm: Vm | None = None, *, vm_id: str | None = None,
              directory: Path | None = None) -> VmSpec:
    """A spec for inspect/stop/destroy: no image, no agent secret (those calls need neither)."""
    if vm is not None:
        return VmSpec(vm_id=vm.id, vm_type=vm.vm_type, vcpus=vm.vcpus, memory_mib=vm.memory_mib,
                      directory=Path(vm.directory), agent_secret="")
    assert vm_id is not None
    return VmSpec(vm_id=vm_id, vm_type="unknown", vcpus=1, memory_mib=128,
                  directory=directory or ctx.settings.vms_dir / vm_id, agent_secret="")


class LoopThread:
    """Runs ``step`` once at start-up and then every ``interval_s``; a pass that fails logs and goes on."""

    def __init__(self, name: str, step: Callable[[], object], interval_s: float) -> None:
        self.name = name
        self._step = step
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = get_logger(name)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._step()
            except Exception:
                self._log.exception("%s pass failed; next pass in %.0f s", self.name, self.interval_s)
            remaining = self.interval_s - (time.monotonic() - started)
            if remaining > 0:
                self._wake.wait(remaining)
            self._wake.clear()
