"""The QEMU driver's early-boot retries under TCG (control logic only; real boots: tests/integration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remotecli.config import Settings
from remotecli.drivers.base import VmSpec
from remotecli.drivers.qemu import confinement
from remotecli.drivers.qemu import driver as qemu_driver
from remotecli.errors import VmBootFailed


def _setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcomes: list[str]) -> tuple[qemu_driver.QemuDriver,
                                                                                         VmSpec, list[int]]:
    settings = Settings(data_dir=tmp_path / "d", driver="qemu", accel="tcg")
    driver = qemu_driver.QemuDriver(settings)
    spec = VmSpec(vm_id="vm-retry", vm_type="cli", vcpus=1, memory_mib=256, directory=tmp_path / "vm-retry",
                  agent_secret="s" * 32)
    spec.directory.mkdir()
    killed: list[int] = []
    spawned = iter(range(100, 200))
    monkeypatch.setattr(confinement, "confine", lambda s: confinement.Confinement(None, False, "test"))
    monkeypatch.setattr(driver, "_spawn", lambda *a, **k: (next(spawned), 40000, ["qemu"]))
    monkeypatch.setattr(driver, "_wait_early_boot", lambda paths, pid: outcomes.pop(0))
    monkeypatch.setattr(driver, "_kill", lambda pid, directory: killed.append(pid))
    return driver, spec, killed


def _launch(driver: qemu_driver.QemuDriver, spec: VmSpec, tmp_path: Path) -> object:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return driver._launch(spec, qemu_driver._Paths(spec.directory), kernel, initrd, {})


def test_qemu_exiting_in_early_boot_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver, spec, killed = _setup(tmp_path, monkeypatch, ["exited", "stalled", "started"])
    boot = _launch(driver, spec, tmp_path)
    assert getattr(boot, "pid", None) == 102
    assert killed == [100, 101]  # each failed attempt cleaned up before the next
    assert json.loads((spec.directory / "vm.json").read_text())["boot_attempts"] == 3


def test_qemu_exiting_every_time_fails_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver, spec, _killed = _setup(tmp_path, monkeypatch, ["exited"] * qemu_driver.TCG_BOOT_ATTEMPTS)
    with pytest.raises(VmBootFailed) as failed:
        _launch(driver, spec, tmp_path)
    assert "exited during the guest's early boot" in failed.value.message
