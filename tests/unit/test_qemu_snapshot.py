"""Snapshot files and keys (drivers/qemu/snapshot.py) and the guest's re-keying (agent/guest/rekey.py),
without QEMU. The real thing is tests/integration/test_snapshot.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from remotecli.agent.guest import rekey
from remotecli.config import Settings
from remotecli.drivers.base import ImageRef
from remotecli.drivers.qemu import snapshot


def _image(tmp_path: Path) -> ImageRef:
    kernel_dir = tmp_path / "kernel-abc"
    kernel_dir.mkdir()
    (kernel_dir / "vmlinuz").write_bytes(b"k" * 10)
    (kernel_dir / "initrd.img").write_bytes(b"i" * 20)
    return ImageRef(vm_type="browser", kernel=kernel_dir / "vmlinuz", initrd=kernel_dir / "initrd.img",
                    rootfs=tmp_path / "rootfs.ext4", recipe_hash="h1")


def _facts(image: ImageRef, **changes: object) -> snapshot.Facts:
    values: dict[str, object] = {"qemu": "7.2.22", "machine": "microvm", "accel": "tcg", "cpu": "max", "vcpus": 2,
                                 "memory_mib": 1536}
    values.update(changes)
    return snapshot.facts_for(image, **values)  # type: ignore[arg-type]


def _build(settings: Settings, facts: snapshot.Facts, state: bytes = b"state") -> Path:
    build = snapshot.root(settings) / f".build-browser-{facts.key[:6]}"
    build.mkdir(parents=True)
    (build / snapshot.STATE_FILE).write_bytes(state)
    (build / snapshot.DISK_FILE).write_bytes(b"disk")
    (build / snapshot.BASE_FILE).write_bytes(b"base")
    snapshot.write_manifest(build, facts, build_s=1.0, warmed=True)
    return snapshot.install(settings, build, "browser")


def test_key_follows_image_qemu_and_machine(tmp_path: Path) -> None:
    image = _image(tmp_path)
    base = _facts(image)
    assert base.key == _facts(image).key
    for change in ({"qemu": "8.0.0"}, {"accel": "kvm"}, {"vcpus": 1}, {"memory_mib": 1024}):
        assert _facts(image, **change).key != base.key
    other = ImageRef(**{**image.__dict__, "recipe_hash": "h2"})
    assert _facts(other).key != base.key


def test_check_missing_stale_damaged_and_fitting(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", driver="fake")
    image = _image(tmp_path)
    facts = _facts(image)
    assert snapshot.check(settings, facts) == (None, "missing")
    final = _build(settings, facts)
    ref, problem = snapshot.check(settings, facts)
    assert problem is None and ref is not None and ref.key == facts.key and ref.directory == final
    ref, problem = snapshot.check(settings, _facts(image, qemu="8.0.0"))
    assert ref is None and problem == "stale: qemu changed"
    (final / snapshot.STATE_FILE).write_bytes(b"STATE")  # the size is checked, not the bytes (QEMU does)
    assert snapshot.check(settings, facts)[0] is not None
    (final / snapshot.STATE_FILE).write_bytes(b"truncated state")
    assert "bytes" in str(snapshot.check(settings, facts)[1])
    # A rebuild replaces the snapshot in place.
    newer = _facts(image, qemu="8.0.0")
    _build(settings, newer)
    assert snapshot.check(settings, newer)[0] is not None
    assert snapshot.check(settings, facts)[1] == "stale: qemu changed"
    assert snapshot.leftover_builds(settings) == []


def test_restored_vm_links_the_template_files(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", driver="fake")
    facts = _facts(_image(tmp_path))
    _build(settings, facts)
    ref, _ = snapshot.check(settings, facts)
    assert ref is not None
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    snapshot.link_into(ref, vm_dir, "template.qcow2")
    assert (vm_dir / "template.qcow2").stat().st_ino == (ref.directory / snapshot.DISK_FILE).stat().st_ino
    assert (vm_dir / snapshot.BASE_FILE).read_bytes() == b"base"


def _config(path: Path, **doc: object) -> None:
    data = json.dumps(doc).encode() + b"\0"
    path.write_bytes(data.ljust(65536, b"\0"))


def test_template_agent_adopts_the_config_disk_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never reseed, set the clock or the hostname of the machine running the tests.
    calls: list[str] = []
    monkeypatch.setattr(rekey, "reseed", lambda seed: calls.append(f"reseed:{seed}") or "config")
    monkeypatch.setattr(rekey, "set_clock", lambda when: calls.append("clock") or "rtc")
    monkeypatch.setattr(rekey, "_set_hostname", lambda name: calls.append(f"hostname:{name}"))
    disk = tmp_path / "vdb"
    base = {"vm_type": "browser", "agent_port": 7000, "cli_user": "browser"}
    _config(disk, vm_id="snapshot-browser", hostname="snapshot-browser", agent_secret="", template=True, **base)
    config, template = rekey.load(str(disk))
    assert template is not None and config.agent_secret == ""
    agent = SimpleNamespace(config=config, _secret=b"", boot_id="template-boot")
    assert template.adopt(agent) is False  # still the template's document: nothing changes
    assert agent._secret == b"" and calls == []
    _config(disk, vm_id="vm-1", hostname="vm-1", agent_secret="s" * 32, restore_seed="ab" * 64, **base)
    assert template.adopt(agent) is True
    assert agent._secret == b"s" * 32 and agent.config.vm_id == "vm-1" and agent.boot_id != "template-boot"
    assert calls == [f"reseed:{'ab' * 64}", "clock", "hostname:vm-1"]
    _config(disk, vm_id="vm-2", hostname="vm-2", agent_secret="t" * 32, **base)
    assert template.adopt(agent) is True  # one time only: a later document is ignored
    assert agent.config.vm_id == "vm-1"


def test_an_ordinary_config_is_no_template(tmp_path: Path) -> None:
    disk = tmp_path / "vdb"
    _config(disk, vm_id="vm-1", vm_type="cli", agent_secret="s" * 32, agent_port=7000, hostname="vm-1", cli_user="cli")
    config, template = rekey.load(str(disk))
    assert template is None and config.agent_secret == "s" * 32
