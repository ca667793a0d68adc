"""Capacity admission: live VMs' memory and vCPUs against what the host can hold.

The host's capacity is ``host_memory_mib`` (default: the memory the driver reports for its host,
``VmDriver.host_resources``, minus ``host_memory_reserve_mib``) times ``host_memory_overcommit``,
and ``host_vcpus`` (default: the host's CPUs) times ``host_vcpu_overcommit``. A VM holds its
memory and vCPUs while its row is in one of ``HOLDING`` (its hypervisor may run: from the row's
insert to its destroy; a ``stopped`` VM holds nothing, so starting it again is admitted too).

``admit`` refuses a VM that does not fit with ``HostAtCapacity`` (503 ``host_at_capacity`` with
``Retry-After``). It runs inside the transaction that inserts the VM's row (or moves a stopped
VM to ``starting``), after taking the host's capacity lock, so two concurrent creations are
counted one after the other and cannot both take the last slot: on PostgreSQL a transaction-level
advisory lock (``pg_advisory_xact_lock``; READ COMMITTED, so the sums read after it include every
row its previous holder committed), on SQLite the write transaction itself (``BEGIN IMMEDIATE``,
db/session.py: one writer at a time), as ``vm_manager._check_creation_limits`` does for the
per-user limits. Freeing capacity (a destroy, a stop) needs no lock: it only makes room.

Warm-pool VMs give way first: before refusing, the caller (``vm_manager.create_vm``) asks every
*releaser* registered here (``register_releaser``; the warm pool registers one that destroys
idle pool VMs) to free memory, with no transaction open, and checks again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from remotecli.context import AppContext
from remotecli.db.models import Vm
from remotecli.domain.states import VmStatus
from remotecli.errors import HostAtCapacity
from remotecli.logging import get_logger

log = get_logger("capacity")

#: Statuses whose VM holds its memory and vCPUs on the host (its hypervisor may run). ``unknown``
#: (its Incus member cut off) holds them too: the instance may well still run there, and counting it
#: free would admit a replacement into memory the partitioned VM still uses when the member returns.
HOLDING: frozenset[VmStatus] = frozenset({
    VmStatus.CREATING, VmStatus.STARTING, VmStatus.RUNNING, VmStatus.PAUSED, VmStatus.STOPPING,
    VmStatus.DESTROYING, VmStatus.UNKNOWN,
})

#: The PostgreSQL advisory lock key of the host's capacity ("rcap").
_LOCK_KEY = 0x72636170

#: Frees memory on the host for a VM about to be admitted: called with the context and the MiB
#: still missing, with no transaction open; returns the MiB it freed (0: nothing it could free).
Releaser = Callable[[AppContext, int], int]

_releasers: list[Releaser] = []
_releasers_lock = threading.Lock()


def register_releaser(releaser: Releaser) -> Callable[[], None]:
    """Let ``releaser`` give way to new VMs (the warm pool does); returns its unregistration."""
    with _releasers_lock:
        _releasers.append(releaser)

    def unregister() -> None:
        with _releasers_lock:
            if releaser in _releasers:
                _releasers.remove(releaser)

    return unregister


@dataclass(frozen=True)
class HostCapacity:
    """What VMs may hold in all (after reserve and overcommit), and where it came from."""

    memory_mib: int
    vcpus: int
    source: str


@dataclass(frozen=True)
class CapacityUsage:
    capacity: HostCapacity
    used_memory_mib: int
    used_vcpus: int
    vms: int  # VMs holding capacity

    @property
    def free_memory_mib(self) -> int:
        return max(0, self.capacity.memory_mib - self.used_memory_mib)

    @property
    def free_vcpus(self) -> int:
        return max(0, self.capacity.vcpus - self.used_vcpus)

    def fits(self, vcpus: int, memory_mib: int) -> bool:
        return (self.used_memory_mib + memory_mib <= self.capacity.memory_mib
                and self.used_vcpus + vcpus <= self.capacity.vcpus)

    def describe(self) -> str:
        return (f"memory {self.used_memory_mib}/{self.capacity.memory_mib} MiB used "
                f"({self.free_memory_mib} free), vCPUs {self.used_vcpus}/{self.capacity.vcpus} used "
                f"({self.free_vcpus} free), {self.vms} VM(s)")


def host_capacity(ctx: AppContext) -> HostCapacity:
    """The settings' capacity, or the driver's host minus the reserve, times the overcommit."""
    s = ctx.settings
    sources = []
    if s.host_memory_mib is None or s.host_vcpus is None:
        found = ctx.driver.host_resources()
        sources.append(found.source)
    if s.host_memory_mib is not None:
        memory = s.host_memory_mib
        sources.append("host_memory_mib")
    else:
        memory = max(0, found.memory_mib - s.host_memory_reserve_mib)
    if s.host_vcpus is not None:
        vcpus = s.host_vcpus
        sources.append("host_vcpus")
    else:
        vcpus = found.vcpus
    return HostCapacity(memory_mib=int(memory * s.host_memory_overcommit), vcpus=int(vcpus * s.host_vcpu_overcommit),
                        source=", ".join(sources))


def _used(session: Session, exclude_vm_id: str | None = None) -> tuple[int, int, int]:
    stmt = select(func.coalesce(func.sum(Vm.memory_mib), 0), func.coalesce(func.sum(Vm.vcpus), 0), func.count()
                  ).where(Vm.status.in_(sorted(s.value for s in HOLDING)))
    if exclude_vm_id is not None:
        stmt = stmt.where(Vm.id != exclude_vm_id)
    memory, vcpus, count = session.execute(stmt).one()
    return int(memory), int(vcpus), int(count)


def usage(ctx: AppContext) -> CapacityUsage:
    """Capacity used and free now (``/metrics``, ``doctor``, the admin page)."""
    capacity = host_capacity(ctx)
    with ctx.db.read() as session:
        memory, vcpus, count = _used(session)
    return CapacityUsage(capacity, memory, vcpus, count)


def lock(session: Session) -> None:
    """Take the host's capacity lock for the rest of ``session``'s transaction (see the module
    docstring; on SQLite the write transaction already is the lock)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})


def admit(ctx: AppContext, session: Session, *, vcpus: int, memory_mib: int, vm_type: str,
          exclude_vm_id: str | None = None) -> CapacityUsage:
    """Refuse (``HostAtCapacity``) a VM of ``vcpus``/``memory_mib`` that does not fit. Call inside
    the transaction that inserts its row or moves it to ``starting`` (``exclude_vm_id``: that VM,
    which may already be counted)."""
    lock(session)
    capacity = host_capacity(ctx)
    memory, used_vcpus, count = _used(session, exclude_vm_id)
    now = CapacityUsage(capacity, memory, used_vcpus, count)
    if not now.fits(vcpus, memory_mib):
        raise HostAtCapacity(
            retry_after_s=ctx.settings.host_capacity_retry_after_s,
            log_detail=f"a {vm_type} VM of {memory_mib} MiB and {vcpus} vCPU(s) does not fit: {now.describe()}",
        )
    return now


def make_room(ctx: AppContext, memory_mib: int) -> int:
    """Ask the registered releasers (the warm pool) to free ``memory_mib`` MiB; returns the MiB
    freed. Runs with no transaction open: releasers destroy VMs."""
    with _releasers_lock:
        releasers = list(_releasers)
    freed = 0
    for releaser in releasers:
        if freed >= memory_mib:
            break
        try:
            freed += max(0, int(releaser(ctx, memory_mib - freed)))
        except Exception:
            log.exception("a capacity releaser failed; admitting without it")
    if freed:
        log.info("freed %s MiB for a new VM", freed)
    return freed


def admit_now(ctx: AppContext, *, vcpus: int, memory_mib: int, vm_type: str) -> None:
    """A check before anything of a new VM exists (its home volume included): ``admit`` in a
    transaction of its own; when the VM does not fit, the releasers make room and it is checked
    once more. The insert's transaction checks again (``admit``): this one changes nothing."""
    try:
        with ctx.db.transaction() as session:
            admit(ctx, session, vcpus=vcpus, memory_mib=memory_mib, vm_type=vm_type)
        return
    except HostAtCapacity:
        missing = memory_mib - usage(ctx).free_memory_mib
        if make_room(ctx, missing if missing > 0 else memory_mib) <= 0:  # short of vCPUs: a VM's worth
            raise
    with ctx.db.transaction() as session:
        admit(ctx, session, vcpus=vcpus, memory_mib=memory_mib, vm_type=vm_type)
