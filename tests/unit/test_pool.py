"""The warm pool (services/pool.py, background/pool.py) on SQLite and PostgreSQL with the fake driver.

The claim race is run for real on both databases (threads claiming at once); ten sign-ins at once
with a pool of 2 run the real sign-in worker on fake VMs (the warm path with real QEMU guests is
tests/integration/test_pool.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from remotecli.background import signins
from remotecli.background.pool import PoolKeeper
from remotecli.background.reconciler import Reconciler
from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Event, Vm
from remotecli.domain.states import VM_ENDING, VmStatus
from remotecli.drivers.fake import FakeDriver
from remotecli.services import auth_flow, capacity, dashboard, pool, vm_manager
from remotecli.services import users as users_service
from remotecli.services.signin_state import BROWSER_READY, BROWSER_RESTARTING
from remotecli.services.users import Principal
from remotecli.web import views


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url, driver="fake", vm_boot_timeout_s=10,
                    browser_pool_size=2, reconciler_orphan_grace_s=0)


def _user(ctx: AppContext, name: str) -> Principal:
    user = users_service.create_user(ctx.db, name)
    return Principal(user.id, user.name, False)


def _pool_vms(ctx: AppContext, *, live: bool = True) -> list[Vm]:
    with ctx.db.read() as session:
        query = select(Vm).where(Vm.pool.is_(True))
        if live:
            query = query.where(Vm.status.not_in([s.value for s in VM_ENDING]))
        return list(session.scalars(query))


def _idle(ctx: AppContext) -> list[Vm]:
    return [vm for vm in _pool_vms(ctx) if vm.user_id is None]


def wait_for(ctx: AppContext, session_id: str, predicate: Callable[[AuthSession], bool],
             timeout: float = 20) -> AuthSession:
    deadline = time.monotonic() + timeout
    while True:
        auth = auth_flow.get_session(ctx, None, session_id)
        if predicate(auth):
            return auth
        if time.monotonic() > deadline:
            raise AssertionError(f"session stuck in {auth.status}: {auth.message}")
        time.sleep(0.05)


@pytest.fixture
def runner(ctx: AppContext) -> Iterator[signins.SigninWorker]:
    r = signins.SigninWorker(ctx, interval_s=0.05)
    r.start()
    yield r
    r.stop()


def test_refill_boots_warm_vms_that_belong_to_nobody(ctx: AppContext, fake_driver: FakeDriver) -> None:
    assert pool.refill(ctx) == 2
    vms = _idle(ctx)
    assert len(vms) == 2
    assert all(vm.status == VmStatus.RUNNING.value and vm.pool_ready_at is not None for vm in vms)
    assert fake_driver.warm_browsers == {vm.id for vm in vms}  # Chromium up on a blank page in each
    assert pool.refill(ctx) == 0  # full: nothing more
    assert pool.pool_counts(ctx) == {"ready": 2, "booting": 0, "claimed": 0}


def test_claim_race_never_gives_one_vm_twice(ctx: AppContext) -> None:
    """Ten claims at once against two ready VMs: two win, each a different VM; eight get None."""
    pool.refill(ctx)
    users = [_user(ctx, f"u{i}") for i in range(10)]
    barrier = threading.Barrier(len(users))
    got: dict[str, str | None] = {}

    def claim(principal: Principal) -> None:
        barrier.wait()
        vm = pool.claim(ctx, principal.user_id)
        got[principal.user_id] = vm.id if vm else None

    threads = [threading.Thread(target=claim, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    won = [vm_id for vm_id in got.values() if vm_id is not None]
    assert len(got) == 10 and len(won) == 2 and len(set(won)) == 2
    owners = {vm.id: vm.user_id for vm in _pool_vms(ctx)}
    for user_id, vm_id in got.items():
        if vm_id is not None:
            assert owners[vm_id] == user_id  # the row says who won
    with ctx.db.read() as session:
        claims = list(session.scalars(select(Event).where(Event.kind == "vm.claimed")))
    assert sorted(e.vm_id or "" for e in claims) == sorted(won)


def test_claim_skips_vms_not_ready_and_fails_dead_ones(ctx: AppContext, fake_driver: FakeDriver) -> None:
    alice = _user(ctx, "alice")
    pool.refill(ctx)
    first, second = sorted(_idle(ctx), key=lambda vm: vm.pool_ready_at or vm.created_at)
    fake_driver.kill(first.id)  # dead, and the reconciler has not seen it yet
    vm = pool.claim(ctx, alice.user_id)
    assert vm is not None and vm.id == second.id  # the dead one failed its proof, the next one served
    assert vm_manager.get_vm(ctx, None, first.id).status == VmStatus.FAILED.value
    assert pool.claim(ctx, alice.user_id) is None  # empty now: the caller boots as without a pool


def test_ten_signins_at_once_with_a_pool_of_two(
    ctx: AppContext, fake_driver: FakeDriver, runner: signins.SigninWorker,
) -> None:
    pool.refill(ctx)
    warm_ids = {vm.id for vm in _idle(ctx)}
    users = [_user(ctx, f"user{i}") for i in range(10)]
    sessions = [auth_flow.start_session(ctx, u, "claude_code").id for u in users]
    done = [wait_for(ctx, sid, lambda a: a.status == "awaiting_user") for sid in sessions]
    browser_ids = [a.browser_vm_id for a in done]
    assert all(browser_ids) and len(set(browser_ids)) == 10  # no VM serves two sessions
    served_warm = [a for a in done if a.browser_vm_id in warm_ids]
    assert len(served_warm) == 2  # the two warm ones; the other eight booted
    for auth in done:
        vm = vm_manager.get_vm(ctx, None, auth.browser_vm_id or "")
        assert vm.user_id == auth.user_id and vm.pool is (auth.browser_vm_id in warm_ids)
    for sid, user in zip(sessions, users, strict=True):
        auth_flow.cancel_session(ctx, user, sid)
    for sid in sessions:
        wait_for(ctx, sid, lambda a: a.status == "cancelled")
    # Every Browser VM is gone (a claimed pool VM is never reused), nothing is left on the "host".
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(vm_manager.get_vm(ctx, None, b or "").status == VmStatus.DESTROYED.value for b in browser_ids):
            break
        time.sleep(0.05)
    assert all(vm_manager.get_vm(ctx, None, b or "").status == VmStatus.DESTROYED.value for b in browser_ids)
    assert not set(browser_ids) & set(fake_driver._vms)
    # The pool refills to two fresh VMs.
    assert pool.refill(ctx) == 2
    assert not {vm.id for vm in _idle(ctx)} & warm_ids


def test_signin_page_says_ready_at_once_with_a_warm_vm(
    ctx: AppContext, runner: signins.SigninWorker,
) -> None:
    alice = _user(ctx, "alice")
    vm_manager.ensure_cli_vm(ctx, alice)
    pool.refill(ctx)
    auth = auth_flow.start_session(ctx, alice, "claude_code")
    wait_for(ctx, auth.id, lambda a: a.status == "awaiting_user")
    events = [e.message for e in auth_flow.session_events(ctx, None, auth.id)]
    assert "Secure browser ready (a warm one from the pool)" in events
    with ctx.db.read() as session:
        messages = [e.details for e in session.scalars(select(Event).where(Event.session_id == auth.id))]
    assert messages  # the timeline holds the claim
    assert BROWSER_READY.startswith("Secure browser ready")
    state = dashboard.sign_in_state(ctx, alice, auth.id)
    assert state.browser_ready
    assert views.auth_steps(state.session.status, cli_ready=state.cli_ready,
                            browser_ready=state.browser_ready)[1].state == "done"


def test_idle_pool_vm_killed_is_replaced_after_one_reconciler_pass(
    ctx: AppContext, fake_driver: FakeDriver,
) -> None:
    pool.refill(ctx)
    victim = _idle(ctx)[0]
    fake_driver.kill(victim.id)
    Reconciler(ctx, orphan_grace_s=0).run_once()
    assert vm_manager.get_vm(ctx, None, victim.id).status == VmStatus.FAILED.value
    keeper = PoolKeeper(ctx)
    assert keeper.run_once() == 1  # the pool's next pass replaces it
    idle = _idle(ctx)
    assert len(idle) == 2 and victim.id not in {vm.id for vm in idle}


def test_claimed_vm_killed_during_login_gets_words_and_another_vm(
    ctx: AppContext, fake_driver: FakeDriver, runner: signins.SigninWorker,
) -> None:
    alice = _user(ctx, "alice")
    pool.refill(ctx)
    auth = auth_flow.start_session(ctx, alice, "claude_code")
    auth = wait_for(ctx, auth.id, lambda a: a.status == "awaiting_user")
    first = auth.browser_vm_id
    assert first in {vm.id for vm in _pool_vms(ctx)}
    fake_driver.kill(first or "")
    auth = wait_for(ctx, auth.id, lambda a: a.browser_vm_id not in (None, first) and a.oauth_flow_id is not None)
    assert auth.status == "awaiting_user"
    assert auth.message is not None and "new secure browser" in auth.message
    kinds = [(e.kind, e.message) for e in auth_flow.session_events(ctx, None, auth.id)]
    assert ("auth.browser_restarted", BROWSER_RESTARTING) in kinds
    assert vm_manager.get_vm(ctx, None, first or "").status in (VmStatus.FAILED.value, VmStatus.DESTROYED.value)


def test_release_for_capacity_gives_up_idle_vms_only(ctx: AppContext) -> None:
    alice = _user(ctx, "alice")
    pool.refill(ctx)
    claimed = pool.claim(ctx, alice.user_id)
    assert claimed is not None
    pool.refill(ctx)  # two idle again, one claimed
    idle = _idle(ctx)
    freed = pool.release_for_capacity(ctx, 1)
    assert freed == idle[0].memory_mib  # one VM was enough
    assert len(_idle(ctx)) == 1
    assert pool.release_for_capacity(ctx, 10**6) == idle[0].memory_mib
    assert _idle(ctx) == []
    assert vm_manager.get_vm(ctx, None, claimed.id).status == VmStatus.RUNNING.value  # never a claimed one


def test_keeper_registers_its_releaser_with_capacity(ctx: AppContext) -> None:
    # The releasers are process-wide: a controller an earlier test in this process left running
    # would have registered the pool's releaser too, so this test sets them aside while it runs.
    with capacity._releasers_lock:
        others = list(capacity._releasers)
        capacity._releasers.clear()
    try:
        pool.refill(ctx)
        keeper = PoolKeeper(ctx, interval_s=3600)
        keeper.start()
        try:
            assert capacity.make_room(ctx, 1) > 0  # the capacity side reaches the pool only this way
        finally:
            keeper.stop()
        assert capacity.make_room(ctx, 1) == 0  # unregistered on stop
    finally:
        with capacity._releasers_lock:
            capacity._releasers.extend(others)


def test_pool_vms_of_an_older_image_are_retired(ctx: AppContext) -> None:
    pool.refill(ctx)
    with ctx.db.transaction() as session:
        for vm in session.scalars(select(Vm).where(Vm.pool.is_(True))):
            vm.image_hash = "old"
    pool.refill(ctx)  # the fake driver has no images: nothing is "older"
    assert len(_idle(ctx)) == 2


def test_metrics_count_pool_vms(ctx: AppContext) -> None:
    from remotecli.api.routes.metrics import render

    alice = _user(ctx, "alice")
    pool.refill(ctx)
    assert pool.claim(ctx, alice.user_id) is not None
    text = render(ctx)
    assert 'remotecli_browser_pool_vms{state="ready"} 1' in text
    assert 'remotecli_browser_pool_vms{state="claimed"} 1' in text
    assert "remotecli_browser_pool_size 2" in text
    assert 'remotecli_vms{status="running",type="browser"} 2' in text  # and with every VM


def test_admin_page_and_vm_detail_show_pool_vms_as_pool(ctx: AppContext) -> None:
    from fastapi.testclient import TestClient

    from remotecli.app import create_app

    users_service.create_user(ctx.db, "root", is_admin=True)
    users_service.set_password(ctx.db, "root", "correct horse battery")
    alice = _user(ctx, "alice")
    pool.refill(ctx)
    idle = _idle(ctx)[0]
    with TestClient(create_app(ctx, background=False), raise_server_exceptions=False) as client:
        page = client.get("/login")
        token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
        client.post("/login", data={"username": "root", "password": "correct horse battery", "csrf_token": token,
                                    "next": "/admin"}, follow_redirects=False)
        admin = client.get("/admin").text
        assert idle.id[:11] in admin and 'data-label="User">pool</td>' in admin
        assert client.get(f"/admin/vms/{idle.id}").status_code == 200
    # A user sees no pool VM, not even by id; the API shows its owner as null to admins only.
    assert idle.id not in {vm.id for vm in vm_manager.list_vms(ctx, alice)}
    with pytest.raises(vm_manager.VmNotFound):
        vm_manager.get_vm(ctx, alice, idle.id)


def test_refill_waits_while_a_signin_is_starting(ctx: AppContext) -> None:
    alice = _user(ctx, "alice")
    auth = auth_flow.start_session(ctx, alice, "claude_code")  # pending: on its way to the login page
    assert pool.refill(ctx) == 0 and _pool_vms(ctx) == []
    auth_flow.cancel_session(ctx, alice, auth.id)
    assert pool.refill(ctx) == 2


class _SnapshotDriver(FakeDriver):
    """A fake driver that says it can restore and counts snapshot builds (one fails, if asked)."""

    capabilities = FakeDriver.capabilities.__class__(pause=True, snapshot=True, restart=True, guest_image=False)

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.prepared: list[str] = []

    def prepare_snapshot(self, vm_type: str) -> None:
        self.prepared.append(vm_type)
        if self.fail:
            raise RuntimeError("template boot failed")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_pools_loop_keeps_the_browser_snapshot_and_backs_off_after_a_failure(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    settings.browser_pool_size = 0  # no pool VM: the snapshot is still kept for the cold path
    settings.browser_snapshot = True
    driver = _SnapshotDriver()
    ctx = AppContext.create(settings, driver=driver)
    try:
        keeper = PoolKeeper(ctx)
        keeper.run_once()
        keeper.run_once()
        assert driver.prepared == ["browser", "browser"]  # each pass checks (it returns at once while it fits)
        settings.browser_snapshot = False
        keeper.run_once()
        assert len(driver.prepared) == 2
        settings.browser_snapshot = True
        driver.fail = True
        keeper.run_once()  # fails: logged, and not tried again on the next passes
        keeper.run_once()
        keeper.run_once()
        assert len(driver.prepared) == 3
        assert any("browser snapshot could not be built" in r.getMessage() for r in caplog.records)
    finally:
        ctx.close()
