"""Guest confinement with real guests: QEMU runs unprivileged, and a guest reaches neither the
controller's API nor another VM's agent through the network it is given, while the ports and
networks the operator allows still work (so the refusals are the rules, not a broken network).

Runs as root only (the QEMU user and the nftables rules need it; CI runs as root). All traffic
stays on loopback or inside a network namespace this test makes (10.213.x.x on a veth pair).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotecli.api.app import create_app
from remotecli.context import AppContext
from remotecli.drivers.qemu import confinement
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal
from tests.integration.conftest import close_and_clean, qemu_settings, require_images
from tests.support.server import free_port, serve_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEST_QEMU_USER = "remotecli-qemu-it"
NS_ALLOWED = "10.213.0.2"  # inside the test's namespace; reachable
NS_BLOCKED = "10.213.1.2"  # inside the test's namespace; in guest_blocked_networks

PROBE = r"""
import json, socket, sys
results = {}
for name, host, port in json.loads(sys.argv[1]):
    try:
        with socket.create_connection((host, port), timeout=8) as sock:
            sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
            sock.settimeout(8)
            results[name] = "connected:" + sock.recv(64).decode("latin-1")
    except ConnectionRefusedError:
        results[name] = "refused"
    except OSError as exc:
        results[name] = "error:" + type(exc).__name__
print(json.dumps(results))
"""


class _Responder:
    """A one-line TCP service on 127.0.0.1 (stands in for a host service the operator allows)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"allowed-service\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def netns_services() -> Iterator[int]:
    """A network namespace with two addresses, each serving on one port; yields the port."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 missing")
    suffix = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"rc-iso-{suffix}", f"rci{suffix}", f"rcn{suffix}"
    port = 18080

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)

    run("ip", "netns", "add", ns)
    server: subprocess.Popen[bytes] | None = None
    try:
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        run("ip", "addr", "add", "10.213.0.1/24", "dev", host_if)
        run("ip", "addr", "add", "10.213.1.1/24", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        run("ip", "-n", ns, "addr", "add", f"{NS_ALLOWED}/24", "dev", ns_if)
        run("ip", "-n", ns, "addr", "add", f"{NS_BLOCKED}/24", "dev", ns_if)
        run("ip", "-n", ns, "link", "set", ns_if, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, "python3", "-m", "http.server", str(port), "--bind", "0.0.0.0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["ip", "netns", "exec", ns, "python3", "-c",
                 f"import socket; socket.create_connection(('{NS_ALLOWED}', {port}), 1)"],
                capture_output=True, timeout=10,
            )
            if probe.returncode == 0:
                break
            time.sleep(0.2)
        yield port
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def confined_ctx(tmp_path: Path) -> Iterator[tuple[AppContext, _Responder, int]]:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("guest confinement needs root and nft (CI runs as root with nftables installed)")
    probe_table = "add table inet remotecli_probe\ndelete table inet remotecli_probe\n"
    probe = subprocess.run(["nft", "-f", "-"], input=probe_table, capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"this host's kernel refuses nftables tables: {probe.stderr.strip()}")
    allowed = _Responder()
    settings = qemu_settings(
        f"sqlite:///{tmp_path / 'iso.db'}",
        guest_network_isolation="on",
        # A QEMU user of its own: the rules are per user, so no other test's VMs (or leftover
        # controllers) can replace the rules this test checks.
        qemu_user=TEST_QEMU_USER,
        guest_host_allowed_ports=[allowed.port],
        guest_blocked_networks=["169.254.0.0/16", "10.213.1.0/24"],
    )
    require_images(settings, "cli")
    ctx = AppContext.create(settings)
    api_port = free_port()
    try:
        with serve_app(create_app(ctx, background=False), api_port):
            yield ctx, allowed, api_port
    finally:
        allowed.close()
        close_and_clean(ctx)
        confinement.remove_firewall(confinement.ensure_qemu_user(TEST_QEMU_USER).uid)


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} not in /proc/{pid}/status")


def _port(endpoint: str | None) -> int:
    return int((endpoint or "").rsplit(":", 1)[1])


def test_guest_reaches_neither_controller_nor_other_vm(
    confined_ctx: tuple[AppContext, _Responder, int], netns_services: int
) -> None:
    ctx, allowed, api_port = confined_ctx
    alice = users_service.create_user(ctx.db, "alice")
    bob = users_service.create_user(ctx.db, "bob")
    vm_a, _ = vm_manager.ensure_cli_vm(ctx, Principal(alice.id, alice.name, False))
    vm_b, _ = vm_manager.ensure_cli_vm(ctx, Principal(bob.id, bob.name, False))

    # QEMU dropped to its own unprivileged user, with no capabilities left.
    qemu_user = confinement.ensure_qemu_user(ctx.settings.qemu_user)
    for vm in (vm_a, vm_b):
        pid = int((Path(vm.directory) / "qemu.pid").read_text())
        assert _status_field(pid, "Uid").split() == [str(qemu_user.uid)] * 4
        assert int(_status_field(pid, "CapEff"), 16) == 0
        assert int(_status_field(pid, "Seccomp")) == 2  # -sandbox on
        # Its files stay root's: a guest that takes QEMU over cannot open another VM's disk.
        assert (Path(vm.directory) / "config.img").stat().st_uid == 0

    # From the host, the controller and VM B's agent answer (so the refusals below mean something).
    with socket.create_connection(("127.0.0.1", api_port), timeout=5):
        pass
    with socket.create_connection(("127.0.0.1", _port(vm_b.endpoint)), timeout=5):
        pass

    targets = [
        ("controller_api", "10.0.2.2", api_port),
        ("other_vm_agent", "10.0.2.2", _port(vm_b.endpoint)),
        ("own_agent_port_on_host", "10.0.2.2", _port(vm_a.endpoint)),
        ("allowed_host_port", "10.0.2.2", allowed.port),
        ("namespace_allowed", NS_ALLOWED, netns_services),
        ("namespace_blocked", NS_BLOCKED, netns_services),
    ]
    result = vm_manager.exec_in_vm(
        ctx, Principal(alice.id, alice.name, False), vm_a.id,
        ["python3", "-c", PROBE, json.dumps(targets)], timeout_s=120,
    )
    assert result.exit_code == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["controller_api"] == "refused", seen
    assert seen["other_vm_agent"] == "refused", seen
    assert seen["own_agent_port_on_host"] == "refused", seen
    assert seen["namespace_blocked"] == "refused", seen
    assert seen["allowed_host_port"] == "connected:allowed-service\n", seen
    assert seen["namespace_allowed"].startswith("connected:HTTP/1.0"), seen

    # The refusals were counted by the rules (what an operator sees with 'nft list table').
    listing = subprocess.run(
        ["nft", "list", "table", "inet", confinement.table_name(qemu_user.uid)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    refused = re.findall(r'counter packets (\d+) bytes \d+ reject with tcp reset comment "host services"', listing)
    assert refused and int(refused[0]) >= 3, listing


def test_flushed_rules_come_back(confined_ctx: tuple[AppContext, _Responder, int]) -> None:
    """An nftables restart flushes every table while VMs keep running: doctor says so, and the
    reconciler's next pass (or the next boot) puts the rules back."""
    from remotecli.background.reconciler import Reconciler

    ctx, _allowed, _api_port = confined_ctx
    qemu_user = confinement.ensure_qemu_user(ctx.settings.qemu_user)
    owner = users_service.create_user(ctx.db, "carol")
    vm, _ = vm_manager.ensure_cli_vm(ctx, Principal(owner.id, owner.name, False))
    assert confinement.firewall_present(qemu_user.uid)
    record = json.loads((Path(vm.directory) / "vm.json").read_text())
    assert record["qemu_user"] == qemu_user.name and record["guest_network_isolation"] is True

    confinement.remove_firewall(qemu_user.uid)
    doctor = ctx.driver.guest_confinement()  # what doctor shows: the truth, and changes nothing
    assert doctor is not None and not doctor.ok and "not loaded" in doctor.detail
    assert not confinement.firewall_present(qemu_user.uid)
    report = Reconciler(ctx).run_once()
    restored = [f for f in report.findings if f.kind == "guest_firewall"]
    assert restored and restored[0].result == "done", report.findings
    assert confinement.firewall_present(qemu_user.uid)
    after = ctx.driver.guest_confinement()
    assert after is not None and after.ok and "cannot reach the host" in after.detail

    confinement.remove_firewall(qemu_user.uid)
    second = vm_manager.create_vm(ctx, Principal(owner.id, owner.name, False), "browser")
    assert second.status == "running" and confinement.firewall_present(qemu_user.uid)  # the boot restored it
