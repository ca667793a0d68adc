"""The warm pool's loop: keeps ``browser_pool_size`` Browser VMs booted for the next sign-ins.

A ``LoopThread`` pass (``services.pool.refill``) retires idle pool VMs of an older image and
boots the missing ones, one after the other, each to the point where Chromium runs on a blank
page. A claim wakes it (``Topic.BROWSER_POOL``), so the pool refills at once; a pool VM the
reconciler failed (dead while idle) is replaced by the next pass. While it runs, the pool gives
way to new VMs when the host is short of memory (``services.capacity.register_releaser`` with
``services.pool.release_for_capacity``). With ``browser_pool_size`` 0 it does nothing.

No database transaction is open while a VM boots or its browser starts (load → act → apply, as
every loop). Several controllers on one database each keep the pool filled from their own passes:
two passes at the same moment may boot one VM too many, which the next pass retires.
"""

from __future__ import annotations

import threading
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
        if self._stopping.is_set() or (self.ctx.settings.browser_pool_size <= 0 and not self._has_idle()):
            return 0
        return pool.refill(self.ctx, stopping=self._stopping)

    def _has_idle(self) -> bool:
        state = pool.state(self.ctx)
        return state.ready + state.booting > 0
