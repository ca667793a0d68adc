"""Guest confinement with real guests: each QEMU runs as a uid of its own (and cannot signal
another VM's QEMU), and a guest reaches neither the controller's API nor another VM's agent nor a
private network through the network it is given, while the ports and networks the operator allows
still work (so the refusals are the rules, not a broken network).

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

from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.drivers.qemu import confinement
from remotecli.services import users as users_service
from remotecli.services import vm_exec, vm_manager
from remotecli.services.users import Principal
from tests.integration.conftest import close_and_clean, qemu_settings, require_images
from tests.support.server import free_port, serve_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A uid range of its own: the rules are per range, so no other test's VMs (or leftover
# controllers) can replace the rules this test checks.
TEST_UID_RANGE = "1900200000-1900200099"
NS_ALLOWED = "10.213.0.2"  # inside the test's namespace; private, re-opened by guest_allowed_networks
NS_BLOCKED = "10.213.1.2"  # inside the test's namespace; in guest_blocked_networks (wins over the allowed /16)
PUBLIC_NAME = "mirror.example.com"  # mapped to NS_ALLOWED in the guest's /etc/hosts, never resolved by DNS

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
        qemu_uid_range=TEST_UID_RANGE,
        guest_host_allowed_ports=[allowed.port],
        guest_blocked_networks=["169.254.0.0/16", "10.213.1.0/24"],
        guest_allowed_networks=["10.213.0.0/16"],
    )
    require_images(settings, "cli", "browser")
    ctx = AppContext.create(settings)
    api_port = free_port()
    try:
        with serve_app(create_app(ctx, background=False), api_port):
            yield ctx, allowed, api_port
    finally:
        allowed.close()
        close_and_clean(ctx)
        confinement.remove_firewall(_uids())


def _uids() -> confinement.UidRange:
    first, _, last = TEST_UID_RANGE.partition("-")
    return confinement.UidRange(int(first), int(last))


def _qemu_pid(vm: object) -> int:
    return int((Path(vm.directory) / "qemu.pid").read_text())  # type: ignore[attr-defined]


SIGNAL_PROBE = r"""
import errno, json, os, signal, sys
own, other = int(sys.argv[1]), int(sys.argv[2])
out = {"uid": os.getuid()}
for name, pid, sig in (("own_0", own, 0), ("other_0", other, 0), ("other_term", other, signal.SIGTERM),
                       ("other_stop", other, signal.SIGSTOP)):
    try:
        os.kill(pid, sig)
        out[name] = "sent"
    except OSError as exc:
        out[name] = errno.errorcode[exc.errno]
try:
    open(f"/proc/{other}/environ", "rb").read()  # needs ptrace access to the other QEMU
    out["other_environ"] = "read"
except OSError as exc:
    out["other_environ"] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""


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

    # Each QEMU dropped to a uid of its own (CLI half of the range), with no capabilities left.
    uids = _uids()
    seen_uids = []
    for vm in (vm_a, vm_b):
        pid = _qemu_pid(vm)
        real, effective, saved, fs = (int(x) for x in _status_field(pid, "Uid").split())
        assert real == effective == saved == fs and real in uids.for_type("cli"), (real, uids)
        assert _status_field(pid, "Gid").split() == [str(real)] * 4
        assert _status_field(pid, "Groups") == str(real)  # no supplementary group of root's
        assert int(_status_field(pid, "CapEff"), 16) == 0
        assert int(_status_field(pid, "Seccomp")) == 2  # -sandbox on
        # Its files stay root's: a guest that takes QEMU over cannot open another VM's disk.
        assert (Path(vm.directory) / "config.img").stat().st_uid == 0
        assert (Path(vm.directory) / confinement.UID_FILE).read_text().strip() == str(real)
        seen_uids.append(real)
    assert seen_uids[0] != seen_uids[1]

    # A process running as VM A's QEMU uid cannot signal or inspect VM B's QEMU (it can its own).
    pid_a, pid_b = _qemu_pid(vm_a), _qemu_pid(vm_b)
    probe = subprocess.run(
        ["setpriv", f"--reuid={seen_uids[0]}", f"--regid={seen_uids[0]}", "--clear-groups",
         "/usr/bin/python3", "-c", SIGNAL_PROBE, str(pid_a), str(pid_b)],  # the system's: any uid may run it
        capture_output=True, text=True, check=True, timeout=30, cwd="/",
    )
    signals = json.loads(probe.stdout)
    assert signals == {"uid": seen_uids[0], "own_0": "sent", "other_0": "EPERM", "other_term": "EPERM",
                       "other_stop": "EPERM", "other_environ": "EACCES"}, signals
    assert _status_field(pid_b, "State").startswith(("S", "R"))  # B's QEMU was not stopped

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
    result = vm_exec.exec_in_vm(
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
        ["nft", "list", "table", "inet", confinement.table_name(uids)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    refused = re.findall(r'counter packets (\d+) bytes \d+ reject with tcp reset comment "host services"', listing)
    assert refused and int(refused[0]) >= 3, listing


def test_flushed_rules_come_back(confined_ctx: tuple[AppContext, _Responder, int]) -> None:
    """An nftables restart flushes every table while VMs keep running: doctor says so, and the
    reconciler's next pass (or the next boot) puts the rules back."""
    from remotecli.background.reconciler import Reconciler

    ctx, _allowed, _api_port = confined_ctx
    uids = _uids()
    owner = users_service.create_user(ctx.db, "carol")
    vm, _ = vm_manager.ensure_cli_vm(ctx, Principal(owner.id, owner.name, False))
    assert confinement.firewall_present(uids)
    record = json.loads((Path(vm.directory) / "vm.json").read_text())
    assert record["qemu_uid"] in uids.for_type("cli") and record["guest_network_isolation"] is True

    confinement.remove_firewall(uids)
    doctor = ctx.driver.guest_confinement()  # what doctor shows: the truth, and changes nothing
    assert doctor is not None and not doctor.ok and "not loaded" in doctor.detail
    assert not confinement.firewall_present(uids)
    report = Reconciler(ctx).run_once()
    restored = [f for f in report.findings if f.kind == "guest_firewall"]
    assert restored and restored[0].result == "done", report.findings
    assert confinement.firewall_present(uids)
    after = ctx.driver.guest_confinement()
    assert after is not None and after.ok and "reach neither the host nor private networks" in after.detail

    confinement.remove_firewall(uids)
    second = vm_manager.create_vm(ctx, Principal(owner.id, owner.name, False), "browser")
    assert second.status == "running" and confinement.firewall_present(uids)  # the boot restored it
    browser_uid = int(_status_field(_qemu_pid(second), "Uid").split()[0])
    assert browser_uid in uids.for_type("browser")  # Browser VMs: the range's second half


def _probe(ctx: AppContext, owner: Principal, vm_id: str, port: int) -> dict[str, str]:
    targets = [("by_address", NS_ALLOWED, port), ("by_public_name", PUBLIC_NAME, port)]
    result = vm_exec.exec_in_vm(ctx, owner, vm_id, ["python3", "-c", PROBE, json.dumps(targets)], timeout_s=120)
    assert result.exit_code == 0, result.stderr
    seen: dict[str, str] = json.loads(result.stdout)
    return seen


def _set_policy(ctx: AppContext, every: list[str], cli: list[str], browser: list[str]) -> None:
    """Change the settings and reload the rules, as a restarted controller's next boot would."""
    ctx.settings.guest_allowed_networks = every
    ctx.settings.guest_allowed_networks_cli = cli
    ctx.settings.guest_allowed_networks_browser = browser
    assert confinement.confine(ctx.settings).firewall


def test_private_networks_refused_by_default_and_reopened_by_setting(
    confined_ctx: tuple[AppContext, _Responder, int], netns_services: int
) -> None:
    """From a CLI VM and a Browser VM: a listener on a private address (in the test's namespace)
    is refused with the default policy, also through a public-looking name the guest's hosts file
    maps to it (so a DNS answer cannot open it either), and reached once its network is in
    guest_allowed_networks; the per-type setting opens it for that type only."""
    ctx, _allowed, _api_port = confined_ctx
    owner_row = users_service.create_user(ctx.db, "dave")
    owner = Principal(owner_row.id, owner_row.name, False)
    _set_policy(ctx, [], [], [])  # the defaults: nothing private
    cli, _ = vm_manager.ensure_cli_vm(ctx, owner)
    browser = vm_manager.create_vm(ctx, owner, "browser")  # as the sign-in worker does
    vms = {"cli": cli.id, "browser": browser.id}
    for vm_id in vms.values():
        hosts = vm_exec.exec_in_vm(
            ctx, owner, vm_id, ["sh", "-c", f"echo '{NS_ALLOWED} {PUBLIC_NAME}' >> /etc/hosts"],
            user="root", timeout_s=30,
        )
        assert hosts.exit_code == 0, hosts.stderr

    for kind, vm_id in vms.items():
        seen = _probe(ctx, owner, vm_id, netns_services)
        assert seen == {"by_address": "refused", "by_public_name": "refused"}, (kind, seen)

    _set_policy(ctx, ["10.213.0.0/24"], [], [])
    for kind, vm_id in vms.items():
        seen = _probe(ctx, owner, vm_id, netns_services)
        assert all(v.startswith("connected:HTTP/1.0") for v in seen.values()), (kind, seen)

    _set_policy(ctx, [], ["10.213.0.0/24"], [])  # CLI VMs only
    assert all(v.startswith("connected:HTTP/1.0") for v in _probe(ctx, owner, cli.id, netns_services).values())
    assert _probe(ctx, owner, browser.id, netns_services) == {"by_address": "refused", "by_public_name": "refused"}

    _set_policy(ctx, [f"{NS_ALLOWED}:{netns_services + 1}"], [], [])  # a host:port pair opens that port only
    assert _probe(ctx, owner, cli.id, netns_services)["by_address"] == "refused"
