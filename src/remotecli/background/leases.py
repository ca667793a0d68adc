"""Row leases: the one way a controller says "I am working on this row" (VMs, sign-ins, orphans).

With PostgreSQL several controllers may run against one database. Before a loop acts on a row it
takes that row's lease (``lease_owner``/``lease_expires_at``) in a short transaction:
``SELECT ... FOR UPDATE SKIP LOCKED`` of the rows whose lease is free or lapsed, then one
``UPDATE``. No transaction stays open while a driver, a guest agent or a provider is called: the
lease is what keeps another controller away, and a lease whose holder died lapses and is taken
over. On SQLite (one process assumed) the same code runs, serialised by ``BEGIN IMMEDIATE``.

A lease's life::

    free ─claim─► held by owner ─renew─► held (later expiry) ─release─► free
                       └───────── not renewed in time ─────────► lapsed (= free to the next claim)

Each leased table is described once (``VM_LEASES``, ``SESSION_LEASES``, ``ORPHAN_LEASES``,
``VOLUME_LEASES``); the reconciler, the garbage collector, the sign-in worker and the making of a
home volume (``services.workspaces``) all go through these three functions.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute

from remotecli.db.models import AuthSession, Base, HostOrphan, Vm, Volume, utcnow
from remotecli.db.session import Database


@dataclass(frozen=True)
class LeasedTable:
    """The key and lease columns of a table whose rows are leased."""

    model: type[Base]
    key: InstrumentedAttribute[str]
    owner: InstrumentedAttribute[str | None]
    expires: InstrumentedAttribute[dt.datetime | None]

    def free(self, now: dt.datetime) -> ColumnElement[bool]:
        """Rows nobody holds: never leased, released, or lapsed."""
        return or_(self.owner.is_(None), self.expires < now)

    def claim(
        self,
        db: Database,
        owner: str,
        lease_s: float,
        *,
        ids: Iterable[str] | None = None,
        where: Sequence[ColumnElement[bool]] = (),
        order_by: Sequence[Any] = (),
        limit: int | None = None,
        dead_holders: Sequence[str] = (),
    ) -> list[str]:
        """Take the lease of the rows (of ``ids``, matching ``where``) that nobody alive holds;
        returns the keys taken, in order. Safe across controllers. ``dead_holders``: owners
        proven dead (``holder_dead``) whose leases are taken over before they lapse."""
        wanted = sorted(set(ids)) if ids is not None else None
        if wanted is not None and not wanted:
            return []
        now = utcnow()
        with db.transaction() as session:
            free = self.free(now) if not dead_holders else or_(self.free(now), self.owner.in_(dead_holders))
            query = select(self.key).where(free, *where)
            if wanted is not None:
                query = query.where(self.key.in_(wanted))
            query = query.order_by(*order_by, self.key)
            if limit is not None:
                query = query.limit(limit)
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            got = list(session.scalars(query))
            if got:
                session.execute(
                    update(self.model).where(self.key.in_(got))
                    .values({self.owner: owner, self.expires: now + dt.timedelta(seconds=lease_s)})
                    .execution_options(synchronize_session=False)
                )
        return got

    def renew(self, db: Database, owner: str, ids: Sequence[str], lease_s: float) -> int:
        """Push back the expiry of the leases ``owner`` still holds; returns how many it holds."""
        if not ids:
            return 0
        with db.transaction() as session:
            result = session.execute(
                update(self.model).where(self.key.in_(ids), self.owner == owner)
                .values({self.expires: utcnow() + dt.timedelta(seconds=lease_s)})
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def release(self, db: Database, owner: str, ids: Sequence[str]) -> None:
        """Give up ``owner``'s leases of ``ids`` (those someone else took over stay theirs)."""
        if not ids:
            return
        with db.transaction() as session:
            session.execute(
                update(self.model).where(self.key.in_(ids), self.owner == owner)
                .values({self.owner: None, self.expires: None})
                .execution_options(synchronize_session=False)
            )


def _host_id() -> str:
    """This kernel boot and PID namespace, in 8 hex digits ('' when /proc cannot say)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}/{pid_ns}".encode()).hexdigest()[:8]


_HOST_ID = _host_id()


def process_owner(prefix: str) -> str:
    """A lease owner that names this process: ``<prefix>-<host>-<pid>-<random>``, so a controller
    on the same host can tell (``holder_dead``) that the holder is gone without waiting for the
    lease to lapse."""
    return f"{prefix}-{_HOST_ID or 'nohost'}-{os.getpid()}-{uuid.uuid4().hex[:10]}"


def holder_dead(owner: str | None) -> bool:
    """True only when ``owner`` (from ``process_owner``) names a process of this host (same kernel
    boot, same PID namespace) that no longer exists: a SIGKILLed controller. Anything else (another
    host or namespace, an owner of another form, a PID reused since) counts as alive, and its
    lease is left to lapse."""
    parts = (owner or "").rsplit("-", 3)
    if len(parts) != 4 or not _HOST_ID or parts[1] != _HOST_ID or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


VM_LEASES = LeasedTable(Vm, Vm.id, Vm.lease_owner, Vm.lease_expires_at)
SESSION_LEASES = LeasedTable(AuthSession, AuthSession.id, AuthSession.lease_owner, AuthSession.lease_expires_at)
ORPHAN_LEASES = LeasedTable(HostOrphan, HostOrphan.vm_id, HostOrphan.lease_owner, HostOrphan.lease_expires_at)
VOLUME_LEASES = LeasedTable(Volume, Volume.id, Volume.lease_owner, Volume.lease_expires_at)
