"""Every allowed and refused transition, in the table and through the database."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import func, select

from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Event, User, Vm, utcnow
from remotecli.domain.states import (
    AUTH_TERMINAL,
    AUTH_TRANSITIONS,
    VM_TERMINAL,
    VM_TRANSITIONS,
    AuthStatus,
    VmStatus,
    auth_transition_allowed,
    vm_transition_allowed,
)
from remotecli.errors import InvalidTransition, VmTerminal
from remotecli.services.transitions import StatusChanged, set_auth_status, set_vm_status

EXPECTED_VM_EDGES = {
    ("creating", "starting"), ("creating", "failed"), ("creating", "destroying"),
    ("starting", "running"), ("starting", "failed"), ("starting", "destroying"),
    ("running", "paused"), ("running", "stopping"), ("running", "failed"), ("running", "destroying"),
    ("paused", "running"), ("paused", "stopping"), ("paused", "failed"), ("paused", "destroying"),
    ("stopping", "stopped"), ("stopping", "failed"), ("stopping", "destroying"),
    ("stopped", "starting"), ("stopped", "failed"), ("stopped", "destroying"),
    ("destroying", "destroyed"), ("destroying", "failed"),
    ("failed", "destroying"),
    # Issue 14: a VM whose Incus member is unreachable is 'unknown', not failed, for a grace period.
    ("running", "unknown"), ("paused", "unknown"),
    ("unknown", "running"), ("unknown", "paused"), ("unknown", "failed"), ("unknown", "destroying"),
}


def test_vm_table_is_exactly_the_design() -> None:
    edges = {(a.value, b.value) for a, targets in VM_TRANSITIONS.items() for b in targets}
    assert edges == EXPECTED_VM_EDGES


@pytest.mark.parametrize("current,new", list(itertools.product(VmStatus, VmStatus)))
def test_vm_transition_allowed_matches_table(current: VmStatus, new: VmStatus) -> None:
    assert vm_transition_allowed(current, new) == ((current.value, new.value) in EXPECTED_VM_EDGES)


def test_terminal_vm_statuses_never_return_to_work() -> None:
    for status in VM_TERMINAL:
        assert not (VM_TRANSITIONS[status] - {VmStatus.DESTROYING})
    assert VM_TRANSITIONS[VmStatus.DESTROYED] == frozenset()
    # Every non-terminal status can fail.
    for status in set(VmStatus) - VM_TERMINAL:
        assert VmStatus.FAILED in VM_TRANSITIONS[status]


def test_auth_table() -> None:
    happy = ["pending", "provisioning", "awaiting_user", "exchanging", "transferring", "completed"]
    for a, b in itertools.pairwise(happy):
        assert auth_transition_allowed(AuthStatus(a), AuthStatus(b))
    for status in AUTH_TERMINAL:
        assert AUTH_TRANSITIONS[status] == frozenset()
    for status in set(AuthStatus) - AUTH_TERMINAL:
        for ending in ("failed", "expired", "cancelled"):
            assert auth_transition_allowed(status, AuthStatus(ending))
    assert not auth_transition_allowed(AuthStatus.PENDING, AuthStatus.COMPLETED)
    assert not auth_transition_allowed(AuthStatus.AWAITING_USER, AuthStatus.PROVISIONING)


def _make_vm(ctx: AppContext, status: VmStatus) -> Vm:
    now = utcnow()
    with ctx.db.transaction() as session:
        user = session.scalars(select(User).where(User.name == "t")).one_or_none()
        if user is None:
            user = User(id="00000000-0000-0000-0000-000000000001", name="t", is_admin=False, created_at=now)
            session.add(user)
            session.flush()
        vm = Vm(
            id=f"vm-{status.value}-{now.timestamp()}", user_id=user.id, vm_type="browser", status=status.value,
            driver="fake", vcpus=1, memory_mib=256, directory="/nonexistent", agent_secret_enc=b"x",
            generation=0, created_at=now, updated_at=now, status_changed_at=now,
        )
        session.add(vm)
    return vm


def _snapshot(ctx: AppContext, vm_id: str) -> tuple[str, int, int]:
    with ctx.db.transaction() as session:
        vm = session.get(Vm, vm_id)
        assert vm is not None
        events = session.scalar(select(func.count()).select_from(Event).where(Event.vm_id == vm_id))
        return vm.status, vm.generation, int(events or 0)


def test_set_vm_status_on_database_every_pair(ctx: AppContext) -> None:
    """All 81 (current, new) pairs through the database: allowed ones move, refused ones change nothing."""
    for current, new in itertools.product(VmStatus, VmStatus):
        vm = _make_vm(ctx, current)
        before = _snapshot(ctx, vm.id)
        if (current.value, new.value) in EXPECTED_VM_EDGES:
            with ctx.db.transaction() as session:
                set_vm_status(session, vm, new, module="test", message="t")
            status, generation, events = _snapshot(ctx, vm.id)
            assert (status, generation, events) == (new.value, before[1] + 1, before[2] + 1)
            assert vm.status == new.value
        else:
            with pytest.raises((InvalidTransition, VmTerminal)), ctx.db.transaction() as session:
                set_vm_status(session, vm, new, module="test", message="t")
            assert _snapshot(ctx, vm.id) == before, (current, new)  # a refused transition changes nothing


def test_lost_race_changes_nothing(ctx: AppContext) -> None:
    vm = _make_vm(ctx, VmStatus.RUNNING)
    with ctx.db.transaction() as session:
        set_vm_status(session, vm, VmStatus.FAILED, module="test", message="someone else failed it")
    before = _snapshot(ctx, vm.id)
    stale_copy_expects = VmStatus.RUNNING
    with pytest.raises(StatusChanged), ctx.db.transaction() as session:
        set_vm_status(session, vm, VmStatus.PAUSED, module="test", message="t", expected=stale_copy_expects)
    assert _snapshot(ctx, vm.id) == before


def test_set_auth_status_on_database_every_pair(ctx: AppContext) -> None:
    _make_vm(ctx, VmStatus.CREATING)  # creates the user
    for current, new in itertools.product(AuthStatus, AuthStatus):
        now = utcnow()
        auth = AuthSession(id=f"s-{current.value}-{new.value}", user_id="00000000-0000-0000-0000-000000000001",
                           provider="claude_code", status=current.value, generation=0, created_at=now,
                           updated_at=now)
        with ctx.db.transaction() as session:
            session.add(auth)
        if auth_transition_allowed(current, new):
            with ctx.db.transaction() as session:
                set_auth_status(session, auth, new, module="test", message="t")
            assert auth.status == new.value
        else:
            with pytest.raises(InvalidTransition), ctx.db.transaction() as session:
                set_auth_status(session, auth, new, module="test", message="t")
            with ctx.db.transaction() as session:
                row = session.get(AuthSession, auth.id)
                assert row is not None and row.status == current.value and row.generation == 0
                assert session.scalar(
                    select(func.count()).select_from(Event).where(Event.session_id == auth.id)
                ) == 0
