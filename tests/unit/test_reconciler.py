"""Reconciler and garbage collector on both databases with the fake driver: every drift converges.

Each test makes one kind of drift between the database and "the host" (the fake driver plus real
directories), runs one pass, and checks that the right rows are ``failed``, orphans are gone, and
the next ``ensure_cli_vm`` or sign-in simply works.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select, update

from remotecli.app import create_app
from remotecli.background import signins
from remotecli.background.gc import GarbageCollector
from remotecli.background.reconciler import Reconciler
from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Event, HostOrphan, Vm, WsTicket, utcnow
from remotecli.drivers.fake import FakeDriver
from remotecli.services import auth_flow, credentials, tickets, vm_manager
from remotecli.services import users as users_service
from remotecli.services.users import Principal

TOKENS = {"access_token": "at-PLANTED-reconcile-0123456789", "refresh_token": "rt-PLANTED-reconcile-0123456789",
          "expires_in": 3600, "scope": "openid email offline_access", "token_type": "Bearer"}


@pytest.fixture
def alice(ctx: AppContext) -> Principal:
    user = users_service.create_user(ctx.db, "alice")
    return Principal(user.id, user.name, False)


@pytest.fixture
def rec(ctx: AppContext) -> Reconciler:
    return Reconciler(ctx, orphan_grace_s=0.0)


def _status(ctx: AppContext, vm_id: str) -> str | None:
    with ctx.db.read() as session:
        return session.scalar(select(Vm.status).where(Vm.id == vm_id))


def _row(ctx: AppContext, vm_id: str) -> Vm:
    with ctx.db.read() as session:
        vm = session.get(Vm, vm_id)
    assert vm is not None
    return vm


def _age(ctx: AppContext, vm_id: str, seconds: float) -> None:
    """Pretend the VM entered its status ``seconds`` ago."""
    with ctx.db.transaction() as session:
        session.execute(update(Vm).where(Vm.id == vm_id).values(
            status_changed_at=utcnow() - dt.timedelta(seconds=seconds),
            created_at=utcnow() - dt.timedelta(seconds=seconds)))


def _host_dirs(ctx: AppContext) -> set[str]:
    vms_dir = ctx.settings.vms_dir
    return {p.name for p in vms_dir.iterdir()} if vms_dir.is_dir() else set()


def test_killed_process_fails_the_row_then_gc_removes_it_and_ensure_creates_a_new_one(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, rec: Reconciler,
) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    fake_driver.kill(vm.id)
    report = rec.run_once()
    assert [(f.kind, f.result) for f in report.findings] == [("dead_vm", "done")]
    row = _row(ctx, vm.id)
    assert row.status == "failed" and "process exited" in (row.status_reason or "")
    assert vm.id in _host_dirs(ctx)  # a failed row still owns its directory (post-mortem) until GC
    assert rec.run_once().findings == []  # not an orphan, nothing to do
    # GC after the TTL: failed → destroying → destroyed, directory gone, events kept.
    assert GarbageCollector(ctx, failed_ttl_s=3600).run_once().findings == []
    _age(ctx, vm.id, 3601)
    gc_report = GarbageCollector(ctx).run_once()
    assert [(f.kind, f.result) for f in gc_report.findings] == [("failed_vm", "done")]
    assert _status(ctx, vm.id) == "destroyed" and vm.id not in _host_dirs(ctx)
    new_vm, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and new_vm.id != vm.id and new_vm.status == "running"


def test_deleted_directory_fails_the_row_and_stops_the_process(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, rec: Reconciler,
) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    shutil.rmtree(ctx.settings.vms_dir / vm.id)  # the seed's case
    rec.run_once()
    row = _row(ctx, vm.id)
    assert row.status == "failed" and "directory missing" in (row.status_reason or "")
    assert vm.id not in fake_driver.running_ids()  # no process left burning memory
    new_vm, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and new_vm.id != vm.id


def test_a_single_unknown_is_not_enough_two_in_a_row_fail(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, rec: Reconciler,
) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    fake_driver.lose_control_socket(vm.id)
    report = rec.run_once()
    assert [(f.kind, f.result) for f in report.findings] == [("unknown_vm", "waiting")]
    assert _row(ctx, vm.id).status == "running" and _row(ctx, vm.id).unknown_strikes == 1
    fake_driver.lose_control_socket(vm.id, False)  # it answers again: strikes reset
    rec.run_once()
    assert _row(ctx, vm.id).unknown_strikes == 0
    fake_driver.lose_control_socket(vm.id)
    rec.run_once()
    assert _row(ctx, vm.id).status == "running"
    rec.run_once()
    row = _row(ctx, vm.id)
    assert row.status == "failed" and "2 passes in a row" in (row.status_reason or "")
    assert vm.id not in fake_driver.running_ids()


def test_deleted_row_leaves_an_orphan_removed_after_the_grace_period(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver,
) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    with ctx.db.transaction() as session:
        session.execute(delete(Vm).where(Vm.id == vm.id))
    patient = Reconciler(ctx, orphan_grace_s=60)
    report = patient.run_once()
    assert [(f.kind, f.result) for f in report.findings] == [("orphan", "waiting")]
    assert vm.id in fake_driver.running_ids() and vm.id in _host_dirs(ctx)
    with ctx.db.read() as session:
        first_seen = session.scalar(select(HostOrphan.first_seen_at).where(HostOrphan.vm_id == vm.id))
    assert first_seen is not None
    # A second controller sees the same first sighting (shared table), so the grace is not restarted.
    with ctx.db.transaction() as session:
        session.execute(update(HostOrphan).values(first_seen_at=utcnow() - dt.timedelta(seconds=61)))
    report = Reconciler(ctx, orphan_grace_s=60).run_once()
    assert [(f.kind, f.result) for f in report.findings] == [("orphan", "done")]
    assert vm.id not in fake_driver.running_ids() and vm.id not in _host_dirs(ctx)
    with ctx.db.read() as session:
        assert session.scalar(select(HostOrphan).where(HostOrphan.vm_id == vm.id)) is None
        kinds = [e.kind for e in session.scalars(select(Event).where(Event.vm_id == vm.id))]
    assert "reconcile.orphan_removed" in kinds
    new_vm, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and new_vm.id != vm.id


def test_stray_directory_without_process_is_an_orphan(ctx: AppContext, rec: Reconciler) -> None:
    stray = ctx.settings.vms_dir / "vm-00000000-stray"
    stray.mkdir(parents=True)
    (stray / "console.log").write_text("left over\n")
    rec.run_once()
    assert not stray.exists()


def test_controller_killed_mid_create_leaves_wedged_rows_that_fail(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, rec: Reconciler,
) -> None:
    bob = users_service.create_user(ctx.db, "bob")
    # alice: killed between the INSERT and the boot (row 'creating', nothing on the host).
    # bob: killed while waiting for the guest agent (row 'starting', a process and a directory).
    vm_a, _ = vm_manager.ensure_cli_vm(ctx, alice)
    vm_b, _ = vm_manager.ensure_cli_vm(ctx, Principal(bob.id, bob.name, False))
    with ctx.db.transaction() as session:
        session.execute(update(Vm).where(Vm.id == vm_a.id).values(status="creating"))
        session.execute(update(Vm).where(Vm.id == vm_b.id).values(status="starting"))
    fake_driver.destroy(vm_manager.spec_of(ctx, _row(ctx, vm_a.id)))
    assert rec.run_once().findings == []  # young: someone may still be booting them
    _age(ctx, vm_a.id, ctx.settings.reconciler_wedged_after_s + 1)
    _age(ctx, vm_b.id, ctx.settings.reconciler_wedged_after_s + 1)
    report = rec.run_once()
    assert sorted((f.kind, f.result) for f in report.findings) == [("wedged_vm", "done")] * 2
    assert _status(ctx, vm_a.id) == "failed" and _status(ctx, vm_b.id) == "failed"
    assert "wedged in starting" in (_row(ctx, vm_b.id).status_reason or "")
    assert vm_b.id not in fake_driver.running_ids()
    new_vm, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and new_vm.status == "running"


def test_destroying_is_retried_before_being_called_wedged(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, rec: Reconciler,
) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    with ctx.db.transaction() as session:
        session.execute(update(Vm).where(Vm.id == vm.id).values(status="destroying"))
    _age(ctx, vm.id, ctx.settings.reconciler_destroy_retry_after_s + 1)
    report = rec.run_once()
    assert [(f.kind, f.result) for f in report.findings] == [("destroy_retry", "done")]
    assert _status(ctx, vm.id) == "destroyed"
    assert vm.id not in fake_driver.running_ids() and vm.id not in _host_dirs(ctx)


def test_stopped_vm_without_directory_fails(ctx: AppContext, alice: Principal, rec: Reconciler) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    vm_manager.stop_vm(ctx, None, vm.id)
    assert rec.run_once().findings == []
    shutil.rmtree(ctx.settings.vms_dir / vm.id)
    rec.run_once()
    assert _status(ctx, vm.id) == "failed"


def test_dry_run_changes_nothing(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    fake_driver.kill(vm.id)
    (ctx.settings.vms_dir / "vm-orphan-dry").mkdir()
    report = Reconciler(ctx, orphan_grace_s=0).run_once(dry_run=True)
    assert sorted(f.kind for f in report.findings) == ["dead_vm", "orphan"]
    assert all(f.result == "planned" for f in report.findings)
    assert _status(ctx, vm.id) == "running" and (ctx.settings.vms_dir / "vm-orphan-dry").is_dir()


def test_expired_sessions_end_and_their_browser_vms_go(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, rec: Reconciler,
) -> None:
    browser = vm_manager.create_vm(ctx, alice, "browser")
    auth = auth_flow.start_session(ctx, alice, "claude_code")
    with ctx.db.transaction() as session:
        session.execute(update(AuthSession).where(AuthSession.id == auth.id).values(
            status="awaiting_user", browser_vm_id=browser.id, expires_at=utcnow() - dt.timedelta(seconds=1)))
    rec.run_once()
    assert auth_flow.get_session(ctx, None, auth.id).status == "expired"
    assert _status(ctx, browser.id) == "destroyed" and browser.id not in fake_driver.running_ids()
    # A Browser VM no session references (controller killed between its boot and the session
    # update) goes once it is clearly abandoned.
    lost = vm_manager.create_vm(ctx, alice, "browser")
    rec.run_once()
    assert _status(ctx, lost.id) == "running"
    _age(ctx, lost.id, 2 * ctx.settings.vm_boot_timeout_s + ctx.settings.reconciler_orphan_grace_s + 1)
    rec.run_once()
    assert _status(ctx, lost.id) == "destroyed"


def test_session_with_a_held_credential_and_a_dead_workers_lease_is_delivered(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, rec: Reconciler,
) -> None:
    """Controller killed mid-transfer: the lease lapses, another runner delivers the held credential."""
    cli_vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    fake_driver.kill(cli_vm.id)  # and the CLI VM died with it
    auth = auth_flow.start_session(ctx, alice, "claude_code")
    sealed = ctx.box.encrypt(json.dumps(TOKENS).encode(), credentials.credential_aad(auth.id))
    with ctx.db.transaction() as session:
        session.execute(update(AuthSession).where(AuthSession.id == auth.id).values(
            status="transferring", credential_enc=sealed, cli_vm_id=cli_vm.id,
            lease_owner="ctl-dead", lease_expires_at=utcnow() - dt.timedelta(seconds=1),
            expires_at=utcnow() - dt.timedelta(seconds=5)))  # past expiry: a held credential still goes
    rec.run_once()
    assert auth_flow.get_session(ctx, None, auth.id).status == "transferring"
    assert _status(ctx, cli_vm.id) == "failed"
    runner = signins.SigninWorker(ctx, interval_s=0.05)
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while auth_flow.get_session(ctx, None, auth.id).status != "completed":
            assert time.monotonic() < deadline, auth_flow.get_session(ctx, None, auth.id).status
            time.sleep(0.05)
    finally:
        runner.stop()
    done = auth_flow.get_session(ctx, None, auth.id)
    assert done.credential_enc is None and done.cli_vm_id != cli_vm.id
    assert any(path.endswith(".credentials.json") for path in fake_driver._vms[done.cli_vm_id or ""].files)


def test_gc_deletes_old_destroyed_rows_keeps_events_and_purges_tickets(
    ctx: AppContext, alice: Principal,
) -> None:
    vm = vm_manager.create_vm(ctx, alice, "browser")
    vm_manager.destroy_vm(ctx, None, vm.id)
    tickets.issue_ticket(ctx, alice, "vnc", "s-1")
    with ctx.db.transaction() as session:
        session.execute(update(WsTicket).values(expires_at=utcnow() - dt.timedelta(hours=1)))
    gc = GarbageCollector(ctx)
    assert [f.kind for f in gc.run_once().findings] == ["tickets"]
    _age(ctx, vm.id, ctx.settings.gc_destroyed_retention_s + 1)  # type: ignore[operator]
    report = gc.run_once()
    assert [(f.kind, f.result) for f in report.findings] == [("destroyed_row", "done")]
    with ctx.db.read() as session:
        assert session.get(Vm, vm.id) is None
        assert session.scalar(select(Event.id).where(Event.vm_id == vm.id).limit(1)) is not None
        assert session.scalar(select(WsTicket.id).limit(1)) is None


def test_app_starts_the_loops_and_serves_metrics(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    fake_driver.kill(vm.id)
    with TestClient(create_app(ctx, background=True)) as client:
        deadline = time.monotonic() + 10
        while _status(ctx, vm.id) != "failed":  # the start-up pass finds it
            assert time.monotonic() < deadline
            time.sleep(0.05)
        text = client.get("/metrics").text
    assert 'remotecli_vms{status="failed",type="cli"} 1' in text
    assert "remotecli_loop_pass_seconds_count{loop=\"reconciler\"}" in text
    assert 'remotecli_vm_failures_total{reason="process_exited"}' in text
    assert "# TYPE remotecli_reconciler_orphans_removed_total counter" in text


def test_metrics_need_a_token_off_loopback(ctx: AppContext, tmp_path: Path) -> None:
    app = create_app(ctx, background=False)
    with TestClient(app, client=("203.0.113.5", 5000)) as client:
        assert client.get("/metrics").status_code == 401
        ctx.settings.metrics_token = "scrape-me-please"
        assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me-please"}).status_code == 200
        admin = users_service.create_user(ctx.db, "root", is_admin=True)
        _token_row, token = users_service.create_token(ctx.db, admin, name="t")
        assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200


@pytest.fixture
def cli(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    from click.testing import CliRunner

    from remotecli.cli.main import main

    monkeypatch.setenv("REMOTECLI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("REMOTECLI_DATABASE_URL", db_url)
    monkeypatch.setenv("REMOTECLI_DRIVER", "fake")

    def invoke(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == code, (args, result.output)
        return result.output

    yield invoke


def test_cli_gc_and_doctor_drift(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cli("doctor")  # creates the data directory; no drift yet
    orphan = tmp_path / "data" / "vms" / "vm-left-behind"
    orphan.mkdir(parents=True)
    checks = {c["check"]: c for c in json.loads(cli("doctor", "--json", code=1))}
    assert not checks["drift"]["ok"] and "1 orphan" in checks["drift"]["detail"]
    planned = json.loads(cli("gc", "--dry-run", "--json"))
    assert [(p["kind"], p["id"], p["result"]) for p in planned] == [("orphan", "vm-left-behind", "planned")]
    assert orphan.is_dir()
    table = cli("gc")  # within the grace period: waits
    assert "orphan" in table and "waiting" in table and orphan.is_dir()
    assert "done" in cli("gc", "--now")
    assert not orphan.exists()
    assert json.loads(cli("doctor", "--json"))[-1] == {"check": "drift", "ok": True,
                                                        "detail": "database and host agree"}


def test_gc_of_a_failed_cli_vm_whose_user_already_has_a_replacement(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, rec: Reconciler,
) -> None:
    """failed → destroying → destroyed while the user's new CLI VM runs (migration 0004: 'destroying'
    is not live for the one-live-CLI-VM index)."""
    old, _ = vm_manager.ensure_cli_vm(ctx, alice)
    fake_driver.kill(old.id)
    rec.run_once()
    new, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created
    report = GarbageCollector(ctx, failed_ttl_s=0).run_once()
    assert [(f.kind, f.result) for f in report.findings] == [("failed_vm", "done")] and report.errors == 0
    assert old.id not in _host_dirs(ctx) and old.id not in fake_driver._vms
    assert _status(ctx, old.id) == "destroyed"
    with ctx.db.read() as session:
        statuses = [e.to_status for e in session.scalars(select(Event).where(Event.vm_id == old.id))]
    assert statuses[-3:] == ["failed", "destroying", "destroyed"]
    assert _status(ctx, new.id) == "running"
