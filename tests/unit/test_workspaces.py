"""Persistent workspaces (ADR 0011) on a real database (SQLite and PostgreSQL) with the fake driver:
one home volume per user, attached to exactly one CLI VM, moved only after fencing, never remade."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from remotecli.background.reconciler import Reconciler
from remotecli.context import AppContext
from remotecli.db.models import Event, Vm, Volume, utcnow
from remotecli.domain.states import VOLUME_TRANSITIONS, VmStatus, VolumeStatus, volume_transition_allowed
from remotecli.drivers import volumes as host_volumes
from remotecli.drivers.base import HomeDisk, Inspection, Liveness, VmSpec
from remotecli.drivers.fake import FAKE_VOLUME_MAGIC, FakeDriver
from remotecli.errors import DriverError, WorkspaceBusy, WorkspaceUnavailable
from remotecli.services import users as users_service
from remotecli.services import vm_exec, vm_manager, workspaces
from remotecli.services.transitions import set_vm_status
from remotecli.services.users import Principal


@pytest.fixture
def alice(ctx: AppContext) -> Principal:
    user = users_service.create_user(ctx.db, "alice")
    return Principal(user.id, user.name, False)


def _volumes(ctx: AppContext) -> list[Volume]:
    with ctx.db.read() as session:
        return list(session.scalars(select(Volume)))


def _volume_events(ctx: AppContext) -> list[Event]:
    with ctx.db.read() as session:
        return list(session.scalars(
            select(Event).where(Event.kind.in_(["volume.status", "volume.detached", "volume.fence_failed"]))
            .order_by(Event.id)
        ))


def _live_cli(ctx: AppContext, principal: Principal) -> list[Vm]:
    return vm_manager.list_vms(ctx, principal, include_ended=False, vm_type="cli")


def test_volume_state_table() -> None:
    assert volume_transition_allowed(VolumeStatus.AVAILABLE, VolumeStatus.ATTACHED)
    assert volume_transition_allowed(VolumeStatus.ATTACHED, VolumeStatus.AVAILABLE)
    assert not volume_transition_allowed(VolumeStatus.ATTACHED, VolumeStatus.DELETING)  # detach first
    assert not volume_transition_allowed(VolumeStatus.FAILED, VolumeStatus.ATTACHED)  # operator first
    assert VOLUME_TRANSITIONS[VolumeStatus.DELETED] == frozenset()
    assert set(VOLUME_TRANSITIONS) == set(VolumeStatus)


def test_first_cli_vm_makes_and_attaches_the_home(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    vm, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created
    [volume] = _volumes(ctx)
    assert volume.user_id == alice.user_id and volume.status == "attached" and volume.attached_vm_id == vm.id
    assert volume.size_bytes == ctx.settings.workspace_size_gib * 1024**3
    assert Path(volume.location).parent == ctx.settings.volumes_dir and Path(volume.location).is_file()
    assert fake_driver.home_of(vm.id) == volume.location
    assert [(e.from_status, e.to_status) for e in _volume_events(ctx)] == [
        (None, "creating"), ("creating", "available"), ("available", "attached")]
    # The VM's own timeline keeps its shape; the volume's steps are beside it.
    with ctx.db.read() as session:
        kinds = [e.to_status for e in session.scalars(
            select(Event).where(Event.vm_id == vm.id, Event.kind == "vm.status").order_by(Event.id))]
    assert kinds == ["creating", "starting", "running"]
    # Browser VMs get no home volume.
    browser = vm_manager.create_vm(ctx, alice, "browser")
    assert fake_driver.home_of(browser.id) is None and len(_volumes(ctx)) == 1


def test_a_dead_vm_is_replaced_with_the_same_home(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    first, _ = vm_manager.ensure_cli_vm(ctx, alice)
    fake_driver.kill(first.id)
    fake_driver.delete_directory(first.id)  # the seed's case
    second, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and second.id != first.id
    [volume] = _volumes(ctx)
    assert volume.attached_vm_id == second.id and volume.status == "attached"
    assert fake_driver.home_of(second.id) == volume.location
    assert fake_driver.calls.count(("create_volume", volume.location)) == 1  # never formatted again
    detached = [e for e in _volume_events(ctx) if e.from_status == "attached" and e.to_status == "available"]
    assert len(detached) == 1 and (detached[0].details or {})["vm_id"] == first.id
    assert "proven dead" in detached[0].message


def test_a_failed_vm_still_running_is_killed_before_its_home_moves(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    first, _ = vm_manager.ensure_cli_vm(ctx, alice)
    # The row says failed, but the process still runs (e.g. a controller crashed mid-way).
    with ctx.db.transaction() as session:
        vm = session.get(Vm, first.id)
        assert vm is not None
        set_vm_status(session, vm, VmStatus.FAILED, module="test", message="failed for the test")
    assert first.id in fake_driver.running_ids()
    second, _ = vm_manager.ensure_cli_vm(ctx, alice)
    assert first.id not in fake_driver.running_ids()  # fenced: stopped before the attach
    stop_at = fake_driver.calls.index(("stop", first.id))
    assert stop_at < fake_driver.calls.index(("create", second.id))
    assert fake_driver.double_attach == []


def test_an_unproven_old_vm_keeps_the_home_and_no_new_vm_is_made(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = vm_manager.ensure_cli_vm(ctx, alice)
    fake_driver.kill(first.id)

    def cannot_prove(spec: VmSpec, timeout: float = 5.0) -> Inspection:
        return Inspection(Liveness.UNKNOWN, "control socket unresponsive")

    monkeypatch.setattr(fake_driver, "fence", cannot_prove)
    with pytest.raises(WorkspaceBusy):
        vm_manager.ensure_cli_vm(ctx, alice)
    [volume] = _volumes(ctx)
    assert volume.attached_vm_id == first.id  # never presumed dead
    assert _live_cli(ctx, alice) == []  # refused before any new VM row
    assert any(e.kind == "volume.fence_failed" for e in _volume_events(ctx))


def test_concurrent_ensure_after_a_failure_gives_one_vm_with_the_home(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    first, _ = vm_manager.ensure_cli_vm(ctx, alice)
    fake_driver.kill(first.id)
    fake_driver.boot_delay_s = 0.2
    results: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
            results.append(vm.id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(set(results)) == 1
    [live] = _live_cli(ctx, alice)
    assert live.id == results[0] and live.id != first.id
    [volume] = _volumes(ctx)
    assert volume.attached_vm_id == live.id and volume.status == "attached"
    assert fake_driver.double_attach == []
    homes = [fake_driver.home_of(vm_id) for vm_id in fake_driver.running_ids()]
    assert homes.count(volume.location) == 1


def test_concurrent_first_ensure_makes_one_volume(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            vm_manager.ensure_cli_vm(ctx, alice)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(_volumes(ctx)) == 1
    assert len([c for c in fake_driver.calls if c[0] == "create_volume"]) == 1


def test_a_missing_volume_file_fails_clearly_and_is_never_remade(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    first, _ = vm_manager.ensure_cli_vm(ctx, alice)
    [volume] = _volumes(ctx)
    fake_driver.kill(first.id)
    os.unlink(volume.location)
    with pytest.raises(WorkspaceUnavailable) as raised:
        vm_manager.ensure_cli_vm(ctx, alice)
    assert "missing" in raised.value.message and "operator" in raised.value.message
    [after] = _volumes(ctx)
    assert after.id == volume.id and after.status == "failed" and "missing" in (after.status_reason or "")
    assert not Path(volume.location).exists()  # nothing was formatted in its place
    assert len([c for c in fake_driver.calls if c[0] == "create_volume"]) == 1
    # Asking again does not make a new one either.
    with pytest.raises(WorkspaceUnavailable):
        vm_manager.ensure_cli_vm(ctx, alice)
    assert len(_volumes(ctx)) == 1 and _live_cli(ctx, alice) == []


def test_an_unreadable_volume_fails_the_vm_that_wanted_it(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    first, _ = vm_manager.ensure_cli_vm(ctx, alice)
    vm_manager.stop_vm(ctx, None, first.id)
    [volume] = _volumes(ctx)
    Path(volume.location).write_bytes(b"garbage")
    with pytest.raises(WorkspaceUnavailable):
        vm_manager.start_vm(ctx, None, first.id)
    vm = vm_manager.get_vm(ctx, None, first.id)
    assert vm.status == "failed" and "home volume" in (vm.status_reason or "")
    assert "no ext4 filesystem" in (vm.status_reason or "")


def test_a_home_the_guest_cannot_mount_fails_the_vm_and_the_volume(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    fake_driver.fail_home_mount("e2fsck -p exit 4: UNEXPECTED INCONSISTENCY")
    with pytest.raises(WorkspaceUnavailable) as raised:
        vm_manager.ensure_cli_vm(ctx, alice)
    assert "could not be mounted" in raised.value.message
    [vm] = vm_manager.list_vms(ctx, alice, vm_type="cli")
    assert vm.status == "failed" and "UNEXPECTED INCONSISTENCY" in (vm.status_reason or "")
    [volume] = _volumes(ctx)
    assert volume.status == "failed"


def test_a_live_vm_keeps_its_home(ctx: AppContext, alice: Principal) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    with pytest.raises(WorkspaceBusy):
        workspaces.release(ctx, vm.id)
    [volume] = _volumes(ctx)
    assert volume.attached_vm_id == vm.id


def test_stop_and_start_keep_the_same_attachment(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    vm_manager.stop_vm(ctx, None, vm.id)
    [volume] = _volumes(ctx)
    assert volume.attached_vm_id == vm.id  # a stopped VM keeps its home
    again, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert not created and again.id == vm.id
    assert fake_driver.home_of(vm.id) == volume.location


def test_destroy_detaches_after_the_process_is_gone(ctx: AppContext, alice: Principal) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    vm_manager.destroy_vm(ctx, None, vm.id)
    [volume] = _volumes(ctx)
    assert volume.attached_vm_id is None and volume.status == "available"
    assert Path(volume.location).is_file()  # the home outlives the VM
    again, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and workspaces.attached_to(ctx, again.id) is not None


def test_reconciler_detaches_volumes_of_dead_vms(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    fake_driver.kill(vm.id)
    reconciler = Reconciler(ctx)
    plan = reconciler.run_once(dry_run=True)
    assert [f.kind for f in plan.findings] == ["dead_vm"]
    report = reconciler.run_once()
    # Failing the dead VM and freeing its home (after fencing) are one action.
    assert [(f.kind, f.result) for f in report.findings] == [("dead_vm", "done")]
    [volume] = _volumes(ctx)
    assert volume.attached_vm_id is None and volume.status == "available"


def test_reconciler_detaches_a_volume_left_on_an_ended_vm(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    # Failed elsewhere (a controller that died before detaching); its process still runs.
    with ctx.db.transaction() as session:
        row = session.get(Vm, vm.id)
        assert row is not None
        set_vm_status(session, row, VmStatus.FAILED, module="test", message="failed for the test")
    reconciler = Reconciler(ctx)
    assert "volume_attached_to_dead_vm" in [f.kind for f in reconciler.run_once(dry_run=True).findings]
    report = reconciler.run_once()
    assert ("volume_attached_to_dead_vm", "done") in [(f.kind, f.result) for f in report.findings]
    assert vm.id not in fake_driver.running_ids()  # fenced before the detach
    [volume] = _volumes(ctx)
    assert volume.attached_vm_id is None and volume.status == "available"
    assert not [f for f in reconciler.run_once().findings if f.kind == "volume_attached_to_dead_vm"]


# -- host volume files (the qemu and firecracker drivers) -------------------------------------------


def test_ext4_volume_file_is_sparse_and_never_formatted_twice(tmp_path: Path) -> None:
    path = tmp_path / "volumes" / "vol-1.ext4"
    host_volumes.create_ext4_file(path, 1024**3, owner_uid=1000)
    assert host_volumes.file_problem(path) is None
    allocated, size = host_volumes.file_usage(path) or (0, 0)
    assert size == 1024**3 and allocated < 64 * 1024**2  # sparse
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    before = path.read_bytes()[:8192]
    with pytest.raises(DriverError):
        host_volumes.create_ext4_file(path, 1024**3, owner_uid=1000)
    assert path.read_bytes()[:8192] == before
    assert [p.name for p in path.parent.iterdir()] == ["vol-1.ext4"]  # no temporary left


def test_a_dead_makers_temporary_file_is_removed_by_the_next_maker(tmp_path: Path) -> None:
    path = tmp_path / "volumes" / "vol-2.ext4"
    path.parent.mkdir()
    stale = path.with_name(f".{path.name}.deadbeef.tmp")  # a maker killed mid-mkfs left it
    stale.write_bytes(b"half a filesystem")
    os.utime(stale, (time.time() - 600, time.time() - 600))
    recent = path.with_name(f".{path.name}.cafef00d.tmp")  # maybe a maker still at work: kept
    recent.write_bytes(b"")
    other = path.with_name(".vol-3.ext4.deadbeef.tmp")  # another volume's: not this maker's business
    other.write_bytes(b"")
    os.utime(other, (time.time() - 600, time.time() - 600))
    host_volumes.create_ext4_file(path, 1024**3, owner_uid=1000)
    assert host_volumes.file_problem(path) is None
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, recent.name, other.name])


def test_volume_file_problems_in_words(tmp_path: Path) -> None:
    assert "missing" in (host_volumes.file_problem(tmp_path / "nope.ext4") or "")
    short = tmp_path / "short.ext4"
    short.write_bytes(b"x" * 10)
    assert "truncated" in (host_volumes.file_problem(short) or "")
    junk = tmp_path / "junk.ext4"
    junk.write_bytes(b"\0" * 8192)
    assert "no ext4" in (host_volumes.file_problem(junk) or "")


def test_qemu_gives_the_home_as_a_third_disk_with_a_serial(tmp_path: Path) -> None:
    from remotecli.config import Settings
    from remotecli.drivers.host import config_disk
    from remotecli.drivers.qemu.driver import QemuDriver

    home = HomeDisk(volume_id="vol-9", location=str(tmp_path / "v,ol.ext4"))
    spec = VmSpec(vm_id="vm-1", vm_type="cli", vcpus=1, memory_mib=256, directory=tmp_path / "vm-1",
                  agent_secret="s" * 32, home=home)
    args = QemuDriver._home_args(spec)
    assert args[1] == f"id=home,file={tmp_path}/v,,ol.ext4,format=raw,if=none,cache=writeback,discard=unmap"
    assert args[3] == "virtio-blk-device,drive=home,serial=rc-home"
    doc = config_disk(spec).model_dump(exclude_none=True)
    assert (doc["home_volume_id"], doc["home_serial"], doc["home_device"], doc["home_path"]) == (
        "vol-9", "rc-home", "/dev/vdc", "/home/cli")
    assert QemuDriver._home_args(VmSpec(vm_id="vm-2", vm_type="cli", vcpus=1, memory_mib=256,
                                        directory=tmp_path, agent_secret="s" * 32)) == []
    assert QemuDriver(Settings(data_dir=tmp_path / "d")).name == "qemu"


# -- rebuild --------------------------------------------------------------------------------------


def test_rebuild_gives_a_new_vm_with_the_same_home(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    old, _ = vm_manager.ensure_cli_vm(ctx, alice)
    [volume] = _volumes(ctx)
    new = vm_manager.rebuild_cli_vm(ctx, alice, old.id)
    assert new.id != old.id and new.status == "running"
    assert vm_manager.get_vm(ctx, alice, old.id).status == "destroyed"
    # The old VM was shut down gracefully (home unmounted cleanly) before it was destroyed.
    assert fake_driver.calls.index(("stop", old.id)) < fake_driver.calls.index(("destroy", old.id))
    [after] = _volumes(ctx)
    assert after.id == volume.id and after.attached_vm_id == new.id
    assert fake_driver.home_of(new.id) == volume.location
    with ctx.db.read() as session:
        rebuilt = session.scalars(select(Event).where(Event.kind == "vm.rebuilt")).one()
    assert rebuilt.vm_id == new.id and (rebuilt.details or {})["replaces"] == old.id
    # Browser VMs have no home to keep.
    browser = vm_manager.create_vm(ctx, alice, "browser")
    from remotecli.errors import InvalidInput

    with pytest.raises(InvalidInput):
        vm_manager.rebuild_cli_vm(ctx, alice, browser.id)


def test_rebuild_over_http_is_the_owners_only(ctx: AppContext, fake_driver: FakeDriver) -> None:
    from fastapi.testclient import TestClient

    from remotecli.app import create_app

    def token(name: str, admin: bool = False) -> tuple[Principal, dict[str, str]]:
        user = users_service.create_user(ctx.db, name, is_admin=admin)
        _, secret = users_service.create_token(ctx.db, user)
        return Principal(user.id, user.name, admin), {"Authorization": f"Bearer {secret}"}

    owner, owner_auth = token("owner")
    _, admin_auth = token("root", admin=True)
    vm, _ = vm_manager.ensure_cli_vm(ctx, owner)
    with TestClient(create_app(ctx, background=False), raise_server_exceptions=False) as client:
        refused = client.post(f"/api/v1/vms/{vm.id}/rebuild", headers=admin_auth)
        assert refused.status_code == 404 and refused.json()["code"] == "vm_not_found"
        answer = client.post(f"/api/v1/vms/{vm.id}/rebuild", headers=owner_auth)
        assert answer.status_code == 200, answer.text
        body = answer.json()
    assert body["id"] != vm.id and body["status"] == "running" and body["vm_type"] == "cli"
    assert workspaces.attached_to(ctx, body["id"]) is not None


# -- idle stop ------------------------------------------------------------------------------------


def _idle_for(ctx: AppContext, vm_id: str, seconds: float) -> None:
    import datetime as dt

    from sqlalchemy import update

    from remotecli.db.models import utcnow

    with ctx.db.transaction() as session:
        then = utcnow() - dt.timedelta(seconds=seconds)
        session.execute(update(Vm).where(Vm.id == vm_id).values(last_active_at=then))


def test_idle_cli_vm_is_stopped_with_its_home_kept_and_started_on_next_use(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    ctx.settings.cli_vm_idle_stop_s = 600
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    reconciler = Reconciler(ctx)
    assert not [f for f in reconciler.run_once().findings if f.kind == "idle_stop"]  # just used
    _idle_for(ctx, vm.id, 601)
    assert [f.kind for f in reconciler.run_once(dry_run=True).findings] == ["idle_stop"]
    report = reconciler.run_once()
    assert [(f.kind, f.result) for f in report.findings] == [("idle_stop", "done")]
    assert vm_manager.get_vm(ctx, alice, vm.id).status == "stopped"
    assert vm.id not in fake_driver.running_ids()  # its memory is freed
    assert workspaces.attached_to(ctx, vm.id) is not None  # its home stays with it
    with ctx.db.read() as session:
        event = session.scalars(select(Event).where(Event.kind == "vm.idle_stopped")).one()
    assert event.vm_id == vm.id and "home is kept" in event.message
    # The next use starts the same VM again, with the same home.
    again, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert not created and again.id == vm.id and again.status == "running"
    assert fake_driver.home_of(vm.id) == workspaces.attached_to(ctx, vm.id).location  # type: ignore[union-attr]
    # A VM used since is not stopped.
    assert not [f for f in reconciler.run_once().findings if f.kind == "idle_stop"]


def test_exec_starts_an_idle_stopped_vm(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    ctx.settings.cli_vm_idle_stop_s = 600
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    _idle_for(ctx, vm.id, 601)
    Reconciler(ctx).run_once()
    assert vm_manager.get_vm(ctx, alice, vm.id).status == "stopped"
    result = vm_exec.exec_in_vm(ctx, alice, vm.id, ["echo", "back"], timeout_s=5)
    assert result.exit_code == 0 and result.stdout == b"back\n"
    assert vm_manager.get_vm(ctx, alice, vm.id).status == "running"


def test_idle_stop_off_and_browser_vms_untouched(ctx: AppContext, alice: Principal) -> None:
    ctx.settings.cli_vm_idle_stop_s = 0
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    _idle_for(ctx, vm.id, 10**6)
    assert not [f for f in Reconciler(ctx).run_once().findings if f.kind == "idle_stop"]
    ctx.settings.cli_vm_idle_stop_s = 600
    browser = vm_manager.create_vm(ctx, alice, "browser")
    _idle_for(ctx, browser.id, 10**6)
    findings = [f for f in Reconciler(ctx).run_once(dry_run=True).findings if f.kind == "idle_stop"]
    assert [f.id for f in findings] == [vm.id]


# -- deleting users: the home is kept unless purged; kept homes are gc's orphans ------------------


def test_deleting_a_user_keeps_the_home_as_an_orphan_until_its_retention(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    import datetime as dt

    from sqlalchemy import update

    from remotecli.background.gc import GarbageCollector
    from remotecli.db.models import utcnow
    from remotecli.services import user_removal

    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    [volume] = _volumes(ctx)
    removal = user_removal.delete_user(ctx, "alice")
    assert removal.vms_destroyed == [vm.id] and removal.volume_kept and removal.volume_id == volume.id
    assert vm.id not in fake_driver.running_ids()
    [kept] = _volumes(ctx)
    assert kept.status == "available" and kept.attached_vm_id is None and Path(kept.location).is_file()
    assert [v.id for v in workspaces.orphans(ctx)] == [volume.id]

    gc = GarbageCollector(ctx)
    planned = [(f.kind, f.id, f.action) for f in gc.run_once(dry_run=True).findings]
    assert planned == [("orphan_volume", volume.id, "keep")]
    assert [(f.kind, f.result) for f in gc.run_once().findings] == [("orphan_volume", "waiting")]
    assert Path(volume.location).is_file()
    retention = ctx.settings.workspace_orphan_retention_s or 0
    with ctx.db.transaction() as session:
        session.execute(update(Volume).values(updated_at=utcnow() - dt.timedelta(seconds=retention + 1)))
    assert [(f.kind, f.action) for f in gc.run_once(dry_run=True).findings] == [("orphan_volume", "delete")]
    assert [(f.kind, f.result) for f in gc.run_once().findings] == [("orphan_volume", "done")]
    assert not Path(volume.location).exists()
    assert _volumes(ctx)[0].status == "deleted" and workspaces.orphans(ctx) == []


def test_deleting_a_user_with_purge_deletes_the_home(ctx: AppContext, alice: Principal) -> None:
    from remotecli.services import user_removal

    vm_manager.ensure_cli_vm(ctx, alice)
    [volume] = _volumes(ctx)
    removal = user_removal.delete_user(ctx, "alice", purge=True)
    assert not removal.volume_kept
    assert not Path(volume.location).exists()
    [after] = _volumes(ctx)
    assert after.status == "deleted" and workspaces.orphans(ctx) == []
    statuses = [(e.from_status, e.to_status) for e in _volume_events(ctx)][-3:]
    assert statuses == [("attached", "available"), ("available", "deleting"), ("deleting", "deleted")]
    # A new user of the same name starts with a new, empty home.
    bob = users_service.create_user(ctx.db, "alice")
    vm_manager.ensure_cli_vm(ctx, Principal(bob.id, bob.name, False))
    assert len([v for v in _volumes(ctx) if v.status == "attached"]) == 1


def test_users_delete_on_the_command_line(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from remotecli.cli.main import main

    monkeypatch.setenv("REMOTECLI_DATA_DIR", str(tmp_path / "cli-data"))
    monkeypatch.setenv("REMOTECLI_DATABASE_URL", db_url)
    monkeypatch.setenv("REMOTECLI_DRIVER", "fake")
    runner = CliRunner()
    assert runner.invoke(main, ["users", "create", "carol"], catch_exceptions=False).exit_code == 0
    assert runner.invoke(main, ["vm", "create", "--user", "carol"], catch_exceptions=False).exit_code == 0
    result = runner.invoke(main, ["users", "delete", "carol", "--yes"], catch_exceptions=False)
    assert result.exit_code == 0 and "home volume vol-" in result.output and "kept" in result.output
    gone = runner.invoke(main, ["users", "delete", "carol", "--yes"], catch_exceptions=False)
    assert gone.exit_code != 0


def test_workspace_usage_over_http(ctx: AppContext, fake_driver: FakeDriver) -> None:
    from fastapi.testclient import TestClient

    from remotecli.app import create_app

    user = users_service.create_user(ctx.db, "dora")
    _, secret = users_service.create_token(ctx.db, user)
    auth = {"Authorization": f"Bearer {secret}"}
    with TestClient(create_app(ctx, background=False), raise_server_exceptions=False) as client:
        none_yet = client.get("/api/v1/workspace", headers=auth)
        assert none_yet.status_code == 404 and none_yet.json()["code"] == "workspace_not_found"
        vm, _ = vm_manager.ensure_cli_vm(ctx, Principal(user.id, user.name, False))
        body = client.get("/api/v1/workspace", headers=auth).json()
    [volume] = _volumes(ctx)
    assert body["id"] == volume.id and body["status"] == "attached" and body["attached_vm_id"] == vm.id
    assert body["size_bytes"] == body["total_bytes"] == ctx.settings.workspace_size_gib * 1024**3
    assert body["host_allocated_bytes"] > 0
    assert body["used_bytes"] is None  # the fake guest has no df; a real guest answers (integration test)
    assert "location" not in body  # host paths stay on the host


def test_a_delivery_into_a_full_home_fails_with_workspace_full(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    import time

    from remotecli.background import signins
    from remotecli.services import auth_flow

    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    [volume] = _volumes(ctx)
    fake_driver.full_homes.add(volume.location)
    worker = signins.SigninWorker(ctx, interval_s=0.05)
    worker.start()
    try:
        auth = auth_flow.start_session(ctx, alice, "claude_code")
        fake_driver.login_outcome = ("complete", {"access_token": "at-x", "refresh_token": "rt-x",
                                                  "expires_in": 3600, "token_type": "Bearer"})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            auth = auth_flow.get_session(ctx, None, auth.id)
            if auth.status in ("completed", "failed"):
                break
            time.sleep(0.05)
    finally:
        worker.stop()
    assert auth.status == "failed" and auth.error_code == "workspace_full"
    assert "home is full" in (auth.error_message or "") and "Free some space" in (auth.error_message or "")
    # The full home is not the VM's fault: it is not failed or replaced, and no credential was kept.
    assert vm_manager.get_vm(ctx, alice, vm.id).status == "running"
    assert [v.id for v in vm_manager.list_vms(ctx, alice, include_ended=False, vm_type="cli")] == [vm.id]
    assert auth.credential_enc is None


def test_guest_says_no_space_when_the_home_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from remotecli.agent.guest import files as guest_files

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(guest_files.os, "write", full)
    with pytest.raises(guest_files.FileOpError) as raised:
        guest_files.write_file(str(tmp_path / "f.json"), b"{}", 0o600)
    assert (raised.value.status, raised.value.code) == (507, "no_space")
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


# ----------------------------------------------------------------------------------------------
# A volume row whose maker died while making it (its lease lapses; ADR 0011)


class MakerDied(BaseException):
    """A controller killed in the middle of making a volume: nothing of it runs any more."""


def _stuck_row(ctx: AppContext, user_id: str, *, lease_s: float = -1.0, file: bytes | None = None) -> Volume:
    """A 'creating' row as a maker that died left it: its lease lapsed (or lapses in ``lease_s``)."""
    now = utcnow()
    volume = Volume(id="vol-stuck", user_id=user_id, status="creating", size_bytes=1024, driver="fake",
                    location=workspaces.location_for(ctx, "vol-stuck"), generation=0, created_at=now,
                    updated_at=now, status_changed_at=now, lease_owner="vol-deadmaker",
                    lease_expires_at=now + dt.timedelta(seconds=lease_s))
    with ctx.db.transaction() as session:
        session.add(volume)
    if file is not None:
        Path(volume.location).parent.mkdir(parents=True, exist_ok=True)
        Path(volume.location).write_bytes(file)
    return volume


def _fast_leases(monkeypatch: pytest.MonkeyPatch, lease_s: float) -> None:
    monkeypatch.setattr(workspaces, "CREATING_LEASE_S", lease_s)
    monkeypatch.setattr(workspaces, "_RENEW_EVERY_S", lease_s / 3)


def test_a_row_whose_maker_died_is_taken_over_at_once(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    stuck = _stuck_row(ctx, alice.user_id)
    started = time.monotonic()
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    assert time.monotonic() - started < 3  # not the old 120 s wait
    [volume] = _volumes(ctx)
    assert volume.id == stuck.id and volume.status == "attached" and volume.attached_vm_id == vm.id
    assert volume.lease_owner is None and volume.lease_expires_at is None
    assert fake_driver.calls.count(("create_volume", stuck.location)) == 1
    with ctx.db.read() as session:
        [taken] = list(session.scalars(select(Event).where(Event.kind == "volume.taken_over")))
    assert (taken.details or {})["previous_owner"] == "vol-deadmaker"


def test_a_file_the_dead_maker_completed_is_kept(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    stuck = _stuck_row(ctx, alice.user_id, file=FAKE_VOLUME_MAGIC + b" the dead maker's volume")
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    [volume] = _volumes(ctx)
    assert volume.id == stuck.id and volume.attached_vm_id == vm.id
    assert not [c for c in fake_driver.calls if c[0] == "create_volume"]  # never formatted over
    assert Path(stuck.location).read_bytes().endswith(b" the dead maker's volume")


def test_a_live_maker_is_waited_for_and_its_lease_lapses_promptly_once_it_stops(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fast_leases(monkeypatch, 0.6)
    stuck = _stuck_row(ctx, alice.user_id, lease_s=1.0)  # held for one more second, then never renewed
    started = time.monotonic()
    vm_manager.ensure_cli_vm(ctx, alice)
    waited = time.monotonic() - started
    assert 0.9 < waited < 4
    [volume] = _volumes(ctx)
    assert volume.id == stuck.id and volume.status == "attached"


def test_a_maker_that_renews_its_lease_is_never_taken_over(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fast_leases(monkeypatch, 0.6)
    original = fake_driver.create_volume

    def slow_create(location: str, size_bytes: int, owner_uid: int) -> None:
        time.sleep(2.0)  # three lease lengths: only the renewals keep the row
        original(location, size_bytes, owner_uid)

    monkeypatch.setattr(fake_driver, "create_volume", slow_create)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            vm_manager.ensure_cli_vm(ctx, alice)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join(60)
    assert errors == []
    [volume] = _volumes(ctx)
    assert volume.status == "attached"
    assert Path(volume.location).read_bytes() == FAKE_VOLUME_MAGIC
    with ctx.db.read() as session:
        assert not list(session.scalars(select(Event).where(Event.kind == "volume.taken_over")))


@pytest.mark.parametrize("died", ["before_the_file", "after_the_file"])
def test_a_maker_killed_mid_creation_loses_nothing_and_the_next_ensure_is_prompt(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, monkeypatch: pytest.MonkeyPatch, died: str
) -> None:
    _fast_leases(monkeypatch, 1.0)
    original = fake_driver.create_volume

    def killed(location: str, size_bytes: int, owner_uid: int) -> None:
        if died == "after_the_file":
            original(location, size_bytes, owner_uid)
        monkeypatch.setattr(fake_driver, "create_volume", original)
        raise MakerDied()

    monkeypatch.setattr(fake_driver, "create_volume", killed)
    with pytest.raises(MakerDied):
        vm_manager.ensure_cli_vm(ctx, alice)
    [stuck] = _volumes(ctx)
    assert stuck.status == "creating" and stuck.lease_owner is not None
    started = time.monotonic()
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)  # the restarted controller's ensure
    assert time.monotonic() - started < 3
    [volume] = _volumes(ctx)
    assert volume.id == stuck.id and volume.attached_vm_id == vm.id and volume.status == "attached"
    creates = [c for c in fake_driver.calls if c[0] == "create_volume"]
    assert len(creates) == 1  # one volume, made once (by the dead maker or by the taker)
    assert fake_driver.double_attach == [] and len(_live_cli(ctx, alice)) == 1


def test_the_reconciler_settles_a_stuck_row(ctx: AppContext, fake_driver: FakeDriver) -> None:
    users = [users_service.create_user(ctx.db, name) for name in ("nofile", "complete", "garbage", "alive")]
    rows = {}
    for user, (name, lease_s, file) in zip(users, [("nofile", -1.0, None),
                                                   ("complete", -1.0, FAKE_VOLUME_MAGIC + b"data"),
                                                   ("garbage", -1.0, b"not a volume at all"),
                                                   ("alive", 60.0, None)], strict=True):
        now = utcnow()
        row = Volume(id=f"vol-{name}", user_id=user.id, status="creating", size_bytes=1024, driver="fake",
                     location=workspaces.location_for(ctx, f"vol-{name}"), generation=0, created_at=now,
                     updated_at=now, status_changed_at=now, lease_owner="vol-deadmaker",
                     lease_expires_at=now + dt.timedelta(seconds=lease_s))
        with ctx.db.transaction() as session:
            session.add(row)
        if file is not None:
            Path(row.location).parent.mkdir(parents=True, exist_ok=True)
            Path(row.location).write_bytes(file)
        rows[name] = row
    dry = Reconciler(ctx).run_once(dry_run=True)
    assert sorted(f.id for f in dry.findings if f.kind == "volume_stuck_creating") == [
        "vol-complete", "vol-garbage", "vol-nofile"]  # a live maker's row is not touched
    report = Reconciler(ctx).run_once()
    results = {f.id: f.result for f in report.findings if f.kind == "volume_stuck_creating"}
    assert results == {"vol-nofile": "removed", "vol-complete": "available", "vol-garbage": "failed"}
    by_id = {v.id: v for v in _volumes(ctx)}
    assert by_id["vol-nofile"].status == "deleted"
    assert by_id["vol-complete"].status == "available" and by_id["vol-complete"].lease_owner is None
    assert by_id["vol-garbage"].status == "failed" and "no ext4" in (by_id["vol-garbage"].status_reason or "")
    assert by_id["vol-alive"].status == "creating"
    assert Path(rows["garbage"].location).read_bytes() == b"not a volume at all"  # never formatted over
    assert Path(rows["complete"].location).read_bytes() == FAKE_VOLUME_MAGIC + b"data"
    assert not [c for c in fake_driver.calls if c[0] == "create_volume"]
    # The user whose row was removed gets a new volume with the next CLI VM.
    principal = Principal(users[0].id, users[0].name, False)
    vm, _ = vm_manager.ensure_cli_vm(ctx, principal)
    live = workspaces.user_volume(ctx, users[0].id)
    assert live is not None and live.id != "vol-nofile" and live.attached_vm_id == vm.id


def test_a_maker_whose_lapsed_row_was_removed_removes_the_file_it_made(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = fake_driver.create_volume
    first_location: list[str] = []

    def stalled(location: str, size_bytes: int, owner_uid: int) -> None:
        if not first_location:  # the maker stalls past its lease; the reconciler finds no file
            first_location.append(location)
            with ctx.db.transaction() as session:
                session.execute(update(Volume).values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))
            assert [f.result for f in Reconciler(ctx).run_once().findings
                    if f.kind == "volume_stuck_creating"] == ["removed"]
        original(location, size_bytes, owner_uid)

    monkeypatch.setattr(fake_driver, "create_volume", stalled)
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    live = workspaces.user_volume(ctx, alice.user_id)
    assert live is not None and live.attached_vm_id == vm.id and live.location != first_location[0]
    assert not Path(first_location[0]).exists()  # nothing can use it: removed, not left behind
    assert len([v for v in _volumes(ctx) if v.status == "deleted"]) == 1


def test_a_maker_process_that_is_gone_is_taken_over_before_its_lease_lapses(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    import subprocess
    import sys

    from remotecli.background import leases

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    mine = leases.process_owner("vol")
    dead = mine.rsplit("-", 2)[0] + f"-{int(gone.stdout)}-0123456789"  # a SIGKILLed controller on this host
    assert leases.holder_dead(dead)
    assert not leases.holder_dead(mine)  # this process
    assert not leases.holder_dead(f"vol-{'0' * 8}-{int(gone.stdout)}-0123456789")  # another host: its lease lapses
    assert not leases.holder_dead("vol-0123456789ab") and not leases.holder_dead(None)
    stuck = _stuck_row(ctx, alice.user_id, lease_s=60.0)  # a lease that would hold for another minute
    with ctx.db.transaction() as session:
        session.execute(update(Volume).values(lease_owner=dead))
    started = time.monotonic()
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    assert time.monotonic() - started < 3
    [volume] = _volumes(ctx)
    assert volume.id == stuck.id and volume.attached_vm_id == vm.id
    with ctx.db.read() as session:
        [taken] = list(session.scalars(select(Event).where(Event.kind == "volume.taken_over")))
    assert (taken.details or {})["holder_dead"] is True and "no longer exists" in taken.message


def test_a_maker_alive_is_not_taken_over_early(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    from remotecli.background import leases

    stuck = _stuck_row(ctx, alice.user_id, lease_s=60.0)
    alive = leases.process_owner("vol")  # a live process of this host (this one) holds it
    with ctx.db.transaction() as session:
        session.execute(update(Volume).values(lease_owner=alive))
    [held] = _volumes(ctx)
    assert workspaces._take_over(ctx, held, leases.process_owner("vol"), vm_id=None) is None
    assert workspaces.stuck_creating(ctx) == []  # nor does the reconciler touch it
    [volume] = _volumes(ctx)
    assert volume.id == stuck.id and volume.status == "creating" and volume.lease_owner == alive
