"""Can QEMU use KVM on this host? Answered by actually booting, once, and cached.

``/dev/kvm`` existing (and even ``KVM_CREATE_VM`` succeeding) does not prove a guest can run: on
some nested-virtualisation hosts QEMU aborts while setting up the vCPU ("failed to set MSR ...").
So the probe:

1. opens ``/dev/kvm`` and checks ``KVM_GET_API_VERSION`` == 12 and ``KVM_CREATE_VM`` (cheap, no cache);
2. boots the real guest kernel under ``-accel kvm`` with no root disk and ``panic=-1``: a working
   KVM prints the kernel banner and panics ("VFS: Unable to mount root fs"), which with
   ``-no-reboot`` makes QEMU exit on its own within a few seconds. A QEMU crash, an error, or no
   kernel output within the time limit means "no".

The answer of step 2 is cached in ``<data_dir>/kvm-probe.json``, keyed by the QEMU binary's
version, the host kernel release and the guest kernel's path, so the probe runs once per
combination. Without a built kernel only step 1 runs and the answer is not cached (TCG is used).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12

PROBE_FILE = "kvm-probe.json"


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    detail: str
    cached: bool = False


def kvm_device_ok(device: str = "/dev/kvm") -> tuple[bool, str]:
    """Step 1: the device opens, speaks API 12 and creates a VM."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, f"{device} does not exist"
    except OSError as exc:
        return False, f"cannot open {device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            return False, f"KVM API version {version}, expected {KVM_API_VERSION}"
        vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as exc:
        return False, f"KVM ioctl failed: {exc.strerror}"
    finally:
        os.close(fd)
    return True, "KVM_CREATE_VM works"


def qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("QEMU emulator version ").strip() or "unknown"


def boot_probe(qemu: str, kernel: Path, timeout: float = 30.0) -> tuple[bool, str]:
    """Step 2: boot ``kernel`` under KVM until it panics for lack of a root disk."""
    with tempfile.TemporaryDirectory(prefix="remotecli-kvm-probe-") as scratch:
        console = Path(scratch) / "console.log"
        argv = [
            qemu,
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=on,pcie=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "128",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 panic=-1 loglevel=4",
            "-serial",
            f"file:{console}",
        ]
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False, f"a KVM test boot did not finish within {timeout:.0f}s"
        except OSError as exc:
            return False, f"cannot run {qemu}: {exc.strerror}"
        elapsed = time.monotonic() - started
        text = console.read_text(errors="replace") if console.exists() else ""
        if proc.returncode == 0 and ("Kernel panic" in text or "Linux version" in text or "VFS" in text):
            return True, f"a KVM test boot reached the guest kernel in {elapsed:.1f}s"
        error = (proc.stderr.strip().splitlines() or ["no output"])[0]
        return False, f"a KVM test boot failed (exit {proc.returncode}): {error}"


def probe(data_dir: Path, qemu: str, kernel: Path | None, *, refresh: bool = False) -> KvmProbe:
    """Whether to use KVM. Cached in ``<data_dir>/kvm-probe.json`` when a boot test ran."""
    ok, detail = kvm_device_ok()
    if not ok:
        return KvmProbe(False, detail)
    if kernel is None or not kernel.is_file():
        return KvmProbe(False, f"{detail}, but no guest kernel is built to test a boot; using TCG")
    key = {"qemu": qemu_version(qemu), "host_kernel": platform.release(), "guest_kernel": str(kernel)}
    cache = data_dir / PROBE_FILE
    if not refresh:
        try:
            stored = json.loads(cache.read_text())
        except (OSError, ValueError):
            stored = None
        if isinstance(stored, dict) and stored.get("key") == key:
            return KvmProbe(bool(stored.get("usable")), str(stored.get("detail", "")), cached=True)
    usable, detail = boot_probe(qemu, kernel)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "usable": usable, "detail": detail, "at": time.time()}) + "\n")
        os.replace(tmp, cache)
    except OSError:
        pass
    return KvmProbe(usable, detail)
