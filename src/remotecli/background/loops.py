"""The one place a controller starts and stops its background loops.

===================  =================================  ==================================
loop                 what it does                        rows it leases
===================  =================================  ==================================
reconciler           database ↔ host, both ways;         ``vms``, ``host_orphans``
                     expires abandoned sign-ins
garbage collector    removes failed VMs past their TTL,  ``vms``
                     old rows and tickets
sign-in worker       advances sign-in sessions           ``auth_sessions``
warm pool            boots Browser VMs ahead of          (none: claims are one conditional
                     sign-ins (``browser_pool_size``)    update, services/pool.py)
===================  =================================  ==================================

Each runs on its own ``background.common.LoopThread`` (a pass at start-up, then every interval or
when woken) and takes row leases through ``background.leases``. Start order: the reconciler
first (its first pass is start-up recovery: after a crash it adopts running VMs and fails the
dead ones before sessions are picked up again), then the GC, then the sign-in worker, then the
warm pool. Stop order is the reverse, so a sign-in step in progress (a VM boot) finishes while the
reconciler still runs.
"""

from __future__ import annotations

from remotecli.background.gc import GarbageCollector
from remotecli.background.pool import PoolKeeper
from remotecli.background.reconciler import Reconciler
from remotecli.background.signins import SigninWorker
from remotecli.context import AppContext


class BackgroundLoops:
    """The reconciler, the garbage collector, the sign-in worker and the warm pool of one
    controller process.

    ``maintenance=False`` runs the sign-in worker alone (tests that drive the reconciler and the
    pool by hand).
    """

    def __init__(self, ctx: AppContext, *, maintenance: bool = True, signin_interval_s: float = 1.0) -> None:
        self.reconciler = Reconciler(ctx) if maintenance else None
        self.gc = GarbageCollector(ctx) if maintenance else None
        self.signins = SigninWorker(ctx, interval_s=signin_interval_s)
        self.pool = PoolKeeper(ctx) if maintenance else None

    def start(self) -> None:
        if self.reconciler is not None:
            self.reconciler.start()  # its first pass runs now: start-up recovery
        if self.gc is not None:
            self.gc.start()
        self.signins.start()
        if self.pool is not None:
            self.pool.start()

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        self.signins.stop()
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.gc is not None:
            self.gc.stop()
