"""The warm pool's loop: keeps ``browser_pool_size`` Browser VMs booted for the next sign-ins.

A ``LoopThread`` pass (``services.pool.refill``) retires idle pool VMs of an older image and
boots the missing ones, one after the other, each to the point where Chromium runs on a blank
page. A claim wakes it (``Topic.BROWSER_POOL``), so the pool refills at once; a pool VM the
reconciler failed (dead while idle) is replaced by the next pass. While it runs, the pool gives
way to new VMs when the host is short of memory (``services.capacity.register_releaser`` with
``services.pool.release_for_capacity``). With ``browser_pool_size`` 0 it boots no pool VM.

The same loop keeps the Browser VM snapshot (ADR 0012, ``browser_snapshot``) fitting the current
image and hypervisor: ``VmDriver.prepare_snapshot`` returns at once while it fits and builds it
(a template VM boots, no secret in it) when it is missing or stale, after the pool is filled so a
warm VM comes first. A failed build is logged and tried again after ``browser_snapshot_retry_s``,
so a broken template cannot boot a VM on every pass. Cold-path Browser VMs restore from it.

No database transaction is open while a VM boots or its browser starts (load → act → apply, as
every loop). Several controllers on one database each keep the pool filled from their own passes:
two passes at the same moment may boot one VM too many, which the next pass retires.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from remotecli.background.common import LoopThread
from remotecli.context import AppContext
from remotecli.logging import get_logger
from remotecli.notifier import Topic
from remotecli.services import capacity, pool

log = get_logger("pool")


class PoolKeeper:
    """The warm pool of one controller: ``run_once`` is a pass; ``start``/``stop`` run it on a loop."""

    def __init__(self, ctx: AppContext, *, interval_s: float | None = None) -> None:
        self.ctx = ctx
        self._stopping = threading.Event()
        self._loop = LoopThread("pool", self.run_once, interval_s or ctx.settings.browser_pool_interval_s)
        self._unsubscribe: Callable[[], None] | None = None
        self._unregister: Callable[[], None] | None = None
        self._snapshot_retry_at = 0.0

    def start(self) -> None:
        self._unregister = capacity.register_releaser(pool.release_for_capacity)
        self._unsubscribe = self.ctx.notifier.subscribe(Topic.BROWSER_POOL, self.wake)
        self._loop.start()

    def wake(self) -> None:
        self._loop.wake()

    def stop(self) -> None:
        self._stopping.set()
        for undo in (self._unsubscribe, self._unregister):
            if undo is not None:
                undo()
        self._loop.stop()

    def run_once(self) -> int:
        """One pass; returns how many pool VMs became ready."""
        if self._stopping.is_set():
            return 0
        ready = 0
        if self.ctx.settings.browser_pool_size > 0 or self._has_idle():
            ready = pool.refill(self.ctx, stopping=self._stopping)
        self._keep_snapshot()
        return ready

    def _keep_snapshot(self) -> None:
        settings, driver = self.ctx.settings, self.ctx.driver
        if (not settings.browser_snapshot or not driver.capabilities.snapshot or self._stopping.is_set()
                or time.monotonic() < self._snapshot_retry_at):
            return
        try:
            driver.prepare_snapshot("browser")
        except Exception as exc:  # a broken template must not stop the pool; cold boots go on
            self._snapshot_retry_at = time.monotonic() + settings.browser_snapshot_retry_s
            log.warning("browser snapshot could not be built; Browser VMs boot cold",
                        extra={"error": type(exc).__name__, "detail": str(exc)[-500:],
                               "retry_in_s": settings.browser_snapshot_retry_s})

    def _has_idle(self) -> bool:
        state = pool.state(self.ctx)
        return state.ready + state.booting > 0
