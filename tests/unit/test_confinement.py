"""QEMU confinement decisions (drivers/qemu/confinement.py) without booting guests.

The proof that guests are really kept off the host is tests/integration/test_guest_isolation.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from remotecli.config import Settings
from remotecli.drivers.qemu import confinement
from remotecli.errors import DriverUnavailable


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path, **overrides)  # type: ignore[arg-type]


def test_ruleset_rejects_new_connections_from_qemu_user_to_host_and_blocked_networks() -> None:
    script = confinement.firewall_ruleset(999, [8443, 9000], ["169.254.0.0/16", "10.0.0.0/8"])
    assert "add table inet remotecli_guests_999\ndelete table inet remotecli_guests_999\n" in script
    assert "meta skuid != 999 return" in script  # only QEMU's own sockets are judged
    assert "ct state established,related accept" in script  # replies on the controller's connections pass
    assert 'tcp dport { 8443, 9000 } accept' in script
    assert 'th dport 53 accept' in script
    assert 'oifname "lo" meta l4proto tcp counter reject with tcp reset' in script
    assert "ip daddr { 169.254.0.0/16, 10.0.0.0/8 }" in script
    # Order matters: the exceptions come before the rejections.
    assert script.index("dport { 8443, 9000 }") < script.index("reject")


def test_ruleset_without_allowed_ports_or_networks() -> None:
    script = confinement.firewall_ruleset(1234, [], [])
    assert "guest_host_allowed_ports" not in script and "ip daddr" not in script
    assert 'oifname "lo" counter reject' in script


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft")
def test_ruleset_is_valid_nft() -> None:
    script = confinement.firewall_ruleset(4242, [8080], ["169.254.0.0/16"])
    result = subprocess.run(["nft", "-c", "-f", "-"], input=script, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr  # -c: checked by the kernel's parser, nothing installed
    assert not confinement.firewall_present(4242)


def test_not_root_auto_runs_unconfined_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 1000)
    result = confinement.confine(_settings(tmp_path))
    assert result.user is None and not result.firewall
    assert "not root" in result.detail


def test_not_root_on_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 1000)
    with pytest.raises(DriverUnavailable) as error:
        confinement.confine(_settings(tmp_path, guest_network_isolation="on"))
    assert error.value.code == "driver_unavailable" and "'on'" in error.value.message


def test_empty_qemu_user_keeps_root_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 0)
    result = confinement.confine(_settings(tmp_path, qemu_user=""))
    assert result.user is None and not result.firewall and "runs as root" in result.detail


def test_nft_missing_auto_keeps_the_user_drop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = confinement.QemuUser("remotecli-qemu", 999, 999)
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 0)
    monkeypatch.setattr(confinement, "ensure_qemu_user", lambda name: user)
    monkeypatch.setattr(confinement.shutil, "which", lambda name: None)
    result = confinement.confine(_settings(tmp_path))
    assert result.user == user and not result.firewall and "nftables" in result.detail
    with pytest.raises(DriverUnavailable):
        confinement.confine(_settings(tmp_path, guest_network_isolation="on"))


def test_isolation_off_still_drops_privileges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = confinement.QemuUser("remotecli-qemu", 999, 999)
    applied: list[int] = []
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 0)
    monkeypatch.setattr(confinement, "ensure_qemu_user", lambda name: user)
    removed: list[int] = []
    monkeypatch.setattr(confinement, "apply_firewall", lambda uid, ports, nets: applied.append(uid))
    monkeypatch.setattr(confinement, "remove_firewall", removed.append)
    off = confinement.confine(_settings(tmp_path, guest_network_isolation="off"))
    assert off.user == user and not off.firewall and applied == []
    assert removed == [999]  # rules an earlier run installed are taken away
    on = confinement.confine(_settings(tmp_path, guest_host_allowed_ports=[9000]))
    assert on.firewall and applied == [999] and "9000" in on.detail


def test_root_as_qemu_user_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DriverUnavailable):
        confinement.ensure_qemu_user("root")


def test_runas_spelling_follows_qemu_version(monkeypatch: pytest.MonkeyPatch) -> None:
    user = confinement.QemuUser("remotecli-qemu", 999, 999)
    monkeypatch.setattr(confinement, "supports_run_with", lambda binary: True)
    assert confinement.runas_args("qemu", user) == ["-run-with", "user=remotecli-qemu"]
    monkeypatch.setattr(confinement, "supports_run_with", lambda binary: False)
    assert confinement.runas_args("qemu", user) == ["-runas", "remotecli-qemu"]
    assert confinement.runas_args("qemu", None) == []


def test_settings_validate_ports_and_networks(tmp_path: Path) -> None:
    assert _settings(tmp_path, guest_host_allowed_ports=[9000, 80, 9000]).guest_host_allowed_ports == [80, 9000]
    assert _settings(tmp_path, guest_blocked_networks=["10.1.2.3/8"]).guest_blocked_networks == ["10.0.0.0/8"]
    with pytest.raises(ValueError):
        _settings(tmp_path, guest_host_allowed_ports=[70000])
    with pytest.raises(ValueError):
        _settings(tmp_path, guest_blocked_networks=["not-a-network"])


def test_inspect_changes_nothing_and_tells_the_truth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    entry = pwd.struct_passwd(("remotecli-qemu", "x", 999, 999, "", "/nonexistent", "/usr/sbin/nologin"))
    calls: list[str] = []
    monkeypatch.setattr(confinement, "apply_firewall", lambda *a: calls.append("apply"))
    monkeypatch.setattr(confinement, "ensure_qemu_user", lambda name: calls.append("useradd"))
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 0)
    monkeypatch.setattr(confinement.pwd, "getpwnam", lambda name: entry)
    present = {"value": False}
    monkeypatch.setattr(confinement, "firewall_present", lambda uid: present["value"])
    missing = confinement.inspect(_settings(tmp_path))
    assert not missing.firewall and "not loaded" in missing.detail and missing.user is not None
    present["value"] = True
    assert confinement.inspect(_settings(tmp_path)).firewall
    assert not confinement.inspect(_settings(tmp_path, guest_network_isolation="off")).firewall

    def no_user(name: str) -> object:
        raise KeyError(name)

    monkeypatch.setattr(confinement.pwd, "getpwnam", no_user)
    assert "does not exist yet" in confinement.inspect(_settings(tmp_path)).detail
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 1000)
    assert "not root" in confinement.inspect(_settings(tmp_path)).detail
    assert calls == []  # inspect never created a user or loaded rules
