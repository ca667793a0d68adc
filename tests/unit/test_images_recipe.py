"""Image recipes and hashes: stable, and sensitive to exactly what a build depends on (no building)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from pathlib import Path

import pytest

from remotecli import images
from remotecli.agent.protocol import encode_config_disk, hostname_for
from remotecli.config import Settings
from remotecli.errors import ImageMissing, UnknownVmType
from remotecli.images import builder, hashing
from remotecli.images.kernel import CpioWriter, build_initramfs, module_depends
from remotecli.images.recipes import BROWSER, CLI, KERNEL, RECIPES


def _agent(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "guest"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_hashes_are_stable_and_short() -> None:
    assert hashing.image_hash(CLI) == hashing.image_hash(CLI)
    assert hashing.kernel_hash(KERNEL) == hashing.kernel_hash(KERNEL)
    for digest in (hashing.image_hash(CLI), hashing.tree_hash(CLI), hashing.kernel_hash(KERNEL)):
        assert len(digest) == 16 and int(digest, 16) >= 0


def test_types_hash_differently() -> None:
    assert hashing.image_hash(CLI) != hashing.image_hash(BROWSER)
    assert hashing.tree_hash(CLI) != hashing.tree_hash(BROWSER)


def test_package_list_changes_tree_and_image_hash() -> None:
    changed = dataclasses.replace(CLI, packages=(*CLI.packages, "vim-tiny"))
    assert hashing.tree_hash(changed) != hashing.tree_hash(CLI)
    assert hashing.image_hash(changed) != hashing.image_hash(CLI)


def test_package_order_does_not_matter() -> None:
    shuffled = dataclasses.replace(CLI, packages=tuple(reversed(CLI.packages)))
    assert hashing.tree_hash(shuffled) == hashing.tree_hash(CLI)


def test_npm_packages_and_suite_change_the_tree() -> None:
    assert hashing.tree_hash(dataclasses.replace(CLI, npm_packages=("left-pad",))) != hashing.tree_hash(CLI)
    assert hashing.tree_hash(dataclasses.replace(CLI, suite="forky")) != hashing.tree_hash(CLI)


def test_agent_change_changes_image_hash_but_not_tree(tmp_path: Path) -> None:
    agent = _agent(tmp_path, {"__init__.py": "", "__main__.py": "print('a')\n"})
    before = hashing.image_hash(CLI, agent_dir=agent)
    (agent / "__main__.py").write_text("print('b')\n")
    assert hashing.image_hash(CLI, agent_dir=agent) != before
    (agent / "__main__.py").write_text("print('a')\n")
    assert hashing.image_hash(CLI, agent_dir=agent) == before
    (agent / "extra.py").write_text("")
    assert hashing.image_hash(CLI, agent_dir=agent) != before


def test_agent_bytecode_and_caches_are_ignored(tmp_path: Path) -> None:
    agent = _agent(tmp_path, {"__init__.py": "", "server.py": "x = 1\n"})
    before = hashing.image_hash(CLI, agent_dir=agent)
    (agent / "__pycache__").mkdir()
    (agent / "__pycache__" / "server.cpython-311.pyc").write_bytes(b"\0\1")
    (agent / "server.pyc").write_bytes(b"\0")
    assert hashing.image_hash(CLI, agent_dir=agent) == before
    assert [p.name for p in hashing.agent_source_files(agent)] == ["__init__.py", "server.py"]


def test_init_script_changes_image_hash(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    for name in ("remotecli-init", "initramfs-init"):
        (files / name).write_bytes((hashing.FILES_DIR / name).read_bytes())
    assert hashing.image_hash(CLI, files_dir=files) == hashing.image_hash(CLI)
    assert hashing.kernel_hash(KERNEL, files_dir=files) == hashing.kernel_hash(KERNEL)
    (files / "remotecli-init").write_text("#!/bin/sh\n")
    assert hashing.image_hash(CLI, files_dir=files) != hashing.image_hash(CLI)
    (files / "initramfs-init").write_text("#!/bin/sh\n")
    assert hashing.kernel_hash(KERNEL, files_dir=files) != hashing.kernel_hash(KERNEL)


def test_disk_size_changes_image_not_tree() -> None:
    bigger = dataclasses.replace(CLI, disk_size_mib=CLI.disk_size_mib * 2)
    assert hashing.tree_hash(bigger) == hashing.tree_hash(CLI)
    assert hashing.image_hash(bigger) != hashing.image_hash(CLI)


def test_recipes_meet_the_contract() -> None:
    assert set(RECIPES) == {"cli", "browser"}
    assert CLI.primary_user.name == "cli" and CLI.primary_user.uid == 1000 and CLI.primary_user.home == "/home/cli"
    assert BROWSER.primary_user.name == "browser" and BROWSER.primary_user.uid == 1000
    assert {"python3", "git", "nodejs", "ca-certificates", "bash", "iproute2"} <= set(CLI.packages)
    assert {"python3", "chromium", "xvfb"} <= set(BROWSER.packages)
    names = {spec.rsplit("@", 1)[0] for spec in CLI.npm_packages}
    assert {"@anthropic-ai/claude-code", "@openai/codex", "@google/gemini-cli"} == names
    # Each CLI pinned to an exact version (a new release is a recipe change, not a silent drift).
    assert all(re.fullmatch(r"@[a-z-]+/[a-z-]+@\d+\.\d+\.\d+", spec) for spec in CLI.npm_packages)
    assert {"virtio_mmio", "virtio_blk", "virtio_net"} <= set(KERNEL.modules)


def test_resolve_is_none_until_built_and_unknown_type_raises(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert images.resolve(settings, "cli") is None
    with pytest.raises(UnknownVmType):
        images.resolve(settings, "nope")
    with pytest.raises(ImageMissing):
        images.require(settings, "cli")


def test_resolve_finds_a_complete_build_only(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    khash, ihash = images.current_hashes("cli")
    kdir = builder.kernel_dir(settings, khash)
    idir = builder.image_dir(settings, "cli", ihash)
    kdir.mkdir(parents=True)
    idir.mkdir(parents=True)
    for path in (kdir / "vmlinuz", kdir / "initrd.img", kdir / "manifest.json", idir / "rootfs.ext4"):
        path.write_text("x")
    assert images.resolve(settings, "cli") is None  # no manifest: not complete
    (idir / "manifest.json").write_text("{}")
    ref = images.resolve(settings, "cli")
    assert ref is not None and ref.rootfs == idir / "rootfs.ext4" and ref.recipe_hash == ihash
    statuses = {s.target: s for s in images.status(settings)}
    assert statuses["cli"].built and statuses["kernel"].built and not statuses["browser"].built


def test_build_up_to_date_does_nothing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    khash, ihash = images.current_hashes("cli")
    kdir, idir = builder.kernel_dir(settings, khash), builder.image_dir(settings, "cli", ihash)
    kdir.mkdir(parents=True)
    idir.mkdir(parents=True)
    for path in (kdir / "vmlinuz", kdir / "initrd.img", kdir / "manifest.json", idir / "rootfs.ext4"):
        path.write_text("x")
    (idir / "manifest.json").write_text("{}")
    events: list[images.ProgressEvent] = []
    results = images.build(settings, ["cli"], progress=events.append)
    assert [r.status for r in results] == ["up_to_date", "up_to_date"]
    assert results[1].message == f"cli image up to date (hash {ihash})"
    assert any(e.stage == "up_to_date" and e.target == "cli" for e in events)


def test_prune_keeps_current_and_removes_old(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    khash, ihash = images.current_hashes("cli")
    keep = builder.image_dir(settings, "cli", ihash)
    old = builder.image_dir(settings, "cli", "0" * 16)
    old_kernel = builder.kernel_dir(settings, "1" * 16)
    for path in (keep, old, old_kernel, builder.kernel_dir(settings, khash)):
        path.mkdir(parents=True)
    removed = images.prune(settings)
    assert set(removed) == {old, old_kernel}
    assert keep.is_dir() and not old.exists()


def test_missing_tool_names_the_apt_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "find_tool", lambda name: None)
    with pytest.raises(images.BuildToolMissing) as caught:
        builder.require_tool("mmdebstrap")
    assert "apt-get install mmdebstrap" in caught.value.message
    assert caught.value.code == "build_tool_missing"
    with pytest.raises(images.BuildToolMissing) as caught:
        builder.require_tool("mkfs.ext4")
    assert "e2fsprogs" in caught.value.message


def test_module_depends_and_cpio() -> None:
    blob = b"\x00license=GPL\x00depends=virtio,net-failover\x00intree=Y\x00"
    assert module_depends(blob) == ["virtio", "net_failover"]
    assert module_depends(b"nothing") == []
    cpio = CpioWriter()
    cpio.directory("bin")
    cpio.file("init", b"#!/bin/sh\n", 0o755)
    data = cpio.finish()
    assert data.startswith(b"070701") and b"TRAILER!!!" in data and len(data) % 512 == 0
    packed = build_initramfs(b"BUSYBOX", b"#!/bin/busybox sh\n", [("virtio_mmio", b"KO")])
    raw = gzip.decompress(packed)
    assert b"lib/modules/load-order" in raw and b"virtio_mmio\n" in raw
    assert build_initramfs(b"BUSYBOX", b"x", []) == build_initramfs(b"BUSYBOX", b"x", [])  # reproducible


def test_config_disk_encoding() -> None:
    doc = {"vm_id": "vm-1", "vm_type": "cli", "agent_secret": "s" * 32, "agent_port": 7000}
    data = encode_config_disk(doc)
    assert len(data) == 64 * 1024
    text, _, rest = data.partition(b"\0")
    assert json.loads(text) == doc and set(rest) <= {0}
    assert hostname_for("VM_ab/c") == "vm-ab-c"
    assert hostname_for("vm-" + "x" * 100).__len__() <= 63
