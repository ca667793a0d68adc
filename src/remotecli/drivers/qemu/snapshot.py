"""Saved Browser VM templates for the QEMU driver: what is on disk and whether it still fits.

ADR 0012, "Snapshot restore". One snapshot per VM type under ``<data_dir>/snapshots/<vm_type>/``::

    manifest.json  format, key, the facts the key is made of, state size, build time (no secret)
    state.bin      the QEMU migration stream of the template VM (RAM + device state), 0600
    disk.qcow2     the template's root overlay as it was when the state was saved, 0444
    base.ext4      hard link to the image's rootfs.ext4 (disk.qcow2's backing file, relative)
    console.log    the template's console (for a failed restore's diagnosis)

The **key** is a hash of everything a migration stream depends on: the image (recipe hash and the
kernel and initrd files), the QEMU version (``qemu-system-x86_64 --version``), the machine type,
accelerator and CPU model, vCPUs and memory. A snapshot whose key differs is stale and is rebuilt;
a VM is never restored from it. The build and the restore themselves are in ``driver.py`` (they
launch QEMU); this module knows the files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from remotecli.config import Settings
from remotecli.drivers import host
from remotecli.drivers.base import ImageRef, SnapshotRef

FORMAT = 1
STATE_FILE = "state.bin"
DISK_FILE = "disk.qcow2"
BASE_FILE = "base.ext4"
MANIFEST_FILE = "manifest.json"
# The console line the template agent prints once it is ready to be saved (agent/guest/rekey.py).
TEMPLATE_READY = b'"event":"template_ready"'


def root(settings: Settings) -> Path:
    return settings.data_dir / "snapshots"


def directory(settings: Settings, vm_type: str) -> Path:
    return root(settings) / vm_type


def _file_id(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"{path.name}:missing"
    return f"{path.name}:{st.st_size}"


@dataclass(frozen=True)
class Facts:
    """What a migration stream depends on. Equal facts, equal key."""

    vm_type: str
    image_hash: str
    kernel: str
    initrd: str
    qemu: str
    machine: str
    accel: str
    cpu: str
    vcpus: int
    memory_mib: int

    def as_dict(self) -> dict[str, object]:
        return {"format": FORMAT, **self.__dict__}

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:32]


def facts_for(image: ImageRef, *, qemu: str, machine: str, accel: str, cpu: str, vcpus: int,
              memory_mib: int) -> Facts:
    return Facts(vm_type=image.vm_type, image_hash=image.recipe_hash,
                 kernel=f"{image.kernel.parent.name}/{_file_id(image.kernel)}",
                 initrd=f"{image.initrd.parent.name}/{_file_id(image.initrd)}",
                 qemu=qemu, machine=machine, accel=accel, cpu=cpu, vcpus=vcpus, memory_mib=memory_mib)


def read_manifest(snapshot_dir: Path) -> dict[str, object]:
    return host.read_json_object(snapshot_dir / MANIFEST_FILE)


def check(settings: Settings, facts: Facts) -> tuple[SnapshotRef | None, str | None]:
    """(the usable snapshot, None), or (None, why not) — ``"missing"`` when there is none at all."""
    snap = directory(settings, facts.vm_type)
    manifest = read_manifest(snap)
    if not manifest:
        return None, "missing"
    if manifest.get("key") != facts.key:
        old = manifest.get("facts")
        changed = sorted(k for k, v in facts.as_dict().items() if not isinstance(old, dict) or old.get(k) != v)
        return None, f"stale: {', '.join(changed) or 'key'} changed"
    state = snap / STATE_FILE
    try:
        size = state.stat().st_size
    except OSError:
        return None, "state file missing"
    if size != manifest.get("state_bytes"):
        return None, f"state file is {size} bytes, the manifest says {manifest.get('state_bytes')}"
    for name in (DISK_FILE, BASE_FILE):
        if not (snap / name).is_file():
            return None, f"{name} missing"
    return SnapshotRef(vm_type=facts.vm_type, key=facts.key, directory=snap), None


def write_manifest(build_dir: Path, facts: Facts, *, build_s: float, warmed: bool) -> None:
    state = build_dir / STATE_FILE
    doc = {
        "format": FORMAT,
        "key": facts.key,
        "facts": facts.as_dict(),
        "state_bytes": state.stat().st_size,
        "created_at": time.time(),
        "build_s": round(build_s, 2),
        "warmed": warmed,
    }
    host.write_private_file(build_dir / MANIFEST_FILE, (json.dumps(doc, indent=2) + "\n").encode())


def install(settings: Settings, build_dir: Path, vm_type: str) -> Path:
    """Move a finished build into place, replacing the previous snapshot. VMs restored from the old
    one keep running: each holds hard links to the files it needs (see ``link_into``)."""
    final = directory(settings, vm_type)
    old = root(settings) / f".old-{vm_type}-{os.urandom(4).hex()}"
    with contextlib.suppress(FileNotFoundError):
        os.rename(final, old)
    os.rename(build_dir, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def link_into(ref: SnapshotRef, vm_dir: Path, template_name: str) -> None:
    """Give a restored VM its own names for the template disk and its backing file (hard links, a
    copy across filesystems), so rebuilding or removing the snapshot never pulls them away."""
    pairs = ((ref.directory / DISK_FILE, vm_dir / template_name), (ref.directory / BASE_FILE, vm_dir / BASE_FILE))
    for source, target in pairs:
        if target.exists():
            continue
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)


@contextlib.contextmanager
def build_lock(settings: Settings, vm_type: str, *, wait: bool) -> Iterator[bool]:
    """One build per VM type at a time on this host. Yields False when ``wait`` is False and
    another build holds the lock."""
    root(settings).mkdir(parents=True, exist_ok=True)
    with open(root(settings) / f".{vm_type}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def leftover_builds(settings: Settings) -> list[Path]:
    """Build directories a killed controller left behind (called under the build lock)."""
    base = root(settings)
    if not base.is_dir():
        return []
    return [p for p in base.iterdir() if p.is_dir() and (p.name.startswith(".build-") or p.name.startswith(".old-"))]
