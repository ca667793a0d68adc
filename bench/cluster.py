"""Cluster benchmark (issue 14): the Incus driver on the real 3-member test cluster.

    .venv/bin/python bench/cluster.py spread [--count 30]        # no QEMU: small containers
    .venv/bin/python bench/cluster.py reconcile [--count 30]     # no QEMU: small containers
    flock /tmp/remotecli-vm-tests.lock .venv/bin/python bench/cluster.py boot   # boots 2 real CLI VMs

* **boot**: create -> agent ready for one CLI VM through Incus (a container on a member running
  QEMU under TCG, the agent reached over TLS from the controller's namespace) and, in the same run,
  through the local QEMU driver (``vm_manager.ensure_cli_vm`` both times, a home volume each).
* **spread**: ``--count`` small instances (the busybox test image, no QEMU inside: a placement
  measure, not a boot) created through the driver's Incus client with no target, so Incus' own
  placement picks the member; prints how many landed on each member.
* **reconcile**: the same small instances get ``running`` VM rows; one reconciler pass (every row
  inspected through the Incus API, the host listed) is timed.

Run as root with the cluster up (``python -m tests.support.incus_cluster up``). The controller side
runs in the controller's network namespace (tests/cluster/test_incus_driver.py ``in_ctl``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from remotecli import images  # noqa: E402
from remotecli.context import AppContext  # noqa: E402
from remotecli.db.models import Vm, utcnow  # noqa: E402
from remotecli.drivers.incus.driver import IncusDriver  # noqa: E402
from remotecli.services import users as users_service  # noqa: E402
from remotecli.services import vm_manager  # noqa: E402
from remotecli.services.users import Principal  # noqa: E402
from tests.cluster.test_incus_driver import TEST_DATA_DIR, cluster_settings, in_ctl, publish_images  # noqa: E402
from tests.support import incus_cluster as ic  # noqa: E402


def _context(tmp: Path) -> AppContext:
    settings = cluster_settings(tmp, ic.up(log=False))
    return in_ctl(AppContext.create, settings)


def _small(driver: IncusDriver, count: int) -> list[str]:
    names = [f"vm-bench-{secrets.token_hex(4)}" for _ in range(count)]
    client = driver.client
    in_ctl(client.ensure_project)
    for name in names:
        in_ctl(client.create_instance, {"name": name, "type": "container", "start": True,
                                        "source": {"type": "image", "alias": ic.IMAGE_ALIAS},
                                        "config": {"limits.memory": "32MiB"}})
    return names


def _remove(driver: IncusDriver, names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(Exception):
            in_ctl(driver.client.set_state, name, "stop", timeout=5, force=True)
        with contextlib.suppress(Exception):
            in_ctl(driver.client.delete_instance, name)


def spread(count: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="rc-bench-"))
    ctx = _context(tmp)
    driver = ctx.driver
    assert isinstance(driver, IncusDriver)
    started = time.monotonic()
    names = _small(driver, count)
    made = time.monotonic() - started
    try:
        where = collections.Counter(i.location for i in in_ctl(driver.client.instances) if i.name in names)
        print(f"spread of {count} small containers (busybox, no QEMU) over {len(ic.MEMBERS)} members: "
              f"{dict(sorted(where.items()))}; created in {made:.1f} s ({made / count:.2f} s each)")
    finally:
        _remove(driver, names)
        ctx.close()
        shutil.rmtree(tmp, ignore_errors=True)


def reconcile(count: int) -> None:
    from remotecli.background.reconciler import Reconciler

    tmp = Path(tempfile.mkdtemp(prefix="rc-bench-"))
    ctx = _context(tmp)
    driver = ctx.driver
    assert isinstance(driver, IncusDriver)
    names = _small(driver, count)
    try:
        user = users_service.create_user(ctx.db, "bench")
        with ctx.db.transaction() as session:
            now = utcnow()
            for name in names:
                session.add(Vm(id=name, user_id=user.id, vm_type="browser", status="running", driver="incus",
                               vcpus=1, memory_mib=128, directory=str(ctx.settings.vms_dir / name),
                               agent_secret_enc=b"-", generation=0, created_at=now, updated_at=now,
                               status_changed_at=now))
        rec = Reconciler(ctx, owner="bench")
        times = []
        for _ in range(3):
            started = time.monotonic()
            report = in_ctl(rec.run_once)
            times.append(time.monotonic() - started)
        kinds = collections.Counter(f.kind for f in report.findings)
        print(f"one reconciler pass over {count} running instances on {len(ic.MEMBERS)} members: "
              f"{min(times):.2f} s best, {max(times):.2f} s worst of 3 (findings: {dict(kinds) or 'none'})")
    finally:
        _remove(driver, names)
        ctx.close()
        shutil.rmtree(tmp, ignore_errors=True)


def boot() -> None:
    from remotecli.config import Settings

    tmp = Path(tempfile.mkdtemp(prefix="rc-bench-"))
    ctx = _context(tmp)
    image = images.resolve(ctx.settings, "cli")
    if image is None:
        sys.exit("the cli image is not built")
    publish_images(image)
    driver = ctx.driver
    assert isinstance(driver, IncusDriver)
    user = users_service.create_user(ctx.db, "bench")
    principal = Principal(user.id, user.name, False)
    try:
        started = time.monotonic()
        vm, _ = in_ctl(vm_manager.ensure_cli_vm, ctx, principal)
        incus_s = time.monotonic() - started
        print(f"Incus: create -> agent ready {incus_s:.1f} s (member {in_ctl(driver.member_of, vm.id)})")
        in_ctl(vm_manager.destroy_vm, ctx, None, vm.id, reason="bench")
    finally:
        ctx.close()
        shutil.rmtree(tmp, ignore_errors=True)
    qtmp = Path(tempfile.mkdtemp(prefix="rc-"))
    settings = Settings(data_dir=qtmp, shared_images_dir=TEST_DATA_DIR / "images", driver="qemu",
                        cli_vm_memory_mib=1024, cli_vm_vcpus=1, vm_boot_timeout_s=240, browser_pool_size=0)
    qctx = AppContext.create(settings)
    try:
        quser = users_service.create_user(qctx.db, "bench")
        started = time.monotonic()
        qvm, _ = vm_manager.ensure_cli_vm(qctx, Principal(quser.id, quser.name, False))
        qemu_s = time.monotonic() - started
        print(f"local QEMU: create -> agent ready {qemu_s:.1f} s")
        vm_manager.destroy_vm(qctx, None, qvm.id, reason="bench")
    finally:
        qctx.close()
        shutil.rmtree(qtmp, ignore_errors=True)
    print(f"create -> agent ready: Incus {incus_s:.1f} s vs local QEMU {qemu_s:.1f} s (same run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("boot", "spread", "reconcile", "all"))
    parser.add_argument("--count", type=int, default=30)
    args = parser.parse_args()
    if args.what in ("spread", "all"):
        spread(args.count)
    if args.what in ("reconcile", "all"):
        reconcile(args.count)
    if args.what in ("boot", "all"):
        boot()


if __name__ == "__main__":
    main()
