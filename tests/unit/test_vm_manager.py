"""vm_manager on a real database with the fake driver: selection, the seed's bug, concurrency."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from remotecli.context import AppContext
from remotecli.db.models import Event, Vm
from remotecli.domain.states import VmStatus
from remotecli.drivers.fake import FakeDriver
from remotecli.errors import (
    AlreadyExists,
    InvalidInput,
    RemotecliError,
    UnknownVmType,
    VmBootFailed,
    VmNotFound,
    VmTerminal,
)
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.transitions import set_vm_status
from remotecli.services.users import Principal


@pytest.fixture
def alice(ctx: AppContext) -> Principal:
    user = users_service.create_user(ctx.db, "alice")
    return Principal(user.id, user.name, False)


@pytest.fixture
def bob(ctx: AppContext) -> Principal:
    user = users_service.create_user(ctx.db, "bob")
    return Principal(user.id, user.name, False)


def _live_cli_vms(ctx: AppContext, principal: Principal) -> list[Vm]:
    return vm_manager.list_vms(ctx, principal, include_ended=False, vm_type="cli")


def _events(ctx: AppContext, vm_id: str) -> list[Event]:
    with ctx.db.transaction() as session:
        return list(session.scalars(select(Event).where(Event.vm_id == vm_id).order_by(Event.id)))


def test_create_boots_to_running_with_timeline(ctx: AppContext, alice: Principal) -> None:
    vm = vm_manager.create_vm(ctx, alice, "cli")
    assert vm.status == "running"
    assert Path(vm.directory).is_dir()
    assert [e.to_status for e in _events(ctx, vm.id) if e.kind == "vm.status"] == ["creating", "starting", "running"]


def test_create_validates_input_without_rows(ctx: AppContext, alice: Principal) -> None:
    with pytest.raises(UnknownVmType):
        vm_manager.create_vm(ctx, alice, "gpu")
    with pytest.raises(InvalidInput):
        vm_manager.create_vm(ctx, alice, "cli", memory_mib=-5)
    with pytest.raises(InvalidInput):
        vm_manager.create_vm(ctx, alice, "cli", vcpus=0)
    assert vm_manager.list_vms(ctx, alice) == []


def test_second_live_cli_vm_is_refused_by_the_database(ctx: AppContext, alice: Principal) -> None:
    vm_manager.create_vm(ctx, alice, "cli")
    with pytest.raises(AlreadyExists):
        vm_manager.create_vm(ctx, alice, "cli")
    assert len(_live_cli_vms(ctx, alice)) == 1
    # Browser VMs are not limited to one.
    vm_manager.create_vm(ctx, alice, "browser")
    vm_manager.create_vm(ctx, alice, "browser")


def test_ensure_returns_the_live_vm(ctx: AppContext, alice: Principal) -> None:
    first, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created
    again, created_again = vm_manager.ensure_cli_vm(ctx, alice)
    assert not created_again and again.id == first.id


def test_seed_failed_vm_with_directory_gone_is_never_picked(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    """The seed: the only CLI VM row is `failed` and its directory is gone."""
    old = vm_manager.create_vm(ctx, alice, "cli")
    with ctx.db.transaction() as session:
        set_vm_status(session, old, VmStatus.FAILED, module="test", message="died earlier", reason="test")
    fake_driver.kill(old.id)  # as in the seed, its process is gone too (else fencing kills it: ADR 0011)
    shutil.rmtree(old.directory)
    fake_driver.calls.clear()

    new, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and new.id != old.id and new.status == "running"
    # The failed VM was never resumed, started or otherwise touched.
    assert all(vm_id != old.id for _, vm_id in fake_driver.calls)
    assert vm_manager.get_vm(ctx, alice, old.id).status == "failed"


def test_running_row_whose_driver_says_dead_becomes_failed(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    old = vm_manager.create_vm(ctx, alice, "cli")
    fake_driver.kill(old.id)
    new, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and new.id != old.id
    stale = vm_manager.get_vm(ctx, alice, old.id)
    assert stale.status == "failed"
    assert "dead" in (stale.status_reason or "")
    kinds = [e.kind for e in _events(ctx, old.id)]
    assert "vm.skipped" in kinds


def test_running_row_whose_directory_is_gone_becomes_failed(ctx: AppContext, alice: Principal) -> None:
    old = vm_manager.create_vm(ctx, alice, "cli")
    shutil.rmtree(old.directory)
    new, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and new.id != old.id
    stale = vm_manager.get_vm(ctx, alice, old.id)
    assert stale.status == "failed" and "directory" in (stale.status_reason or "")


def test_hung_agent_fails_the_proof(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    old = vm_manager.create_vm(ctx, alice, "cli")
    fake_driver.hang_agent(old.id)
    new, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and new.id != old.id
    assert "agent" in (vm_manager.get_vm(ctx, alice, old.id).status_reason or "")
    assert old.id not in fake_driver.running_ids()  # the failed VM's process was stopped


def test_paused_vm_is_resumed_and_stopped_vm_started(ctx: AppContext, alice: Principal) -> None:
    vm = vm_manager.create_vm(ctx, alice, "cli")
    vm_manager.pause_vm(ctx, alice, vm.id)
    same, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert not created and same.id == vm.id and same.status == "running"
    vm_manager.stop_vm(ctx, alice, vm.id)
    same, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert not created and same.id == vm.id and same.status == "running"


def test_stopped_vm_with_directory_gone_is_replaced(ctx: AppContext, alice: Principal) -> None:
    vm = vm_manager.create_vm(ctx, alice, "cli")
    vm_manager.stop_vm(ctx, alice, vm.id)
    shutil.rmtree(vm.directory)
    new, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and new.id != vm.id


def test_boot_failure_marks_failed_with_console(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    fake_driver.fail_next_boot()
    with pytest.raises(VmBootFailed):
        vm_manager.create_vm(ctx, alice, "cli")
    [vm] = vm_manager.list_vms(ctx, alice)
    assert vm.status == "failed" and "kernel panic" in (vm.status_reason or "")
    # ...and the user simply gets a new one next time.
    new, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and new.status == "running"


def test_lifecycle_actions(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    vm = vm_manager.create_vm(ctx, alice, "browser")
    assert vm_manager.pause_vm(ctx, alice, vm.id).status == "paused"
    assert vm_manager.pause_vm(ctx, alice, vm.id).status == "paused"  # idempotent
    assert vm_manager.resume_vm(ctx, alice, vm.id).status == "running"
    assert vm_manager.stop_vm(ctx, alice, vm.id).status == "stopped"
    assert vm_manager.start_vm(ctx, alice, vm.id).status == "running"
    assert vm_manager.destroy_vm(ctx, alice, vm.id).status == "destroyed"
    assert vm_manager.destroy_vm(ctx, alice, vm.id).status == "destroyed"  # idempotent
    assert not Path(vm.directory).exists()
    with pytest.raises(VmTerminal):
        vm_manager.resume_vm(ctx, alice, vm.id)


def test_failed_vm_cannot_be_resumed_or_started(ctx: AppContext, alice: Principal) -> None:
    vm = vm_manager.create_vm(ctx, alice, "cli")
    vm_manager.fail_vm(ctx, vm.id, "test")
    for action in (vm_manager.resume_vm, vm_manager.start_vm, vm_manager.pause_vm, vm_manager.stop_vm):
        with pytest.raises(VmTerminal):
            action(ctx, alice, vm.id)
    assert vm_manager.get_vm(ctx, alice, vm.id).status == "failed"
    # Destroying a failed VM (garbage collection) is allowed.
    assert vm_manager.destroy_vm(ctx, alice, vm.id).status == "destroyed"


def test_users_see_only_their_own_vms(ctx: AppContext, alice: Principal, bob: Principal) -> None:
    vm = vm_manager.create_vm(ctx, alice, "cli")
    with pytest.raises(VmNotFound):
        vm_manager.get_vm(ctx, bob, vm.id)
    with pytest.raises(VmNotFound):
        vm_manager.destroy_vm(ctx, bob, vm.id)
    assert vm_manager.list_vms(ctx, bob) == []
    assert vm_manager.get_vm(ctx, alice, vm.id).status == "running"


def test_twenty_concurrent_ensure_calls_share_one_vm(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    fake_driver.boot_delay_s = 0.3  # widen the race window
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(20)

    def call() -> None:
        try:
            barrier.wait()
            vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
            results.append(vm.id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(results) == 20 and len(set(results)) == 1
    live = _live_cli_vms(ctx, alice)
    assert [vm.id for vm in live] == [results[0]]
    assert len(vm_manager.list_vms(ctx, alice)) == 1  # no failed leftovers either
    assert sum(1 for call, _ in fake_driver.calls if call == "create") == 1


def test_failed_cli_vm_can_be_destroyed_beside_its_replacement(ctx: AppContext, alice: Principal) -> None:
    old = vm_manager.create_vm(ctx, alice, "cli")
    vm_manager.fail_vm(ctx, old.id, "test")
    new, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created
    # failed -> destroying -> destroyed must not collide with the one-live-CLI-VM index.
    assert vm_manager.destroy_vm(ctx, alice, old.id).status == "destroyed"
    assert vm_manager.get_vm(ctx, alice, new.id).status == "running"


# ----------------------------------------------------------------------------------------------
# Creation limits under concurrency (issue 15's probe: 30 simultaneous creations all answered 201)


def _burst(ctx: AppContext, principal: Principal, vm_type: str, n: int = 30) -> tuple[int, dict[str, int]]:
    """``n`` threads create a VM of ``vm_type`` at once, released together; (created, refusals by code)."""
    barrier = threading.Barrier(n)
    created: list[str] = []
    refused: dict[str, int] = {}
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        try:
            vm = vm_manager.create_vm(ctx, principal, vm_type)
            with lock:
                created.append(vm.id)
        except RemotecliError as exc:
            with lock:
                refused[exc.code] = refused.get(exc.code, 0) + 1

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return len(created), refused


def test_concurrent_creations_never_beat_the_rate_limit(ctx: AppContext, alice: Principal) -> None:
    ctx.settings.max_vm_creations_per_user_per_minute = 10
    ctx.settings.max_live_vms_per_user = 100
    created, refused = _burst(ctx, alice, "browser")  # the sign-in worker's path: no API refusal first
    assert created == 10 and refused == {"vm_rate_limited": 20}, (created, refused)
    assert len(vm_manager.list_vms(ctx, alice)) == 10


def test_concurrent_creations_never_beat_the_live_limit(ctx: AppContext, alice: Principal, bob: Principal) -> None:
    ctx.settings.max_vm_creations_per_user_per_minute = 100
    assert ctx.settings.live_vms_limit == 1 + ctx.settings.max_live_auth_sessions_per_user == 4  # the default
    created, refused = _burst(ctx, alice, "browser")
    assert created == 4 and refused == {"too_many_live_vms": 26}, (created, refused)
    live = vm_manager.list_vms(ctx, alice, include_ended=False)
    assert len(live) == 4
    # Another user's VMs count for that user only.
    vm_manager.create_vm(ctx, bob, "browser")
    # A destroyed VM frees its place; failed, destroying and destroyed ones are not live.
    vm_manager.destroy_vm(ctx, alice, live[0].id)
    vm_manager.create_vm(ctx, alice, "cli")
    with pytest.raises(vm_manager.TooManyLiveVms):
        vm_manager.create_vm(ctx, alice, "browser")


def test_concurrent_cli_creations_make_one(ctx: AppContext, alice: Principal) -> None:
    created, refused = _burst(ctx, alice, "cli")
    # The database's unique index refuses a second live CLI VM (already_exists); whichever came
    # after the tenth creation in the minute is refused first by the rate limit.
    assert created == 1 and sum(refused.values()) == 29, (created, refused)
    assert set(refused) <= {"already_exists", "vm_rate_limited"}, refused
    assert len(_live_cli_vms(ctx, alice)) == 1


def test_users_create_no_browser_vms(ctx: AppContext, alice: Principal) -> None:
    admin_row = users_service.create_user(ctx.db, "root-admin", is_admin=True)
    admin = Principal(admin_row.id, admin_row.name, True)
    for who in (alice, admin):
        with pytest.raises(vm_manager.BrowserVmNotAllowed) as refused:
            vm_manager.create_vm_for_user(ctx, who, "browser")
        assert refused.value.http_status == 403 and refused.value.code == "browser_vm_not_allowed"
    with pytest.raises(UnknownVmType):
        vm_manager.create_vm_for_user(ctx, alice, "gpu")
    assert vm_manager.list_vms(ctx, None) == []
    assert vm_manager.create_vm_for_user(ctx, alice, "cli").vm_type == "cli"
