"""The reconciler with real QEMU guests: killed, deleted and orphaned VMs leave nothing behind;
after a controller "crash" the running VM is adopted, not replaced."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from sqlalchemy import delete

from remotecli.background.gc import GarbageCollector
from remotecli.background.reconciler import Reconciler
from remotecli.context import AppContext
from remotecli.db.models import Vm
from remotecli.services import users as users_service
from remotecli.services import vm_exec, vm_manager
from remotecli.services.users import Principal
from tests.integration.test_vm_lifecycle import _pid, _port_of
from tests.support.net import process_gone

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _qemu_pids_for(directory: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and argv and b"qemu-system" in argv[0] and any(f"{directory}/".encode() in a for a in argv):
            found.append(int(entry.name))
    return found


def test_killed_deleted_and_orphaned_vms_leave_nothing(qctx: AppContext) -> None:
    principals = []
    for name in ("rq-killed", "rq-deleted", "rq-orphan"):
        user = users_service.create_user(qctx.db, name)
        principals.append(Principal(user.id, user.name, False))
    vms: list[Vm | None] = [None, None, None]
    errors: list[BaseException] = []

    def boot(index: int) -> None:
        try:
            vms[index] = vm_manager.ensure_cli_vm(qctx, principals[index])[0]
        except BaseException as exc:
            errors.append(exc)

    for index in range(3):  # one boot at a time: TCG on a small host stalls under parallel boots
        boot(index)
    assert not errors, errors
    killed, deleted, orphan = vms
    assert killed and deleted and orphan
    dirs = [Path(vm.directory) for vm in (killed, deleted, orphan)]
    ports = [_port_of(vm.endpoint or "") for vm in (killed, deleted, orphan)]
    pids = [_pid(d) for d in dirs]
    assert all(pids)

    import os
    import shutil
    import signal

    os.kill(pids[0] or 0, signal.SIGKILL)  # 1: the process dies
    assert process_gone(pids[0] or 0)
    shutil.rmtree(dirs[1])  # 2: the directory goes, QEMU keeps running
    with qctx.db.transaction() as session:  # 3: the row goes, the VM keeps running (orphan)
        session.execute(delete(Vm).where(Vm.id == orphan.id))

    report = Reconciler(qctx, orphan_grace_s=0).run_once()
    kinds = sorted((f.kind, f.id, f.result) for f in report.findings)
    assert ("dead_vm", killed.id, "done") in kinds and ("dead_vm", deleted.id, "done") in kinds
    assert ("orphan", orphan.id, "done") in kinds
    assert vm_manager.get_vm(qctx, None, killed.id).status == "failed"
    assert vm_manager.get_vm(qctx, None, deleted.id).status == "failed"
    # After that one pass: no process for any of them, the orphan's directory and port are gone.
    for directory in dirs:
        assert _qemu_pids_for(directory) == [], directory
    assert not dirs[2].exists() and _port_free(ports[2])
    assert _port_free(ports[0]) and _port_free(ports[1])
    # The failed rows keep their directory (post-mortem) until GC; with TTL 0 it goes now.
    GarbageCollector(qctx, failed_ttl_s=0).run_once()
    assert not dirs[0].exists() and not dirs[1].exists()
    assert vm_manager.get_vm(qctx, None, killed.id).status == "destroyed"


def test_restart_adopts_the_running_vm(qctx: AppContext, owner: Principal) -> None:
    vm, created = vm_manager.ensure_cli_vm(qctx, owner)
    assert created
    pid = _pid(Path(vm.directory))
    # The controller "dies": its context is dropped without any cleanup (QEMU is -daemonize'd).
    qctx.db.dispose()
    second = AppContext.create(qctx.settings)
    try:
        started = time.monotonic()
        report = Reconciler(second, orphan_grace_s=0).run_once()  # the start-up pass
        assert [f for f in report.findings if f.id == vm.id] == [], report.findings
        again, created_again = vm_manager.ensure_cli_vm(second, owner)
        assert (again.id, created_again) == (vm.id, False)
        assert _pid(Path(vm.directory)) == pid
        result = vm_exec.exec_in_vm(second, owner, vm.id, ["true"], timeout_s=30)
        assert result.exit_code == 0 and time.monotonic() - started < 60
    finally:
        second.close()
