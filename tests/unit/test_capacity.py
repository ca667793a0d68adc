"""Capacity admission (services/capacity.py) on SQLite and PostgreSQL with the fake driver: the
maths, the refusal before anything exists (503 + Retry-After), the last slot under a concurrent
burst, a stopped VM starting again, the warm pool's releasers, a sign-in waiting for room, and
the reads of a VM's state that go through the driver."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from remotecli.app import create_app
from remotecli.background import signins
from remotecli.cli.main import main
from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Event, Vm, Volume
from remotecli.domain.states import VmStatus
from remotecli.drivers.base import HostResources, VmSpec
from remotecli.drivers.fake import FakeDriver
from remotecli.errors import HostAtCapacity, RemotecliError
from remotecli.services import auth_flow, capacity, transitions, vm_manager
from remotecli.services import users as users_service
from remotecli.services.signin_state import WAITING_FOR_CAPACITY
from remotecli.services.users import Principal

#: Reads and displays (not admission) need no second database: SQLite only, to keep CI short.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

TOKENS = {"access_token": "at-PLANTED-capacity", "refresh_token": "rt-PLANTED-capacity", "expires_in": 3600,
          "token_type": "Bearer"}


def _user(ctx: AppContext, name: str) -> Principal:
    user = users_service.create_user(ctx.db, name)
    return Principal(user.id, user.name, False)


@pytest.fixture
def alice(ctx: AppContext) -> Principal:
    return _user(ctx, "alice")


@pytest.fixture
def bob(ctx: AppContext) -> Principal:
    return _user(ctx, "bob")


def _everything(ctx: AppContext, driver: FakeDriver) -> tuple[object, ...]:
    """What a refused creation must not change: rows, volumes, events, host processes, driver calls."""
    with ctx.db.read() as session:
        vms = sorted((v.id, v.status) for v in session.scalars(select(Vm)))
        volumes = int(session.scalar(select(func.count()).select_from(Volume)) or 0)
        events = int(session.scalar(select(func.count()).select_from(Event)) or 0)
    dirs = sorted(p.name for p in ctx.settings.vms_dir.iterdir()) if ctx.settings.vms_dir.is_dir() else []
    return vms, volumes, events, sorted(driver.running_ids()), len(driver.calls), dirs


# ----------------------------------------------------------------------------------------------
# The maths


def test_capacity_is_the_hosts_minus_the_reserve_times_the_overcommit(ctx: AppContext, fake_driver: FakeDriver) -> None:
    fake_driver.resources = HostResources(memory_mib=8192, vcpus=4, source="a test host")
    ctx.settings.host_memory_reserve_mib = 1024
    ctx.settings.host_memory_overcommit = 1.5
    ctx.settings.host_vcpu_overcommit = 2.0
    cap = capacity.host_capacity(ctx)
    assert (cap.memory_mib, cap.vcpus) == ((8192 - 1024) * 1.5, 8) and "a test host" in cap.source
    ctx.settings.host_memory_mib = 3000  # the operator's numbers win over the host's
    ctx.settings.host_vcpus = 3
    ctx.settings.host_memory_overcommit = 1.0
    cap = capacity.host_capacity(ctx)
    assert (cap.memory_mib, cap.vcpus) == (3000, 6)
    assert "host_memory_mib" in cap.source and "host_vcpus" in cap.source
    fake_driver.resources = HostResources(memory_mib=512, vcpus=1, source="tiny")  # reserve above the total
    ctx.settings.host_memory_mib = None
    assert capacity.host_capacity(ctx).memory_mib == 0


def test_usage_counts_vms_whose_hypervisor_may_run(ctx: AppContext, alice: Principal, bob: Principal) -> None:
    ctx.settings.host_memory_mib = 10_000
    ctx.settings.host_vcpus = 100
    empty = capacity.usage(ctx)
    assert (empty.used_memory_mib, empty.used_vcpus, empty.vms, empty.free_memory_mib) == (0, 0, 0, 10_000)
    cli = vm_manager.create_vm(ctx, alice, "cli", vcpus=2, memory_mib=2048)
    browser = vm_manager.create_vm(ctx, alice, "browser", vcpus=1, memory_mib=1000)
    paused = vm_manager.pause_vm(ctx, None, vm_manager.create_vm(ctx, bob, "browser", vcpus=1, memory_mib=500).id)
    now = capacity.usage(ctx)
    assert (now.used_memory_mib, now.used_vcpus, now.vms) == (3548, 4, 3)
    assert now.free_memory_mib == 10_000 - 3548 and now.free_vcpus == 100 * 8 - 4
    assert "3548/10000 MiB used" in now.describe()
    vm_manager.stop_vm(ctx, None, cli.id)  # stopped: no process, nothing held
    vm_manager.destroy_vm(ctx, None, browser.id)
    vm_manager.fail_vm(ctx, paused.id, "test")
    assert capacity.usage(ctx).used_memory_mib == 0


def test_a_vm_on_an_unreachable_member_keeps_its_capacity(ctx: AppContext, alice: Principal) -> None:
    """An ``unknown`` VM (its Incus member cut off) may still run there: its memory stays counted, so a
    replacement is not admitted into room the partitioned VM takes back when the member returns."""
    ctx.settings.host_memory_mib = 10_000
    ctx.settings.host_vcpus = 100
    cli = vm_manager.create_vm(ctx, alice, "cli", vcpus=2, memory_mib=2048)
    with ctx.db.transaction() as session:
        vm = transitions.load_vm(session, cli.id)
        transitions.set_vm_status(session, vm, VmStatus.UNKNOWN, module="test", message="member cut off",
                                  expected=VmStatus.RUNNING)
    assert capacity.usage(ctx).used_memory_mib == 2048


def test_the_last_mib_and_the_last_vcpu_fit_and_one_more_does_not(ctx: AppContext, alice: Principal,
                                                                  bob: Principal) -> None:
    ctx.settings.host_memory_mib = 3000
    ctx.settings.host_vcpus = 4
    ctx.settings.host_vcpu_overcommit = 1.0
    vm_manager.create_vm(ctx, alice, "browser", vcpus=2, memory_mib=1000)
    vm_manager.create_vm(ctx, alice, "browser", vcpus=1, memory_mib=2000)  # exactly the rest of the memory
    with pytest.raises(HostAtCapacity) as memory_full:
        vm_manager.create_vm(ctx, bob, "browser", vcpus=1, memory_mib=128)
    assert memory_full.value.retry_after_s == ctx.settings.host_capacity_retry_after_s
    ctx.settings.host_memory_mib = 100_000
    vm_manager.create_vm(ctx, bob, "browser", vcpus=1, memory_mib=128)  # the last vCPU
    with pytest.raises(HostAtCapacity, match="no room"):
        vm_manager.create_vm(ctx, bob, "browser", vcpus=1, memory_mib=128)


# ----------------------------------------------------------------------------------------------
# Refused before anything exists


@pytest.fixture
def client(ctx: AppContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), raise_server_exceptions=False) as test_client:
        yield test_client


def _token(ctx: AppContext, name: str) -> dict[str, str]:
    user = users_service.create_user(ctx.db, name)
    _, token = users_service.create_token(ctx.db, user)
    return {"Authorization": f"Bearer {token}"}


def test_api_refuses_with_503_retry_after_and_leaves_no_row_home_or_process(
    ctx: AppContext, client: TestClient, fake_driver: FakeDriver
) -> None:
    ctx.settings.host_memory_mib = ctx.settings.cli_vm_memory_mib  # room for one CLI VM
    ctx.settings.host_capacity_retry_after_s = 17
    alice, bob = _token(ctx, "alice"), _token(ctx, "bob")
    first = client.post("/api/v1/vms", json={"vm_type": "cli"}, headers=alice)
    assert first.status_code == 201, first.text
    before = _everything(ctx, fake_driver)
    refused = client.post("/api/v1/vms", json={"vm_type": "cli"}, headers=bob)
    assert refused.status_code == 503 and refused.json()["code"] == "host_at_capacity", refused.text
    assert refused.headers["Retry-After"] == "17"
    assert "try again" in refused.json()["message"] and "MiB" not in refused.json()["message"]
    assert _everything(ctx, fake_driver) == before  # no VM row, no home volume, no process, no event
    # Once the first is destroyed, there is room again.
    assert client.delete(f"/api/v1/vms/{first.json()['id']}", headers=alice).status_code == 200
    assert client.post("/api/v1/vms", json={"vm_type": "cli"}, headers=bob).status_code == 201


def test_concurrent_creations_never_take_more_than_the_last_slot(ctx: AppContext, fake_driver: FakeDriver) -> None:
    """Twelve users create a Browser VM at once into room for three: three are created, nine are
    refused, never four (each user's own limits are far away)."""
    memory = ctx.settings.browser_vm_memory_mib
    ctx.settings.host_memory_mib = 3 * memory + memory // 2
    users = [_user(ctx, f"user{i}") for i in range(12)]
    barrier = threading.Barrier(len(users))
    created: list[str] = []
    refused: dict[str, int] = {}
    lock = threading.Lock()

    def one(principal: Principal) -> None:
        barrier.wait()
        try:
            vm = vm_manager.create_vm(ctx, principal, "browser")
            with lock:
                created.append(vm.id)
        except RemotecliError as exc:
            with lock:
                refused[exc.code] = refused.get(exc.code, 0) + 1

    threads = [threading.Thread(target=one, args=(u,)) for u in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(created) == 3 and refused == {"host_at_capacity": 9}, (created, refused)
    assert capacity.usage(ctx).used_memory_mib == 3 * memory
    with ctx.db.read() as session:
        assert int(session.scalar(select(func.count()).select_from(Vm)) or 0) == 3
    assert len(fake_driver.running_ids()) == 3


def test_a_stopped_vm_must_fit_again_to_start(ctx: AppContext, alice: Principal, bob: Principal) -> None:
    ctx.settings.host_memory_mib = 2048
    cli = vm_manager.create_vm(ctx, alice, "cli", memory_mib=2048)
    vm_manager.stop_vm(ctx, None, cli.id)
    other = vm_manager.create_vm(ctx, bob, "browser", memory_mib=1024)  # the stopped VM holds nothing
    with pytest.raises(HostAtCapacity):
        vm_manager.start_vm(ctx, None, cli.id)
    assert vm_manager.get_vm(ctx, None, cli.id).status == VmStatus.STOPPED.value
    vm_manager.destroy_vm(ctx, None, other.id)
    assert vm_manager.start_vm(ctx, None, cli.id).status == VmStatus.RUNNING.value


def test_registered_releasers_give_way_before_a_refusal(ctx: AppContext, alice: Principal, bob: Principal) -> None:
    """The warm pool registers a releaser: an idle pool VM is destroyed to make room."""
    ctx.settings.host_memory_mib = 2048
    idle = vm_manager.create_vm(ctx, alice, "browser", memory_mib=1536)  # stands for an idle pool VM
    asked: list[int] = []

    def release(c: AppContext, mib: int) -> int:
        asked.append(mib)
        vm_manager.destroy_vm(c, None, idle.id, reason="giving way to a new VM")
        return idle.memory_mib

    unregister = capacity.register_releaser(release)
    try:
        vm = vm_manager.create_vm(ctx, bob, "cli", memory_mib=2048)
    finally:
        unregister()
    assert vm.status == VmStatus.RUNNING.value and asked == [1536]  # what was missing
    assert vm_manager.get_vm(ctx, None, idle.id).status == VmStatus.DESTROYED.value
    with pytest.raises(HostAtCapacity):  # unregistered: nothing gives way any more
        vm_manager.create_vm(ctx, alice, "browser", memory_mib=1536)


# ----------------------------------------------------------------------------------------------
# A sign-in waits for room


@pytest.fixture
def runner(ctx: AppContext, monkeypatch: pytest.MonkeyPatch) -> Iterator[signins.SigninWorker]:
    monkeypatch.setattr(signins, "CAPACITY_POLL_S", 0.05)
    r = signins.SigninWorker(ctx, interval_s=0.05)
    r.start()
    yield r
    r.stop()


def _wait_session(ctx: AppContext, session_id: str, what: str, timeout: float = 20) -> AuthSession:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        auth = auth_flow.get_session(ctx, None, session_id)
        if auth.status == what or (auth.message or "") == what:
            return auth
        time.sleep(0.05)
    raise AssertionError(f"session is {auth.status}: {auth.message}")


def test_signin_waits_for_capacity_then_completes(
    ctx: AppContext, alice: Principal, bob: Principal, fake_driver: FakeDriver, runner: signins.SigninWorker
) -> None:
    s = ctx.settings
    s.host_memory_mib = s.cli_vm_memory_mib + s.browser_vm_memory_mib  # one sign-in's two VMs
    bobs = vm_manager.create_vm(ctx, bob, "cli")
    auth = auth_flow.start_session(ctx, alice, "claude_code")
    waiting = _wait_session(ctx, auth.id, WAITING_FOR_CAPACITY)
    assert waiting.status == "provisioning" and "waiting for capacity" in (waiting.message or "").lower()
    time.sleep(0.5)  # it keeps waiting (and keeps its lease) while there is no room
    assert auth_flow.get_session(ctx, None, auth.id).message == WAITING_FOR_CAPACITY
    vm_manager.destroy_vm(ctx, None, bobs.id)
    ready = _wait_session(ctx, auth.id, "awaiting_user")
    assert ready.browser_vm_id and ready.cli_vm_id
    fake_driver.login_outcome = ("complete", TOKENS)
    _wait_session(ctx, auth.id, "completed")
    kinds = [e.kind for e in auth_flow.session_events(ctx, None, auth.id)]
    assert "auth.waiting_for_capacity" in kinds and "auth.capacity_found" in kinds


def test_signin_waiting_for_capacity_expires_and_leaves_nothing(
    ctx: AppContext, alice: Principal, bob: Principal, runner: signins.SigninWorker
) -> None:
    s = ctx.settings
    s.host_memory_mib = s.cli_vm_memory_mib  # room for Bob's CLI VM only
    vm_manager.create_vm(ctx, bob, "cli")
    s.auth_session_ttl_s = 1.5
    auth = auth_flow.start_session(ctx, alice, "claude_code")
    _wait_session(ctx, auth.id, WAITING_FOR_CAPACITY)
    _wait_session(ctx, auth.id, "expired")
    assert vm_manager.list_vms(ctx, alice, include_ended=False) == []


# ----------------------------------------------------------------------------------------------
# Reads of a VM's state go through the driver (a remote driver answers them from its host)


class _RemoteLikeDriver(FakeDriver):
    """Answers the reads from "elsewhere": never from the VM's directory on this disk."""

    def __init__(self) -> None:
        super().__init__()
        self.gone: set[str] = set()
        self.reads: list[str] = []

    def has_state(self, spec: VmSpec) -> bool:
        self.reads.append(f"has_state {spec.vm_id}")
        return spec.vm_id not in self.gone

    def console_log(self, spec: VmSpec) -> str | None:
        self.reads.append(f"console_log {spec.vm_id}")
        return f"remote console of {spec.vm_id}\n"


@pytest.fixture
def fake_driver() -> FakeDriver:
    return _RemoteLikeDriver()


@SQLITE_ONLY
def test_selection_and_reconciler_ask_the_driver_whether_a_vm_still_exists(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver
) -> None:
    from remotecli.background.reconciler import Reconciler

    driver = fake_driver
    assert isinstance(driver, _RemoteLikeDriver)
    vm = vm_manager.create_vm(ctx, alice, "cli")
    assert vm_manager.prove_alive(ctx, vm) is None and f"has_state {vm.id}" in driver.reads
    vm_manager.stop_vm(ctx, None, vm.id)
    assert Path(vm.directory).is_dir()  # the directory is still on this disk, but the driver says it is gone
    driver.gone.add(vm.id)
    report = Reconciler(ctx).run_once()
    assert any(f.kind == "dead_vm" and f.id == vm.id for f in report.findings)
    assert vm_manager.get_vm(ctx, None, vm.id).status == VmStatus.FAILED.value


@SQLITE_ONLY
def test_vm_show_console_reads_through_the_driver(ctx: AppContext, alice: Principal, fake_driver: FakeDriver,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from remotecli.cli import commands_vm

    vm = vm_manager.create_vm(ctx, alice, "browser")

    class _Ctx:
        def __enter__(self) -> AppContext:
            return ctx

        def __exit__(self, *args: object) -> None:
            return None

    monkeypatch.setattr(commands_vm, "app_context", lambda: _Ctx())
    result = CliRunner().invoke(main, ["vm", "show", vm.id, "--console"])
    assert result.exit_code == 0, result.output
    assert result.output == f"remote console of {vm.id}\n"


# ----------------------------------------------------------------------------------------------
# Capacity used and free: /metrics, the admin page, doctor


@SQLITE_ONLY
def test_capacity_on_metrics_and_the_admin_page(ctx: AppContext, client: TestClient, alice: Principal) -> None:
    ctx.settings.host_memory_mib = 5000
    ctx.settings.host_vcpus = 2
    vm_manager.create_vm(ctx, alice, "browser", vcpus=3, memory_mib=1500)
    metrics = client.get("/metrics").text
    for line in ('remotecli_capacity_memory_mib{state="capacity"} 5000',
                 'remotecli_capacity_memory_mib{state="used"} 1500',
                 'remotecli_capacity_memory_mib{state="free"} 3500',
                 'remotecli_capacity_vcpus{state="capacity"} 16',
                 'remotecli_capacity_vcpus{state="used"} 3',
                 'remotecli_capacity_vcpus{state="free"} 13'):
        assert line in metrics.splitlines(), line
    root = users_service.create_user(ctx.db, "root", is_admin=True)
    users_service.set_password(ctx.db, root.name, "correct horse battery")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
    assert csrf
    client.post("/login", data={"username": "root", "password": "correct horse battery",
                                "csrf_token": csrf.group(1), "next": "/admin"}, follow_redirects=False)
    page = client.get("/admin").text
    assert "Host capacity" in page and "5000 MiB" in page and "1500 MiB" in page and "3500 MiB" in page


@SQLITE_ONLY
def test_doctor_says_capacity_used_and_free(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTECLI_DATA_DIR", str(tmp_path / "doctor"))
    monkeypatch.setenv("REMOTECLI_DATABASE_URL", db_url)
    monkeypatch.setenv("REMOTECLI_DRIVER", "fake")
    monkeypatch.setenv("REMOTECLI_HOST_MEMORY_MIB", "4096")
    result = CliRunner().invoke(main, ["doctor", "--json"], catch_exceptions=False)
    check = next(c for c in json.loads(result.output) if c["check"] == "capacity")
    assert check["ok"] and "0/4096 MiB used (4096 free)" in check["detail"] and "host_memory_mib" in check["detail"]
    monkeypatch.setenv("REMOTECLI_HOST_MEMORY_MIB", "100")  # not even one VM fits
    result = CliRunner().invoke(main, ["doctor", "--json"], catch_exceptions=False)
    check = next(c for c in json.loads(result.output) if c["check"] == "capacity")
    assert not check["ok"] and "not even one" in check["detail"] and result.exit_code == 1
