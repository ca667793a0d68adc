"""QEMU confinement decisions (drivers/qemu/confinement.py) without booting guests.

The proof that guests are really kept off the host and off private networks, and that two QEMUs
cannot signal each other, is tests/integration/test_guest_isolation.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from remotecli.config import Settings, parse_allowed_destination
from remotecli.drivers.qemu import confinement
from remotecli.errors import DriverUnavailable

RANGE = confinement.UidRange(500000, 500099)


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path, **overrides)  # type: ignore[arg-type]


def _no_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement, "_accounts_in", lambda uids: None)


def test_ruleset_rejects_new_connections_from_qemu_uids_to_host_and_blocked_networks() -> None:
    script = confinement.firewall_ruleset(RANGE, [8443, 9000], ["169.254.0.0/16", "10.0.0.0/8"])
    table = "remotecli_guests_500000_500099"
    assert f"add table inet {table}\ndelete table inet {table}\n" in script
    assert "meta skuid != 500000-500099 return" in script  # only QEMUs' own sockets are judged
    assert "ct state established,related accept" in script  # replies on the controller's connections pass
    assert 'tcp dport { 8443, 9000 } accept' in script
    assert 'th dport 53 accept' in script
    assert 'oifname "lo" meta l4proto tcp counter reject with tcp reset' in script
    assert "ip daddr { 169.254.0.0/16, 10.0.0.0/8 }" in script
    # Order matters: the exceptions come before the rejections.
    assert script.index("dport { 8443, 9000 }") < script.index("reject")


def test_ruleset_without_allowed_ports_or_networks_still_refuses_private_ranges() -> None:
    script = confinement.firewall_ruleset(RANGE, [], [])
    assert "guest_host_allowed_ports" not in script and "guest_blocked_networks" not in script
    assert "accept comment \"guest_allowed_networks" not in script
    assert 'oifname "lo" counter reject' in script
    for network in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
                    "127.0.0.0/8", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"):
        assert network in script, network
    for network in ("fc00::/7", "fe80::/10", "::1/128"):
        assert network in script, network
    assert script.index('"host services"') < script.index('"private networks"')


def test_ruleset_order_blocks_then_allowed_then_private() -> None:
    allowed = {
        "all": [parse_allowed_destination("10.20.0.0/16")],
        "cli": [parse_allowed_destination("10.30.0.5:22")],
        "browser": [],
    }
    script = confinement.firewall_ruleset(RANGE, [], ["10.20.9.0/24"], allowed=allowed, resolvers=["10.255.255.53"])
    lines = script.splitlines()

    def at(fragment: str) -> int:
        return next(i for i, line in enumerate(lines) if fragment in line)

    # Extra blocks win over allowed networks; allowed networks win over the private default.
    assert at("ip daddr { 10.20.9.0/24 }") < at("ip daddr 10.20.0.0/16") < at('"private networks"')
    # Per-type rules match that type's half of the range only.
    cli_line = lines[at("10.30.0.5")]
    assert ("meta skuid 500000-500049 ip daddr 10.30.0.5/32 meta l4proto { tcp, udp } th dport 22 counter accept"
            in cli_line)
    # The host's resolver (private here) answers DNS before any rejection of its network.
    assert at("ip daddr { 10.255.255.53 } meta l4proto { tcp, udp } th dport 53 accept") < at('"private networks"')
    assert "host services" in lines[at('oifname "lo" counter reject')]  # allowed networks never open the host


def test_uid_range_halves() -> None:
    assert RANGE.for_type("cli") == confinement.UidRange(500000, 500049)
    assert RANGE.for_type("browser") == confinement.UidRange(500050, 500099)
    assert 500000 in RANGE and 500100 not in RANGE


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft")
def test_ruleset_is_valid_nft() -> None:
    allowed = {
        "all": [parse_allowed_destination("10.20.0.0/16"), parse_allowed_destination("[fd00::1]:443")],
        "cli": [parse_allowed_destination("10.30.0.5:22")],
        "browser": [parse_allowed_destination("192.168.7.0/24")],
    }
    script = confinement.firewall_ruleset(RANGE, [8080], ["169.254.0.0/16", "fd12::/16"], allowed=allowed,
                                          resolvers=["10.255.255.53", "fd00::53"])
    result = subprocess.run(["nft", "-c", "-f", "-"], input=script, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr  # -c: checked by the kernel's parser, nothing installed
    assert not confinement.firewall_present(RANGE)


def test_host_resolvers_skip_loopback(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# c\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver fe80::1%eth0\n"
                    "nameserver bogus\nsearch x\n")
    assert confinement.host_resolvers(conf) == ["10.255.255.53", "fe80::1"]
    assert confinement.host_resolvers(tmp_path / "missing") == []


def test_not_root_auto_runs_unconfined_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 1000)
    result = confinement.confine(_settings(tmp_path))
    assert result.uids is None and not result.firewall
    assert "not root" in result.detail


def test_not_root_on_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 1000)
    with pytest.raises(DriverUnavailable) as error:
        confinement.confine(_settings(tmp_path, guest_network_isolation="on"))
    assert error.value.code == "driver_unavailable" and "'on'" in error.value.message


def test_empty_uid_range_keeps_root_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 0)
    result = confinement.confine(_settings(tmp_path, qemu_uid_range=""))
    assert result.uids is None and not result.firewall and "runs as root" in result.detail


def test_uid_range_used_by_an_account_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 0)
    with pytest.raises(ValueError):  # root and system accounts: refused by the settings already
        _settings(tmp_path, qemu_uid_range="0-1999")
    nobody_range = "65000-66000"  # holds nobody (65534) on Debian
    monkeypatch.setattr(confinement, "_accounts_in", lambda uids: "user nobody (65534)")
    unconfined = confinement.confine(_settings(tmp_path, qemu_uid_range=nobody_range))
    assert unconfined.uids is None and "nobody" in unconfined.detail
    with pytest.raises(DriverUnavailable):
        confinement.confine(_settings(tmp_path, qemu_uid_range=nobody_range, guest_network_isolation="on"))


def test_nft_missing_auto_keeps_the_uid_drop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 0)
    _no_accounts(monkeypatch)
    monkeypatch.setattr(confinement.shutil, "which", lambda name: None)
    result = confinement.confine(_settings(tmp_path))
    assert result.uids == confinement.UidRange(1900000000, 1900065535)
    assert not result.firewall and "nftables" in result.detail
    with pytest.raises(DriverUnavailable):
        confinement.confine(_settings(tmp_path, guest_network_isolation="on"))


def test_isolation_off_still_drops_privileges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[str] = []
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 0)
    _no_accounts(monkeypatch)
    removed: list[confinement.UidRange] = []
    monkeypatch.setattr(confinement, "apply_firewall", applied.append)
    monkeypatch.setattr(confinement, "remove_firewall", removed.append)
    off = confinement.confine(_settings(tmp_path, guest_network_isolation="off", qemu_uid_range="500000-500099"))
    assert off.uids == RANGE and not off.firewall and applied == []
    assert removed == [RANGE]  # rules an earlier run installed are taken away
    on = confinement.confine(_settings(tmp_path, guest_host_allowed_ports=[9000], qemu_uid_range="500000-500099"))
    assert on.firewall and len(applied) == 1 and "tcp dport { 9000 }" in applied[0]
    assert "500000-500099" in on.detail


def test_runas_spelling_follows_qemu_version(monkeypatch: pytest.MonkeyPatch) -> None:
    user = confinement.QemuUser(1900000007, 1900000007)
    monkeypatch.setattr(confinement, "supports_run_with", lambda binary: True)
    assert confinement.runas_args("qemu", user) == ["-run-with", "user=1900000007:1900000007"]
    monkeypatch.setattr(confinement, "supports_run_with", lambda binary: False)
    assert confinement.runas_args("qemu", user) == ["-runas", "1900000007:1900000007"]
    assert confinement.runas_args("qemu", None) == []


def test_settings_validate_ports_networks_and_ranges(tmp_path: Path) -> None:
    assert _settings(tmp_path, guest_host_allowed_ports=[9000, 80, 9000]).guest_host_allowed_ports == [80, 9000]
    assert _settings(tmp_path, guest_blocked_networks=["10.1.2.3/8"]).guest_blocked_networks == ["10.0.0.0/8"]
    assert _settings(tmp_path, guest_blocked_networks=["fd00::/8"]).guest_blocked_networks == ["fd00::/8"]
    allowed = _settings(tmp_path, guest_allowed_networks=["10.1.2.3:443", "10.2.0.0/16", "[fd00::1]:22", "fd01::/64"])
    assert allowed.guest_allowed_networks == ["10.1.2.3/32:443", "10.2.0.0/16", "[fd00::1/128]:22", "fd01::/64"]
    assert _settings(tmp_path, guest_allowed_networks_cli=["10.0.0.0/8:22"]).guest_allowed_networks_cli == [
        "10.0.0.0/8:22"]
    assert _settings(tmp_path, qemu_uid_range=" 200000-200009 ").qemu_uids == (200000, 200009)
    assert _settings(tmp_path, qemu_uid_range="").qemu_uids is None
    for bad in ({"guest_host_allowed_ports": [70000]}, {"guest_blocked_networks": ["not-a-network"]},
                {"guest_allowed_networks": ["git.internal:22"]}, {"guest_allowed_networks": ["10.0.0.1:0"]},
                {"guest_allowed_networks_browser": ["[fd00::1:22"]}, {"qemu_uid_range": "5000"},
                {"qemu_uid_range": "6000-5000"}, {"qemu_uid_range": "10-2000"}):
        with pytest.raises(ValueError):
            _settings(tmp_path, **bad)


def test_egress_policy_line(tmp_path: Path) -> None:
    line = confinement.egress_policy(_settings(tmp_path, guest_allowed_networks_cli=["10.9.0.0/16"],
                                               guest_host_allowed_ports=[8443]))
    assert "\n" not in line and "public Internet only" in line and "10.0.0.0/8" in line
    assert "CLI VMs 10.9.0.0/16" in line and "Browser VMs none" in line and "ports 8443" in line
    assert "unrestricted" in confinement.egress_policy(_settings(tmp_path, guest_network_isolation="off"))


def test_inspect_changes_nothing_and_tells_the_truth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(confinement, "apply_firewall", lambda *a: calls.append("apply"))
    monkeypatch.setattr(confinement, "remove_firewall", lambda *a: calls.append("remove"))
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 0)
    _no_accounts(monkeypatch)
    present = {"value": False}
    monkeypatch.setattr(confinement, "firewall_present", lambda uids: present["value"])
    missing = confinement.inspect(_settings(tmp_path))
    assert not missing.firewall and "not loaded" in missing.detail and missing.uids is not None
    present["value"] = True
    assert confinement.inspect(_settings(tmp_path)).firewall
    assert not confinement.inspect(_settings(tmp_path, guest_network_isolation="off")).firewall
    monkeypatch.setattr(confinement, "_accounts_in", lambda uids: "user x (1900000001)")
    assert "choose a range" in confinement.inspect(_settings(tmp_path)).detail
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 1000)
    assert "not root" in confinement.inspect(_settings(tmp_path)).detail
    assert calls == []  # inspect never loaded or removed rules


def _vm_dir(vms: Path, name: str) -> Path:
    directory = vms / name
    directory.mkdir(parents=True)
    return directory


def test_allocate_uid_one_per_vm_kept_across_boots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement, "qemu_process_uids", lambda exclude_directory=None: set())
    vms = tmp_path / "vms"
    a, b, c = (_vm_dir(vms, name) for name in ("vm-a", "vm-b", "vm-c"))
    first = confinement.allocate_uid(vms, a, "cli", RANGE)
    second = confinement.allocate_uid(vms, b, "cli", RANGE)
    browser = confinement.allocate_uid(vms, c, "browser", RANGE)
    assert first.uid == first.gid == 500000 and second.uid == 500001 and browser.uid == 500050
    assert (a / confinement.UID_FILE).read_text().strip() == "500000"
    assert confinement.allocate_uid(vms, a, "cli", RANGE) == first  # a VM keeps its uid (restart)
    # A destroyed VM's uid is not handed out again at once (next after the last one given).
    (a / confinement.UID_FILE).unlink()
    a.rmdir()
    d = _vm_dir(vms, "vm-d")
    assert confinement.allocate_uid(vms, d, "cli", RANGE).uid == 500002


def test_allocate_uid_skips_uids_of_running_strays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement, "qemu_process_uids", lambda exclude_directory=None: {500000, 500001})
    vms = tmp_path / "vms"
    assert confinement.allocate_uid(vms, _vm_dir(vms, "vm-a"), "cli", RANGE).uid == 500002
    # A VM whose recorded uid a stray now holds gets another one.
    b = _vm_dir(vms, "vm-b")
    (b / confinement.UID_FILE).write_text("500001\n")
    assert confinement.allocate_uid(vms, b, "cli", RANGE).uid == 500003


def test_allocate_uid_exhausted_and_concurrent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement, "qemu_process_uids", lambda exclude_directory=None: set())
    small = confinement.UidRange(600000, 600003)  # two uids per type
    vms = tmp_path / "vms"
    confinement.allocate_uid(vms, _vm_dir(vms, "a"), "cli", small)
    confinement.allocate_uid(vms, _vm_dir(vms, "b"), "cli", small)
    with pytest.raises(DriverUnavailable, match="widen qemu_uid_range"):
        confinement.allocate_uid(vms, _vm_dir(vms, "c"), "cli", small)

    wide = confinement.UidRange(700000, 700199)
    many = tmp_path / "many"
    dirs = [_vm_dir(many, f"vm-{i}") for i in range(40)]
    got: list[int] = []
    lock = threading.Lock()

    def take(directory: Path) -> None:
        user = confinement.allocate_uid(many, directory, "browser", wide)
        with lock:
            got.append(user.uid)

    threads = [threading.Thread(target=take, args=(d,)) for d in dirs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 40 and len(set(got)) == 40 and all(700100 <= uid <= 700199 for uid in got)


def test_driver_reports_the_egress_policy_for_doctor_and_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from remotecli.drivers.qemu.driver import QemuDriver

    settings = _settings(tmp_path, guest_allowed_networks_cli=["10.9.0.0/16"])
    monkeypatch.setattr(confinement, "inspect", lambda s: confinement.Confinement(RANGE, True, "in force"))
    state = QemuDriver(settings).guest_confinement()
    assert state.ok and state.facts["egress"] == confinement.egress_policy(settings)
    assert "CLI VMs 10.9.0.0/16" in state.facts["egress"] and "(except DNS)" in state.facts["egress"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_uids_of_running_qemus_are_read_from_proc(tmp_path: Path) -> None:
    """A running QEMU (here: a shell named like one, as a uid of the range) keeps its uid out of the
    allocation, unless its command line names the VM directory being allocated for."""
    import tempfile

    public = Path(tempfile.mkdtemp(prefix="rc-fake-qemu-", dir="/tmp"))  # reachable by the uid (tmp_path is not)
    public.chmod(0o755)
    fake_qemu = public / "qemu-system-x86_64"
    shutil.copy("/bin/sh", fake_qemu)
    fake_qemu.chmod(0o755)
    vms = tmp_path / "vms"
    stray_dir = vms / "vm-stray"
    process = subprocess.Popen(["setpriv", "--reuid=500000", "--regid=500000", "--clear-groups", str(fake_qemu),
                                "-c", "sleep 30", f"{stray_dir}/disk.qcow2"], stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while 500000 not in confinement.qemu_process_uids() and time.monotonic() < deadline:
            time.sleep(0.05)  # until setpriv has exec'd the program
        assert 500000 in confinement.qemu_process_uids()
        assert 500000 not in confinement.qemu_process_uids(exclude_directory=stray_dir)
        assert confinement.allocate_uid(vms, _vm_dir(vms, "vm-new"), "cli", RANGE).uid == 500001
    finally:
        os.killpg(process.pid, 9)  # the shell and its sleep
        process.wait(10)
        shutil.rmtree(public, ignore_errors=True)
