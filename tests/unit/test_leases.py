"""The one lease helper (background/leases.py) on every leased table, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

from remotecli.background.leases import ORPHAN_LEASES, SESSION_LEASES, VM_LEASES
from remotecli.context import AppContext
from remotecli.db.models import AuthSession, HostOrphan, utcnow
from remotecli.domain.states import AuthStatus
from remotecli.services import auth_flow, vm_manager
from remotecli.services import users as users_service
from remotecli.services.users import Principal


def _alice(ctx: AppContext) -> Principal:
    user = users_service.create_user(ctx.db, "alice")
    return Principal(user.id, user.name, False)


def test_vm_leases_claim_renew_release(ctx: AppContext) -> None:
    alice = _alice(ctx)
    a = vm_manager.create_vm(ctx, alice, "browser").id
    b = vm_manager.create_vm(ctx, alice, "browser").id
    assert VM_LEASES.claim(ctx.db, "one", 30, ids=[b, a, a]) == sorted([a, b])
    assert VM_LEASES.claim(ctx.db, "two", 30, ids=[a, b]) == []  # held
    assert VM_LEASES.renew(ctx.db, "two", [a, b], 30) == 0  # not theirs to renew
    assert VM_LEASES.renew(ctx.db, "one", [a, b], 30) == 2
    VM_LEASES.release(ctx.db, "two", [a])  # not theirs to release
    assert VM_LEASES.claim(ctx.db, "two", 30, ids=[a]) == []
    VM_LEASES.release(ctx.db, "one", [a])
    assert VM_LEASES.claim(ctx.db, "two", 30, ids=[a, b]) == [a]
    assert VM_LEASES.claim(ctx.db, "two", 30, ids=[]) == []


def test_a_lapsed_lease_is_taken_over(ctx: AppContext) -> None:
    alice = _alice(ctx)
    vm_id = vm_manager.create_vm(ctx, alice, "browser").id
    assert VM_LEASES.claim(ctx.db, "dead", -1, ids=[vm_id]) == [vm_id]  # lapses at once
    assert VM_LEASES.claim(ctx.db, "alive", 30, ids=[vm_id]) == [vm_id]
    assert VM_LEASES.renew(ctx.db, "dead", [vm_id], 30) == 0


def test_session_leases_filter_order_and_limit(ctx: AppContext) -> None:
    alice = _alice(ctx)
    ctx.settings.max_live_auth_sessions_per_user = 10
    first, second, third = (auth_flow.start_session(ctx, alice, p).id for p in ("claude_code", "codex", "gemini"))
    auth_flow.cancel_session(ctx, alice, second)
    live = [AuthSession.status.not_in([AuthStatus.CANCELLED.value])]
    got = SESSION_LEASES.claim(ctx.db, "w", 30, where=live, order_by=[AuthSession.created_at], limit=1)
    assert got == [first]
    assert SESSION_LEASES.claim(ctx.db, "w", 30, where=live, order_by=[AuthSession.created_at]) == [third]


def test_orphan_leases_use_the_vm_id_key(ctx: AppContext) -> None:
    now = utcnow()
    with ctx.db.transaction() as session:
        session.add(HostOrphan(vm_id="vm-orphan", first_seen_at=now - dt.timedelta(minutes=5), last_seen_at=now))
    assert ORPHAN_LEASES.claim(ctx.db, "rec-1", 30, ids=["vm-orphan"]) == ["vm-orphan"]
    assert ORPHAN_LEASES.claim(ctx.db, "rec-2", 30, ids=["vm-orphan"]) == []
    ORPHAN_LEASES.release(ctx.db, "rec-1", ["vm-orphan"])
    assert ORPHAN_LEASES.claim(ctx.db, "rec-2", 30, ids=["vm-orphan"]) == ["vm-orphan"]
