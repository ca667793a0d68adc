"""Real guests end to end through vm_manager: boot, exec, files, pause, stop, start, destroy, faults."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from remotecli.agent.client import AgentClient
from remotecli.context import AppContext
from remotecli.drivers.base import Liveness
from remotecli.errors import AgentRejected, VmNotRunning
from remotecli.services import vm_exec, vm_manager
from remotecli.services.users import Principal
from tests.support.net import process_gone, stops_listening

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _pid(vm_dir: Path) -> int | None:
    for name in ("qemu.pid",):
        try:
            return int((vm_dir / name).read_text().strip())
        except (FileNotFoundError, ValueError):
            continue
    return None


def _port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_cli_vm_lifecycle(qctx: AppContext, owner: Principal) -> None:
    vm = vm_manager.create_vm(qctx, owner, "cli")
    assert vm.status == "running" and vm.endpoint
    vm_dir = Path(vm.directory)
    pid = _pid(vm_dir)
    assert pid and Path(f"/proc/{pid}").exists()

    result = vm_exec.exec_in_vm(qctx, owner, vm.id, ["uname", "-r"], timeout_s=30)
    assert result.exit_code == 0 and b"cloud-amd64" in result.stdout  # the guest's Debian cloud kernel
    assert result.stdout.strip() != os.uname().release.encode()

    agent = qctx.agent(vm)
    try:
        agent.write_file("/home/cli/secret.txt", b"hello\n", mode=0o600, owner="cli")
        back = agent.read_file("/home/cli/secret.txt")
        assert back.data == b"hello\n" and back.mode & 0o777 == 0o600 and back.owner == "cli"
    finally:
        agent.close()

    vm_manager.pause_vm(qctx, owner, vm.id)
    assert qctx.driver.inspect(vm_manager.spec_of(qctx, vm)).power.value == "paused"
    with pytest.raises(VmNotRunning):
        vm_exec.exec_in_vm(qctx, owner, vm.id, ["true"], timeout_s=5)
    # Even straight to the agent, a paused guest does not answer.
    with pytest.raises(Exception) as paused_error, AgentClient(vm.endpoint, qctx.agent_secret(vm), timeout=2) as c:
        c.health()
    assert getattr(paused_error.value, "code", "") in ("agent_timeout", "agent_unreachable")
    vm_manager.resume_vm(qctx, owner, vm.id)
    assert vm_exec.exec_in_vm(qctx, owner, vm.id, ["true"], timeout_s=30).exit_code == 0

    vm_manager.stop_vm(qctx, owner, vm.id)
    assert qctx.driver.inspect(vm_manager.spec_of(qctx, vm)).liveness is Liveness.DEAD
    vm_manager.start_vm(qctx, owner, vm.id)
    again = vm_exec.exec_in_vm(qctx, owner, vm.id, ["cat", "/home/cli/secret.txt"], timeout_s=30)
    assert again.stdout == b"hello\n"  # the disk survived the restart

    vm = vm_manager.get_vm(qctx, owner, vm.id)
    port = _port_of(vm.endpoint or "")
    pid = _pid(vm_dir)
    vm_manager.destroy_vm(qctx, owner, vm.id)
    assert not vm_dir.exists()
    assert pid is not None and process_gone(pid)
    assert stops_listening(port)


def test_agent_refuses_missing_or_foreign_secret(qctx: AppContext, owner: Principal) -> None:
    cli = vm_manager.create_vm(qctx, owner, "cli")
    assert cli.endpoint
    import httpx

    response = httpx.get(f"http://127.0.0.1:{_port_of(cli.endpoint)}/v1/health", timeout=10)
    assert response.status_code == 401
    with pytest.raises(AgentRejected):
        AgentClient(cli.endpoint, "another-vms-secret-" + "x" * 20, timeout=10).health()
    assert AgentClient(cli.endpoint, qctx.agent_secret(cli), timeout=10).health().vm_id == cli.id


def test_killed_vm_is_replaced_by_ensure(qctx: AppContext, owner: Principal) -> None:
    first, created = vm_manager.ensure_cli_vm(qctx, owner)
    assert created
    pid = _pid(Path(first.directory))
    assert pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and qctx.driver.inspect(vm_manager.spec_of(qctx, first)).alive:
        time.sleep(0.1)
    assert qctx.driver.inspect(vm_manager.spec_of(qctx, first)).liveness is Liveness.DEAD

    second, created = vm_manager.ensure_cli_vm(qctx, owner)
    assert created and second.id != first.id
    stale = vm_manager.get_vm(qctx, owner, first.id)
    assert stale.status == "failed" and "dead" in (stale.status_reason or "")
    # The old VM's secret does not open the new VM's agent.
    with pytest.raises(AgentRejected):
        AgentClient(second.endpoint or "", qctx.agent_secret(first), timeout=10).health()

    # The seed's case: the directory disappears under a running VM.
    shutil.rmtree(second.directory)
    third, created = vm_manager.ensure_cli_vm(qctx, owner)
    assert created and third.id not in (first.id, second.id)
    assert "directory" in (vm_manager.get_vm(qctx, owner, second.id).status_reason or "")
    assert vm_exec.exec_in_vm(qctx, owner, third.id, ["true"], timeout_s=30).exit_code == 0
    # No process of the failed VMs is left running.
    time.sleep(1)
    for vm in (first, second):
        assert qctx.driver.inspect(vm_manager.spec_of(qctx, vm)).liveness is Liveness.DEAD
