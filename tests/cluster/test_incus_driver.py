"""The Incus driver on a real 3-member Incus cluster (tests/support/incus_cluster.py).

The controller side of these tests (the driver's httpx client over mutual TLS, the agent client
over TLS, the reconciler) runs in threads that have entered the controller's network namespace
(``rcic-ctl``): the root namespace cannot reach the test network (its guard route), and nothing
here leaves 10.231.0.0/24. The database is a SQLite file in the test's data directory.

What runs, in one module (one controller, VMs shared between tests to stay in the CI budget):

* the real ``cli`` guest booted through Incus (a container per VM on a member, QEMU under TCG
  inside it, its home an Incus custom volume) and reached by the agent client over TLS with the
  VM's pinned certificate; plain HTTP and a wrong pin are refused; the member is recorded;
* QEMU killed inside the container: the container stops, Incus says so, a reconciler pass fails
  the VM, the next ensure replaces it;
* the member's link cut: the VM is ``unknown`` (not failed) and no second CLI VM exists during the
  grace; after the grace it is failed and replaced; when the link is back, the old instance is
  stopped (fenced) before its home is detached;
* ``incusd`` SIGKILLed on the VM's member: the guest keeps running and answering; after incusd
  restarts the driver sees the same instance (nothing lost).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from remotecli import images
from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.domain.states import VmStatus
from remotecli.drivers.base import ImageRef, Liveness
from remotecli.drivers.incus.driver import IncusDriver
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal

ic = pytest.importorskip("tests.support.incus_cluster")

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
TEST_DATA_DIR = ic.TEST_DATA_DIR
LOADER = "/host/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path /host/usr/lib/x86_64-linux-gnu"
GRACE_S = 25.0
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def in_ctl(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` in a thread inside the controller's network namespace (threads it starts stay there)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ic.CTL_NS}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns into the controller netns failed")
            finally:
                os.close(fd)
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller
            out["error"] = exc

    thread = threading.Thread(target=run, name="ctl")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


def publish_images(image: ImageRef) -> None:
    """Check that every member sees the guest image files at /host/images (the harness bind-mounts
    the test data dir's images directory there, read-only; no copy, no link)."""
    for member in ic.MEMBERS:
        for path in (image.kernel, image.initrd, image.rootfs):
            rel = path.resolve().relative_to(ic.IMAGES_DIR.resolve())
            if not ic.member_path(member, f"{ic.MEMBER_IMAGES_DIR}/{rel}").exists():
                pytest.fail(f"{member} does not see {rel} at {ic.MEMBER_IMAGES_DIR} (a cluster set up "
                            "before the images mount, or another data dir): scripts/incus-cluster.sh down")


def cluster_settings(data_dir: Path, config: Any, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir, "database_url": f"sqlite:///{data_dir / 'remotecli.db'}",
        "shared_images_dir": TEST_DATA_DIR / "images", "driver": "incus",
        # Every member's address: the driver goes on through another when one is cut off.
        "incus_url": ",".join(f"https://{ic.MEMBER_ADDRESS[m]}:{ic.HTTPS_PORT}" for m in ic.MEMBERS),
        "incus_project": config.project, "incus_client_cert": config.cert,
        "incus_client_key": config.key, "incus_server_cert": config.server_cert,
        "incus_runner_image": ic.IMAGE_ALIAS, "incus_member_images_dir": ic.MEMBER_IMAGES_DIR,
        "incus_runner_disks": "/host/usr=/host/usr", "incus_runner_usr": "/host/usr", "incus_runner_loader": LOADER,
        "incus_storage_pool": ic.POOL, "member_unreachable_grace_s": GRACE_S,
        "cli_vm_memory_mib": 1024, "cli_vm_vcpus": 1, "vm_boot_timeout_s": 240, "browser_pool_size": 0,
        "reconciler_interval_s": 3600.0, "host_memory_mib": 64 * 1024,
        # The project is shared with the harness's own tests: never remove their instances here.
        "reconciler_orphan_grace_s": 3600.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class Env:
    ctx: AppContext
    principal: Principal
    driver: IncusDriver
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def env(incus_cluster: Any) -> Iterator[Env]:
    config = incus_cluster
    data_dir = Path(tempfile.mkdtemp(prefix="rc-incus-"))
    settings = cluster_settings(data_dir, config)
    image = images.resolve(settings, "cli")
    if image is None:
        pytest.skip(f"the cli guest image is not built: REMOTECLI_DATA_DIR={TEST_DATA_DIR} remotecli images build cli")
    publish_images(image)
    ctx = in_ctl(AppContext.create, settings)
    user = users_service.create_user(ctx.db, "incus-user")
    driver = ctx.driver
    assert isinstance(driver, IncusDriver)
    assert in_ctl(driver.availability).ok
    try:
        yield Env(ctx, Principal(user.id, user.name, False), driver)
    finally:
        for vm in vm_manager.list_vms(ctx, None):
            if vm.status != VmStatus.DESTROYED.value:
                with contextlib.suppress(Exception):
                    in_ctl(driver.destroy, vm_manager.spec_of(ctx, vm))
        with contextlib.suppress(Exception):
            for volume in in_ctl(driver.client.get, f"/1.0/storage-pools/{ic.POOL}/volumes/custom") or []:
                in_ctl(driver.client.delete_volume, ic.POOL, str(volume).rsplit("/", 1)[-1].split("?")[0])
        ctx.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def _reconcile(env: Env) -> Any:
    from remotecli.background.reconciler import Reconciler

    return in_ctl(Reconciler(env.ctx, owner="cluster-test").run_once)


def _health(env: Env, vm_id: str) -> str:
    vm = vm_manager.get_vm(env.ctx, None, vm_id)

    def call() -> str:
        with env.ctx.agent(vm, timeout=10) as agent:
            return agent.health().vm_id

    return in_ctl(call)


def _exec(env: Env, vm_id: str, argv: list[str]) -> str:
    vm = vm_manager.get_vm(env.ctx, None, vm_id)

    def call() -> str:
        with env.ctx.agent(vm, timeout=30) as agent:
            return agent.exec(argv, timeout_s=20).stdout.decode(errors="replace")

    return in_ctl(call)


def _live_cli_vms(env: Env) -> list[Any]:
    return [vm for vm in vm_manager.list_vms(env.ctx, None)
            if vm.vm_type == "cli" and vm.status not in ("failed", "destroying", "destroyed")]


def _dump(env: Env, exc: BaseException) -> None:
    """What a failed boot left: the VM rows' reasons, each instance's launcher and QEMU logs."""
    print(f"\nboot failed: {exc!r} {getattr(exc, 'log_detail', '')}")
    for vm in vm_manager.list_vms(env.ctx, None):
        print(f"{vm.id} {vm.status}: {vm.status_reason}")
        for path in ("/var/lib/remotecli-vm/vm/qemu.log", "/var/lib/remotecli-vm/vm/console.log"):
            with contextlib.suppress(Exception):
                print(f"--- {path}\n" + in_ctl(env.driver.client.read_file, vm.id, path).decode()[-3000:])
        with contextlib.suppress(Exception):
            print("--- console\n" + in_ctl(env.driver.client.get, f"/1.0/instances/{vm.id}/logs/lxc.log"))


@pytest.fixture(scope="module")
def first_vm(env: Env) -> str:
    started = time.monotonic()
    try:
        vm, created = in_ctl(vm_manager.ensure_cli_vm, env.ctx, env.principal)
    except Exception as exc:
        _dump(env, exc)
        raise
    env.timings["incus_create_to_agent_ready_s"] = time.monotonic() - started
    print(f"\nincus create -> agent ready: {env.timings['incus_create_to_agent_ready_s']:.1f} s")
    assert created and vm.status == VmStatus.RUNNING.value
    return vm.id


def test_cli_guest_boots_through_incus_and_answers_over_tls(env: Env, first_vm: str) -> None:
    from remotecli.agent.client import AgentClient
    from remotecli.drivers.incus import certs
    from remotecli.errors import AgentUnreachable

    assert _health(env, first_vm) == first_vm
    assert _exec(env, first_vm, ["sh", "-c", "echo hello-from-$(hostname)"]).startswith("hello-from-")
    # Its home is an Incus custom volume, mounted in the guest.
    assert "/home" in _exec(env, first_vm, ["sh", "-c", "grep ' /home/' /proc/mounts || mount"])
    target, _cert = in_ctl(env.driver.agent_target, f"incus://{first_vm}")
    assert target.startswith("tcp://10.231.0.1")

    def refused(client: AgentClient) -> bool:
        with client:
            try:
                client.health()
            except AgentUnreachable:
                return True
        return False

    assert in_ctl(refused, AgentClient(target, "not-the-secret", timeout=5))  # no plain HTTP
    other = certs.make_self_signed(f"remotecli-vm-{first_vm}", server=True)
    assert in_ctl(refused, AgentClient(target, "x", timeout=5, tls=certs.pinned_client_context(other.cert_pem)))
    # The member is recorded on the row by a reconciler pass; the console is read through the driver.
    _reconcile(env)
    vm = vm_manager.get_vm(env.ctx, None, first_vm)
    assert vm.member in ic.MEMBERS and vm.member == in_ctl(env.driver.member_of, first_vm)
    assert "remotecli" in in_ctl(env.driver.console_tail, vm_manager.spec_of(env.ctx, vm), 200)


HOME_FILE = "d=$(grep ' /home/' /proc/mounts | head -n 1 | cut -d ' ' -f 2); test -n \"$d\"; f=$d/.rc-incusd-kill"


def test_incusd_sigkill_loses_nothing(env: Env, first_vm: str) -> None:
    member = vm_manager.get_vm(env.ctx, None, first_vm).member
    assert member
    other = next(m for m in ic.MEMBERS if m != member)
    token = f"written-before-the-kill-{time.time_ns()}"
    # A file in the guest's home (the Incus custom volume), synced before incusd dies.
    assert _exec(env, first_vm, ["sh", "-c", f"{HOME_FILE}; echo {token} > $f && sync && cat $f"]).strip() == token
    killed = ic.kill_incusd(member)
    try:
        assert ic.incusd_pid(member) is None
        # The guest keeps running and answering over TLS while its member's incusd is dead.
        assert _health(env, first_vm) == first_vm
        assert _exec(env, first_vm, ["sh", "-c", "echo still-here"]).strip() == "still-here"
    finally:
        started = time.monotonic()
        restarted = ic.start_incusd(member)  # from this process: the harness uses the member's own cgroups
        env.timings["incusd_restart_s"] = time.monotonic() - started
    assert restarted != killed
    ic.wait_members({m: "ONLINE" for m in ic.MEMBERS}, timeout=120, via=other)
    spec = vm_manager.spec_of(env.ctx, vm_manager.get_vm(env.ctx, None, first_vm))
    deadline = time.monotonic() + 60
    while in_ctl(env.driver.inspect, spec).liveness is not Liveness.ALIVE and time.monotonic() < deadline:
        time.sleep(2)
    # The same instance, still running on the same member, as the restarted incusd reports it.
    assert in_ctl(env.driver.inspect, spec).liveness is Liveness.ALIVE
    assert in_ctl(env.driver.member_of, first_vm) == member
    listed = {str(i["name"]): i for i in ic.instances(via=member)}
    assert listed[first_vm]["status"] == "Running" and listed[first_vm]["location"] == member
    _reconcile(env)
    assert vm_manager.get_vm(env.ctx, None, first_vm).status == VmStatus.RUNNING.value
    assert [v.id for v in _live_cli_vms(env)] == [first_vm]  # exactly one live CLI VM, the same one
    assert _health(env, first_vm) == first_vm
    # Nothing lost: the home file written before the kill is there.
    assert _exec(env, first_vm, ["sh", "-c", f"{HOME_FILE}; cat $f"]).strip() == token


def test_qemu_killed_in_the_container_fails_and_is_replaced(env: Env, first_vm: str) -> None:
    vm = vm_manager.get_vm(env.ctx, None, first_vm)
    ic.incus(vm.member, "exec", "--project", ic.PROJECT, vm.id, "--", "sh", "-c",
             "kill -9 $(cat /var/lib/remotecli-vm/vm/qemu.pid)")
    spec = vm_manager.spec_of(env.ctx, vm)
    deadline = time.monotonic() + 60
    while in_ctl(env.driver.inspect, spec).liveness is not Liveness.DEAD and time.monotonic() < deadline:
        time.sleep(1)
    assert "stopped" in in_ctl(env.driver.inspect, spec).reason  # QEMU's exit stopped its container
    _reconcile(env)
    assert vm_manager.get_vm(env.ctx, None, first_vm).status == VmStatus.FAILED.value
    started = time.monotonic()
    new, created = in_ctl(vm_manager.ensure_cli_vm, env.ctx, env.principal)
    env.timings["replace_after_qemu_kill_s"] = time.monotonic() - started
    assert created and new.id != first_vm and _health(env, new.id) == new.id
    pytest.second_vm_id = new.id  # type: ignore[attr-defined]


def test_member_cut_is_unknown_then_replaced_and_fenced_on_return(env: Env) -> None:
    vm_id = pytest.second_vm_id  # type: ignore[attr-defined]
    _reconcile(env)
    vm = vm_manager.get_vm(env.ctx, None, vm_id)
    member = vm.member
    assert member
    other = next(m for m in ic.MEMBERS if m != member)
    ic.cut_link(member)
    try:
        ic.wait_members({member: "OFFLINE"}, timeout=90, via=other)
        env.driver._members = None
        _reconcile(env)
        assert vm_manager.get_vm(env.ctx, None, vm_id).status == VmStatus.UNKNOWN.value
        # During the grace: no second CLI VM (the unknown one is still the user's live VM).
        _reconcile(env)
        assert [v.id for v in _live_cli_vms(env)] == [vm_id]
        time.sleep(max(0.0, GRACE_S - 5))
        deadline = time.monotonic() + 30
        while vm_manager.get_vm(env.ctx, None, vm_id).status == VmStatus.UNKNOWN.value:
            assert time.monotonic() < deadline
            _reconcile(env)
            time.sleep(2)
        assert vm_manager.get_vm(env.ctx, None, vm_id).status == VmStatus.FAILED.value
        # The home volume stays with the unreachable VM until it is fenced.
        assert in_ctl(env.driver.fence, vm_manager.spec_of(env.ctx, vm)).liveness is not Liveness.DEAD
    finally:
        ic.restore_link(member)
    ic.wait_members({m: "ONLINE" for m in ic.MEMBERS}, timeout=120, via=other)
    env.driver._members = None
    deadline = time.monotonic() + 90
    spec = vm_manager.spec_of(env.ctx, vm)
    while time.monotonic() < deadline:
        _reconcile(env)
        if in_ctl(env.driver.inspect, spec).liveness is Liveness.DEAD:
            break
        time.sleep(3)
    assert in_ctl(env.driver.inspect, spec).liveness is Liveness.DEAD  # fenced: stopped on its return
    started = time.monotonic()
    new, created = in_ctl(vm_manager.ensure_cli_vm, env.ctx, env.principal)
    env.timings["replace_after_partition_s"] = time.monotonic() - started
    assert created and new.id != vm_id and _health(env, new.id) == new.id
    assert [v.id for v in _live_cli_vms(env)] == [new.id]
