"""Workspace benchmark (ADR 0011): how long until a user has a working CLI VM with their home again.

    flock /tmp/remotecli-vm-tests.lock .venv/bin/python bench/workspace.py [--runs 3] [--no-write]

Two measurements through ``vm_manager`` with the QEMU driver and a real home volume:

* **death → ready**: QEMU of the user's CLI VM is killed (SIGKILL) and its directory deleted (the
  seed's case); then ``ensure_cli_vm`` is timed until it returns a new VM whose agent answered and
  whose home volume was fenced, moved, checked (``e2fsck -p``) and mounted; a file written before
  the kill is read back to prove it is the same home.
* **idle-stopped → ready**: the reconciler's idle stop (a graceful shutdown that unmounts the home)
  then ``ensure_cli_vm`` timed until the same VM runs again with its home.

Medians over ``--runs``. Results go to ``docs/benchmarks.md`` under "## Workspaces" (only that
section is rewritten). Uses its own data directory and SQLite database; images come from
``REMOTECLI_TEST_DATA_DIR`` (default ``.data/test-images``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from sqlalchemy import update  # noqa: E402

from remotecli.background.reconciler import Reconciler  # noqa: E402
from remotecli.config import Settings  # noqa: E402
from remotecli.context import AppContext  # noqa: E402
from remotecli.db.models import Vm, utcnow  # noqa: E402
from remotecli.services import users as users_service  # noqa: E402
from remotecli.services import vm_exec, vm_manager, workspaces  # noqa: E402
from remotecli.services.users import Principal  # noqa: E402

BENCH_DOC = REPO / "docs" / "benchmarks.md"
IMAGES = Path(os.environ.get("REMOTECLI_TEST_DATA_DIR") or REPO / ".data" / "test-images") / "images"


def write_section(text: str) -> None:
    doc = BENCH_DOC.read_text() if BENCH_DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Workspaces\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(doc) is not None
    doc = pattern.sub(lambda _m: text, doc) if found else doc.rstrip("\n") + "\n\n" + text
    BENCH_DOC.write_text(doc)


def _read(ctx: AppContext, owner: Principal, vm: Vm, path: str) -> bytes:
    result = vm_exec.exec_in_vm(ctx, owner, vm.id, ["cat", path], timeout_s=30, user="cli")
    if result.exit_code != 0:
        raise RuntimeError(f"cat {path}: {result.stderr!r}")
    return bytes(result.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="rc-bw-"))
    settings = Settings(
        data_dir=data_dir, shared_images_dir=IMAGES, database_url=f"sqlite:///{data_dir / 'bench.db'}",
        driver="qemu", cli_vm_vcpus=1, cli_vm_memory_mib=1024, vm_boot_timeout_s=240, cli_vm_idle_stop_s=60,
    )
    ctx = AppContext.create(settings)
    deaths: list[float] = []
    idles: list[float] = []
    try:
        user = users_service.create_user(ctx.db, "bench")
        owner = Principal(user.id, user.name, False)
        started = time.monotonic()
        vm, _ = vm_manager.ensure_cli_vm(ctx, owner)
        first_boot = time.monotonic() - started
        marker = "/home/cli/bench-marker.txt"
        agent = ctx.agent(vm)
        try:
            agent.write_file(marker, b"still here\n", mode=0o600, owner="cli")
        finally:
            agent.close()
        vm_exec.exec_in_vm(ctx, owner, vm.id, ["sync"], timeout_s=30)
        for run in range(1, args.runs + 1):
            # The seed's case: QEMU killed, directory deleted.
            pid = int((Path(vm.directory) / "qemu.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            shutil.rmtree(vm.directory, ignore_errors=True)
            t0 = time.monotonic()
            vm, created = vm_manager.ensure_cli_vm(ctx, owner)
            deaths.append(time.monotonic() - t0)
            assert created and _read(ctx, owner, vm, marker) == b"still here\n"
            # Idle stop, then the next use.
            with ctx.db.transaction() as session:
                session.execute(update(Vm).where(Vm.id == vm.id).values(
                    last_active_at=utcnow() - dt.timedelta(seconds=3600)))
            Reconciler(ctx).run_once()
            assert vm_manager.get_vm(ctx, None, vm.id).status == "stopped"
            t0 = time.monotonic()
            again, created = vm_manager.ensure_cli_vm(ctx, owner)
            idles.append(time.monotonic() - t0)
            assert not created and again.id == vm.id and _read(ctx, owner, again, marker) == b"still here\n"
            vm = again
            print(f"run {run}: death -> ready {deaths[-1]:.1f} s, idle-stopped -> ready {idles[-1]:.1f} s",
                  flush=True)
        usage = workspaces.my_workspace(ctx, owner.user_id)[1]
    finally:
        for row in vm_manager.list_vms(ctx, None):
            if row.status != "destroyed":
                try:
                    vm_manager.destroy_vm(ctx, None, row.id, reason="bench cleanup")
                except Exception:
                    ctx.driver.destroy(vm_manager.spec_of(ctx, row))
        ctx.close()
        shutil.rmtree(data_dir, ignore_errors=True)

    accel = ctx.driver.availability().facts.get("accel", "?")

    def fmt(times: list[float]) -> str:
        return f"{statistics.median(times):.1f} s | {', '.join(f'{t:.1f}' for t in times)}"

    section = f"""## Workspaces

`bench/workspace.py --runs {args.runs}` ({dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores,
QEMU accel {accel}, CLI VM 1 vCPU / 1024 MiB, home volume {settings.workspace_size_gib} GiB sparse ext4;
ADR 0011). Times are `ensure_cli_vm` until it returns a VM whose agent answered with the user's home
mounted; a file written before is read back each time.

| from | to | median | runs (s) |
|---|---|---|---|
| CLI VM killed (SIGKILL) + directory deleted | new VM ready, home fenced, moved, `e2fsck -p`, mounted | {fmt(deaths)} |
| idle-stopped (graceful stop, home unmounted) | the same VM running again with its home | {fmt(idles)} |

First CLI VM of the user (volume made with `mkfs.ext4`, seeded): {first_boot:.1f} s. The guest's
filesystem said {usage.used_bytes or 0} bytes used of {usage.total_bytes or 0}; the sparse file
takes {usage.host_allocated_bytes or 0} bytes on the host. Under TCG the boot of the guest dominates
both figures; the volume's share (fence, e2fsck, mount) is small next to it.
"""
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"wrote the Workspaces section of {BENCH_DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
