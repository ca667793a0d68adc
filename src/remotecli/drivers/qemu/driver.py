"""The QEMU ``microvm`` driver (see docs/decisions/0001 and 0003).

Per VM directory ``<vms_dir>/<vm-id>/`` (mode 0700)::

    config.img    0600 config disk (vdb): JSON + NUL padding to 64 KiB, holds the agent secret
    disk.qcow2    writable overlay (vda); backing file base.ext4 (raw)
    base.ext4     hard link to the image's rootfs.ext4 (falls back to the image path itself when
                  the images live on another filesystem), so rebuilding or pruning images never
                  pulls the backing file from under an existing VM
    console.log   guest ttyS0 (the previous boot's is kept as console.log.1)
    qemu.log      QEMU's own stderr during start-up
    qemu.pid      written by QEMU (-pidfile)
    qmp.sock      QMP control socket
    qemu.uid      the uid (= gid) this VM's QEMU drops to, kept for the VM's life (confinement.allocate_uid)
    vm.json       this driver's record: port, pid, accel, image paths and hash, argv (no secrets)

QEMU runs with ``-daemonize``: when the launching command returns 0, the QMP socket and the port
forward are set up, and the QEMU process belongs to no controller process (it survives a
controller restart and is reaped by init, never left a zombie in the controller).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remotecli.agent.protocol import CONFIG_DISK_FILE, encode_config_disk
from remotecli.config import Settings
from remotecli.drivers import host
from remotecli.drivers.base import (
    Availability,
    BootInfo,
    Capabilities,
    HostVm,
    ImageRef,
    Inspection,
    Liveness,
    PowerState,
    SnapshotRef,
    VmDriver,
    VmGone,
    VmSpec,
)
from remotecli.drivers.qemu import confinement, kvm_probe, snapshot
from remotecli.drivers.qemu.qmp import QmpClient, QmpError, QmpUnavailable, qmp_execute
from remotecli.errors import AgentError, DriverError, DriverUnavailable, ImageMissing, VmBootFailed
from remotecli.logging import get_logger

log = get_logger("qemu")

MACHINE = "microvm,x-option-roms=off,isa-serial=on,rtc=on,pcie=off"
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
PORT_ATTEMPTS = 6
# Under TCG the early-boot PIT interrupt is sometimes never delivered and the kernel spins forever
# waiting for jiffies to move (in calibrate_delay and the IO-APIC timer check): measured 3 hangs in
# 10 boots without these, 0 in 10 with them. lpj only seeds the delay loop (x86 uses the TSC).
TCG_CMDLINE = " lpj=4000000 no_timer_check"
# The remaining hang is the kernel's early TSC calibration against the PIT, which never converges
# when the vCPU thread is starved (4 guests booting at once on 2 host cores: 0 of 4 reached the
# initramfs). Under TCG the guest's TSC is the host's (QEMU reads the host TSC), so the driver
# tells the kernel its frequency (tsc_early_khz) and calibration is skipped: then 4 of 4 and 6 of
# 6 concurrent boots reached the initramfs.


def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz (from /proc/cpuinfo), or None when it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None

# Even so, under host load the PIT tick can stop reaching the guest while the kernel calibrates
# the local APIC timer (the kernel then hangs silently). Under TCG the driver therefore waits for
# the initramfs's first console line and boots again when it does not come.
INITRAMFS_MARKER = b"remotecli-initramfs: started"
# Seconds on an idle host (the marker comes ~2-2.5 s after launch, also at load 3 on 2 cores); scaled by the load
# average per core, since a busy host slows a healthy boot too and a slow boot is not a stall.
EARLY_BOOT_TIMEOUT = 6.0
TCG_BOOT_ATTEMPTS = 5
# Snapshot restore (ADR 0012), seconds on an idle host (scaled by the load per core like the boot
# watchdog): loading the saved state, the restored agent answering with the new secret, the
# template VM booting and warming Chromium under TCG, and saving it.
RESTORE_LOAD_TIMEOUT = 60.0
RESTORE_AGENT_TIMEOUT = 30.0
TEMPLATE_READY_TIMEOUT = 300.0
SAVE_TIMEOUT = 120.0
# The template kernel zeroes freed pages, so memory Chromium's warm-up used and freed is saved as
# zero pages (skipped by migration) instead of stale bytes: measured 547 MB of state without it.
# Restored VMs inherit this setting (it is the template's running kernel).
TEMPLATE_CMDLINE = " init_on_free=1"
# A restored VM's name for the snapshot's disk (its own disk.qcow2 is an overlay over it).
TEMPLATE_DISK = "template.qcow2"

_POWER = {
    "running": PowerState.RUNNING,
    "paused": PowerState.PAUSED,
    "suspended": PowerState.PAUSED,
    "shutdown": PowerState.SHUTDOWN,
    "guest-panicked": PowerState.SHUTDOWN,
}


@dataclass(frozen=True)
class _Paths:
    directory: Path

    @property
    def config(self) -> Path:
        return self.directory / CONFIG_DISK_FILE

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def base(self) -> Path:
        return self.directory / "base.ext4"

    @property
    def console(self) -> Path:
        return self.directory / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.directory / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.directory / "qemu.pid"

    @property
    def qmp(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def record(self) -> Path:
        return self.directory / "vm.json"

    @property
    def lock(self) -> Path:
        return self.directory / ".lock"


def _qemu_opt(value: str | Path) -> str:
    """Escape a value inside a QEMU ``key=value,...`` option string."""
    return str(value).replace(",", ",,")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as QEMU's hostfwd binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 40) -> str:
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def _is_vm_process(pid: int, directory: Path) -> bool:
    """Is ``pid`` a live QEMU whose command line references this VM directory?"""
    argv = host.proc_cmdline(pid)
    if not argv or "qemu-system" not in Path(argv[0]).name:
        return False
    marker = f"{directory}/"
    if not any(marker in arg for arg in argv):
        return False
    if host.gone_or_zombie(pid):
        host.reap(pid)
        return False
    return True


def _traversable(directory: Path) -> None:
    """Let any uid pass through ``directory`` and its parents (o+x, never o+r), so a QEMU that
    dropped to its own uid can reach its VM directory to reopen an image (snapshot restore). The
    VM directories themselves stay closed (0700, or 0710 for the VM's own group)."""
    for current in (directory, *directory.parents):
        try:
            mode = current.stat().st_mode
        except OSError:
            return
        if not mode & 0o001:
            os.chmod(current, (mode & 0o7777) | 0o001)


def _qemu_processes() -> Iterator[tuple[int, list[str]]]:
    for pid in host.other_pids():
        argv = host.proc_cmdline(pid)
        if argv and "qemu-system" in Path(argv[0]).name:
            yield pid, argv


class QemuDriver(VmDriver):
    name = "qemu"
    capabilities = Capabilities(pause=True, snapshot=True, restart=True)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._availability: Availability | None = None
        self._accel: str | None = None
        self._qemu_version: str | None = None

    # ---------------------------------------------------------------- host facts

    def _qemu_binary(self) -> str:
        path = shutil.which("qemu-system-x86_64")
        if path is None:
            raise DriverUnavailable(
                "qemu-system-x86_64 is not installed; install it with 'apt-get install qemu-system-x86' "
                "(or run scripts/install-system-deps.sh)."
            )
        return path

    def _qemu_img(self) -> str:
        path = shutil.which("qemu-img")
        if path is None:
            raise DriverUnavailable("qemu-img is not installed; install it with 'apt-get install qemu-utils'.")
        return path

    def _probe_kernel(self) -> Path | None:
        from remotecli.images import builder, hashing
        from remotecli.images.recipes import KERNEL

        kernel = builder.kernel_dir(self.settings, hashing.kernel_hash(KERNEL)) / "vmlinuz"
        return kernel if kernel.is_file() else None

    def accel(self, kernel: Path | None = None) -> str:
        """'kvm' or 'tcg': the setting, or with 'auto' the (cached) KVM boot probe."""
        if self.settings.accel != "auto":
            return self.settings.accel
        if self._accel is None:
            result = kvm_probe.probe(self.settings.data_dir, self._qemu_binary(), kernel or self._probe_kernel())
            if not result.usable and not result.cached and (kernel or self._probe_kernel()) is None:
                return "tcg"  # not conclusive yet: probe again once a kernel exists
            self._accel = "kvm" if result.usable else "tcg"
        return self._accel

    def availability(self) -> Availability:
        if self._availability is not None:
            return self._availability
        try:
            qemu = self._qemu_binary()
            self._qemu_img()
        except DriverUnavailable as exc:
            return Availability(ok=False, detail=exc.message)
        facts = {"qemu": kvm_probe.qemu_version(qemu)}
        if self.settings.accel == "auto":
            kernel = self._probe_kernel()
            probe = kvm_probe.probe(self.settings.data_dir, qemu, kernel)
            facts["kvm"] = probe.detail
            accel = "kvm" if probe.usable else "tcg"
            if kernel is not None:
                self._accel = accel
        else:
            accel = self.settings.accel
        facts["accel"] = accel
        result = Availability(ok=True, detail=f"QEMU {facts['qemu']} microvm, accel {accel}", facts=facts)
        if self.settings.accel != "auto" or self._probe_kernel() is not None:
            self._availability = result
        return result

    # ---------------------------------------------------------------- process helpers

    def _live_pid(self, paths: _Paths) -> int | None:
        candidates = [pid] if (pid := host.read_pid(paths.pidfile)) is not None else []
        recorded = host.read_json_object(paths.record).get("pid")
        if isinstance(recorded, int):
            candidates.append(recorded)
        for pid in candidates:
            if _is_vm_process(pid, paths.directory):
                return pid
        return None

    def _find_pids(self, directory: Path) -> list[int]:
        """Every live QEMU process that references ``directory`` (e.g. after the directory is gone)."""
        marker = f"{directory}/"
        return [pid for pid, argv in _qemu_processes()
                if any(marker in arg for arg in argv) and not host.gone_or_zombie(pid)]

    def _wait_gone(self, pid: int, directory: Path, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _is_vm_process(pid, directory):
                return True
            time.sleep(0.05)
        return not _is_vm_process(pid, directory)

    def _kill(self, pid: int, directory: Path) -> None:
        if not _is_vm_process(pid, directory):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # QEMU -daemonize calls setsid(): pgid == pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not self._wait_gone(pid, directory, 10.0):
            raise DriverError(log_detail=f"QEMU pid {pid} survived SIGKILL")

    @contextlib.contextmanager
    def _locked(self, paths: _Paths) -> Iterator[None]:
        """Serialise operations on one VM directory (create/start/stop/destroy)."""
        try:
            handle = open(paths.lock, "a+")  # noqa: SIM115
        except FileNotFoundError:
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _boot_info(self, paths: _Paths, pid: int) -> BootInfo:
        record = host.read_json_object(paths.record)
        port = record.get("port")
        accel = record.get("accel")
        return BootInfo(
            endpoint=f"tcp://127.0.0.1:{port}",
            pid=pid,
            accel=accel if isinstance(accel, str) else None,
        )

    # ---------------------------------------------------------------- boot

    def guest_confinement(self, *, repair: bool = False) -> Availability:
        wanted = self.settings.guest_network_isolation != "off"
        current = confinement.inspect(self.settings)
        if repair and (current.firewall != wanted or (current.uids is None and self.settings.qemu_uid_range)):
            try:
                current = confinement.confine(self.settings)
            except DriverUnavailable as exc:
                return Availability(ok=False, detail=exc.message)
        # Worth a repair: rules are wanted and the host could load them (root, a QEMU user, nft).
        repairable = (wanted and not current.firewall and os.geteuid() == 0 and bool(self.settings.qemu_uid_range)
                      and shutil.which("nft") is not None)
        return Availability(ok=current.firewall or not wanted, detail=current.detail,
                            facts={"repairable": "yes" if repairable else "no",
                                   "egress": confinement.egress_policy(self.settings)})

    def _argv(
        self,
        spec: VmSpec,
        paths: _Paths,
        kernel: Path,
        initrd: Path,
        accel: str,
        port: int,
        user: confinement.QemuUser | None = None,
        incoming: bool = False,
        cmdline_extra: str = "",
    ) -> list[str]:
        cmdline = f"console=ttyS0 root=/dev/vda rw panic=-1 quiet remotecli.vm_type={spec.vm_type}{cmdline_extra}"
        if accel == "tcg":
            cmdline += TCG_CMDLINE
            tsc_khz = host_tsc_khz()
            if tsc_khz:
                cmdline += f" tsc_early_khz={tsc_khz}"
        accel_args = (
            ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,thread=multi", "-cpu", "max"]
        )
        qemu = self._qemu_binary()
        return [
            qemu,
            "-name",
            f"guest={_qemu_opt(spec.vm_id)}",
            "-M",
            MACHINE,
            *accel_args,
            "-smp",
            str(spec.vcpus),
            "-m",
            f"{spec.memory_mib}M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            cmdline,
            "-drive",
            f"id=vda,file={_qemu_opt(paths.disk)},format=qcow2,if=none,cache=writeback,discard=unmap",
            "-device",
            "virtio-blk-device,drive=vda",
            "-drive",
            f"id=vdb,file={_qemu_opt(paths.config)},format=raw,if=none,readonly=on",
            "-device",
            "virtio-blk-device,drive=vdb",
            *self._home_args(spec),
            "-netdev",
            f"user,id=n0,ipv6=off,hostfwd=tcp:127.0.0.1:{port}-:{spec.agent_guest_port}",
            "-device",
            "virtio-net-device,netdev=n0",
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            "virtio-rng-device,rng=rng0",
            "-chardev",
            f"file,id=con0,path={_qemu_opt(paths.console)}",
            "-serial",
            "chardev:con0",
            "-qmp",
            f"unix:{_qemu_opt(paths.qmp)},server=on,wait=off",
            "-pidfile",
            str(paths.pidfile),
            # elevateprivileges=deny and spawn=deny would also block QEMU's own -runas / -daemonize.
            "-sandbox",
            "on,obsolete=deny,resourcecontrol=deny",
            *confinement.runas_args(qemu, user),
            # A restore (snapshot.py): wait for migrate-incoming on QMP instead of booting.
            *(["-incoming", "defer"] if incoming else []),
            "-daemonize",
        ]

    @staticmethod
    def _home_args(spec: VmSpec) -> list[str]:
        """The home volume as the third virtio disk (vdc), with a serial the guest finds it by.
        QEMU locks the image file: a second QEMU cannot open the same volume for writing."""
        if spec.home is None:
            return []
        return [
            "-drive",
            f"id=home,file={_qemu_opt(spec.home.location)},format=raw,if=none,cache=writeback,discard=unmap",
            "-device",
            f"virtio-blk-device,drive=home,serial={_qemu_opt(spec.home.serial)}",
        ]

    def _prepare_disk(self, paths: _Paths, image: ImageRef) -> str:
        """Create disk.qcow2 over a hard link of the image's rootfs. Returns the backing path used."""
        backing = image.rootfs
        if not paths.base.exists():
            try:
                os.link(image.rootfs, paths.base)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise DriverError(log_detail=f"link {image.rootfs} -> {paths.base}: {exc}") from exc
        if paths.base.exists():
            backing = Path(paths.base.name)  # relative: resolved next to disk.qcow2
        tmp = paths.directory / ".disk.qcow2.tmp"
        proc = subprocess.run(
            [self._qemu_img(), "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing), str(tmp)],
            capture_output=True,
            text=True,
            cwd=paths.directory,
            check=False,
            timeout=60,
        )
        if proc.returncode != 0:
            raise DriverError(log_detail=f"qemu-img create failed: {proc.stderr.strip()}")
        os.replace(tmp, paths.disk)
        return str(backing)

    def _launch(self, spec: VmSpec, paths: _Paths, kernel: Path, initrd: Path, image_info: dict[str, Any],
                *, config: bytes | None = None, incoming: bool = False, migrates: bool = False,
                cmdline_extra: str = "") -> BootInfo:
        """Start QEMU for ``spec``: a boot, or with ``incoming`` a QEMU waiting for
        ``migrate-incoming`` (a restore; returns as soon as QMP answers). ``config``: the config
        disk's bytes when they are not ``spec``'s own document (templates, restores).

        ``migrates``: this QEMU saves or loads its state (a template, a restore). QEMU then opens
        its images again after dropping to the VM's uid (it inactivates them at the end of a save
        and activates them at the end of a load), so ``disk.qcow2`` belongs to that uid,
        ``config.img`` is readable by its group (0640) and the directory lets the group in (0710);
        a booted VM's QEMU opens its files as root before it drops."""
        if len(str(paths.qmp)) > MAX_SOCKET_PATH:
            raise DriverError(
                "The VM directory path is too long for QEMU's control socket; use a shorter data directory.",
                log_detail=str(paths.qmp),
            )
        for path in (kernel, initrd):
            if not path.is_file():
                raise ImageMissing(f"The guest kernel file {path.name} is missing; run 'remotecli images build'.")
        accel = self.accel(kernel)
        record = host.read_json_object(paths.record)
        previous = record.get("port")
        host.write_private_file(paths.config, config if config is not None else host.config_disk(spec).encode())
        # Before every launch: the rules are replaced atomically, so a flushed ruleset comes back.
        confined = confinement.confine(self.settings)
        # One uid per VM (kept across its boots): no QEMU can signal or ptrace another VM's.
        user = (confinement.allocate_uid(self.settings.vms_dir, paths.directory, spec.vm_type, confined.uids)
                if confined.uids is not None else None)
        if migrates and user is not None:
            os.chown(paths.disk, user.uid, user.gid)
            # The config disk too (read-only): this QEMU serves its content to its guest anyway.
            os.chown(paths.config, os.geteuid(), user.gid)
            os.chmod(paths.config, 0o640)
            os.chown(paths.directory, os.geteuid(), user.gid)
            os.chmod(paths.directory, 0o710)
            _traversable(paths.directory.parent)
        attempts = TCG_BOOT_ATTEMPTS if accel == "tcg" and not incoming else 1
        for attempt in range(1, attempts + 1):
            pid, port, argv = self._spawn(spec, paths, kernel, initrd, accel, previous, user, incoming,
                                          cmdline_extra)
            new_record = {
                "vm_id": spec.vm_id,
                "vm_type": spec.vm_type,
                "driver": self.name,
                "pid": pid,
                "port": port,
                "endpoint": f"tcp://127.0.0.1:{port}",
                "accel": accel,
                "qemu_uid": user.uid if user else None,
                "qemu_gid": user.gid if user else None,
                "guest_network_isolation": confined.firewall,
                "vcpus": spec.vcpus,
                "memory_mib": spec.memory_mib,
                "image": image_info,
                "argv": argv,  # no secret: the secret is only in config.img
                "created_at": record.get("created_at", time.time()),
                "started_at": time.time(),
                "boot_attempts": attempt,
            }
            host.write_private_file(paths.record, (json.dumps(new_record, indent=2) + "\n").encode())
            if accel != "tcg" or incoming:
                return BootInfo(endpoint=f"tcp://127.0.0.1:{port}", pid=pid, accel=accel)
            outcome = self._wait_early_boot(paths, pid)
            if outcome == "started":
                return BootInfo(endpoint=f"tcp://127.0.0.1:{port}", pid=pid, accel=accel)
            detail = f"{_tail(paths.qemu_log)}\n--- console ---\n{_tail(paths.console)}"
            if outcome == "exited":
                # Rare under TCG on a loaded host (about 1 boot in 50 in a full test run; no seccomp
                # kill, nothing on QEMU's stderr): a fresh QEMU boots fine, so it is retried too.
                log.warning("QEMU exited during the guest's early boot (attempt %d of %d); booting again",
                            attempt, attempts, extra={"vm_id": spec.vm_id, "detail": detail[-2000:]})
                if attempt == attempts:
                    raise VmBootFailed("QEMU exited during the guest's early boot.", log_detail=detail)
            # The kernel stalled before the initramfs ran (lost timer tick under TCG): boot again.
            self._kill(pid, paths.directory)
            previous = port
        raise VmBootFailed(
            f"The guest kernel stalled in early boot {attempts} times under TCG.",
            log_detail=f"--- console ---\n{_tail(paths.console)}",
        )

    def _wait_early_boot(self, paths: _Paths, pid: int) -> str:
        """'started' once the initramfs printed its marker, 'stalled' if the kernel stays silent
        too long, 'exited' if QEMU is gone."""
        load_per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
        deadline = time.monotonic() + EARLY_BOOT_TIMEOUT * max(1.0, load_per_core)
        while time.monotonic() < deadline:
            try:
                with open(paths.console, "rb") as handle:
                    if INITRAMFS_MARKER in handle.read(256 * 1024):
                        return "started"
            except OSError:
                pass
            if not _is_vm_process(pid, paths.directory):
                return "exited"
            time.sleep(0.05)
        return "stalled"

    def _spawn(
        self,
        spec: VmSpec,
        paths: _Paths,
        kernel: Path,
        initrd: Path,
        accel: str,
        previous: object,
        user: confinement.QemuUser | None = None,
        incoming: bool = False,
        cmdline_extra: str = "",
    ) -> tuple[int, int, list[str]]:
        """Start QEMU (retrying on a port collision) and wait for QMP. Returns (pid, port, argv)."""
        last_error = ""
        for attempt in range(PORT_ATTEMPTS):
            reuse = attempt == 0 and isinstance(previous, int) and _port_free(previous)
            port = int(previous) if reuse and isinstance(previous, int) else _free_port()
            argv = self._argv(spec, paths, kernel, initrd, accel, port, user, incoming, cmdline_extra)
            for stale in (paths.qmp, paths.pidfile):
                stale.unlink(missing_ok=True)
            if paths.console.exists():
                os.replace(paths.console, paths.directory / "console.log.1")
            with open(paths.qemu_log, "wb") as log:
                try:
                    proc = subprocess.run(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        cwd=paths.directory,
                        start_new_session=True,
                        timeout=60,
                        check=False,
                    )
                except subprocess.TimeoutExpired as exc:
                    raise VmBootFailed(
                        "QEMU did not finish starting within 60 seconds.", log_detail=_tail(paths.qemu_log)
                    ) from exc
            errors = _tail(paths.qemu_log)
            if proc.returncode == 0:
                return self._wait_qmp(paths), port, argv
            last_error = errors
            if "forwarding" in errors or "in use" in errors:
                continue  # another process took the port between our check and QEMU's bind
            raise VmBootFailed(
                f"QEMU exited during start-up (exit {proc.returncode}).",
                log_detail=f"{errors}\n--- console ---\n{_tail(paths.console)}",
            )
        raise VmBootFailed("No free loopback port for the VM's agent.", log_detail=last_error)

    def _wait_qmp(self, paths: _Paths, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            pid = self._live_pid(paths)
            if pid is None and paths.pidfile.exists():
                raise VmBootFailed(
                    "QEMU exited right after start-up.",
                    log_detail=f"{_tail(paths.qemu_log)}\n--- console ---\n{_tail(paths.console)}",
                )
            if pid is not None:
                try:
                    qmp_execute(paths.qmp, "query-status", timeout=2.0)
                    return pid
                except (QmpUnavailable, QmpError) as exc:
                    last = str(exc)
            if time.monotonic() > deadline:
                if pid is not None:
                    self._kill(pid, paths.directory)
                raise VmBootFailed(
                    "QEMU started but its control socket did not answer.",
                    log_detail=f"{last}\n{_tail(paths.qemu_log)}\n--- console ---\n{_tail(paths.console)}",
                )
            time.sleep(0.05)

    def _image_for(self, spec: VmSpec) -> ImageRef:
        if spec.image is not None:
            return spec.image
        from remotecli import images

        return images.require(self.settings, spec.vm_type)

    def create(self, spec: VmSpec) -> BootInfo:
        paths = _Paths(spec.directory)
        if paths.directory.is_dir():
            pid = self._live_pid(paths)
            if pid is not None:
                return self._boot_info(paths, pid)
        image = self._image_for(spec)
        self.settings.vms_dir.mkdir(parents=True, exist_ok=True)
        paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(paths.directory, 0o700)
        with self._locked(paths):
            pid = self._live_pid(paths)
            if pid is not None:
                return self._boot_info(paths, pid)
            warning: str | None = None
            if not paths.disk.exists():
                ref, problem = self._fitting_snapshot(spec, image)
                if ref is not None:
                    try:
                        return self._restore(spec, paths, image, ref)
                    except (DriverError, AgentError, QmpError, QmpUnavailable, OSError) as exc:
                        detail = (exc.log_detail or exc.message) if isinstance(exc, DriverError | AgentError) \
                            else str(exc)
                        warning = f"Restoring from the {spec.vm_type} snapshot failed; booted cold instead"
                        log.warning("snapshot restore failed; booting cold", extra={
                            "vm_id": spec.vm_id, "snapshot": ref.key, "detail": str(detail)[-2000:]})
                        self._undo_restore(paths)
                elif problem is not None and problem != "missing":
                    warning = f"The {spec.vm_type} snapshot does not fit ({problem}); booted cold instead"
                    log.warning("snapshot does not fit; booting cold", extra={"vm_id": spec.vm_id,
                                                                              "detail": problem})
            backing = str(image.rootfs)
            if not paths.disk.exists():
                backing = self._prepare_disk(paths, image)
            info = {
                "kernel": str(image.kernel),
                "initrd": str(image.initrd),
                "rootfs": str(image.rootfs),
                "backing": backing,
                "hash": image.recipe_hash,
            }
            boot = self._launch(spec, paths, image.kernel, image.initrd, info)
            return dataclasses.replace(boot, warning=warning) if warning else boot

    # ---------------------------------------------------------------- snapshot restore (ADR 0012)

    def _snapshot_facts(self, image: ImageRef, vcpus: int, memory_mib: int) -> snapshot.Facts:
        accel = self.accel(image.kernel)
        if self._qemu_version is None:
            self._qemu_version = kvm_probe.qemu_version(self._qemu_binary())
        return snapshot.facts_for(image, qemu=self._qemu_version, machine=MACHINE, accel=accel,
                                  cpu="host" if accel == "kvm" else "max", vcpus=vcpus, memory_mib=memory_mib)

    def _fitting_snapshot(self, spec: VmSpec, image: ImageRef) -> tuple[SnapshotRef | None, str | None]:
        """The snapshot ``spec`` can be restored from, else (None, why not); VMs with a home volume
        are never restored (ADR 0012)."""
        if spec.home is not None or not snapshot.directory(self.settings, spec.vm_type).is_dir():
            return None, "missing"
        return snapshot.check(self.settings, self._snapshot_facts(image, spec.vcpus, spec.memory_mib))

    def _restore(self, spec: VmSpec, paths: _Paths, image: ImageRef, ref: SnapshotRef) -> BootInfo:
        """Restore ``spec`` from ``ref``: its own disk overlay over the template disk, its own config
        disk (secret, id, RNG seed), its own port; QEMU loads the saved state, the guest resumes,
        and the agent proves it took the new secret before this returns."""
        started = time.monotonic()
        snapshot.link_into(ref, paths.directory, TEMPLATE_DISK)
        tmp = paths.directory / ".disk.qcow2.tmp"
        proc = subprocess.run(
            [self._qemu_img(), "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", TEMPLATE_DISK, str(tmp)],
            capture_output=True, text=True, cwd=paths.directory, check=False, timeout=60,
        )
        if proc.returncode != 0:
            raise DriverError(log_detail=f"qemu-img create failed: {proc.stderr.strip()}")
        os.replace(tmp, paths.disk)
        doc = host.config_disk(spec).model_dump(mode="json", exclude_none=True)
        # Fresh randomness for the guest's RNG (rekey.py mixes it in and reseeds) and the time.
        doc["restore_seed"] = os.urandom(64).hex()
        doc["restore_time"] = time.time()
        info = {"kernel": str(image.kernel), "initrd": str(image.initrd), "rootfs": str(image.rootfs),
                "backing": TEMPLATE_DISK, "hash": image.recipe_hash, "restored_from": ref.key}
        boot = self._launch(spec, paths, image.kernel, image.initrd, info, config=encode_config_disk(doc),
                            incoming=True, migrates=True)
        pid = boot.pid
        load_factor = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
        with open(ref.directory / snapshot.STATE_FILE, "rb") as state, QmpClient(paths.qmp, timeout=10.0) as qmp:
            qmp.execute("getfd", {"fdname": "snapshot"}, fds=[state.fileno()])
            qmp.execute("migrate-incoming", {"uri": "fd:snapshot"})
            self._wait_migration(qmp, paths, pid, RESTORE_LOAD_TIMEOUT * load_factor, "restore")
            qmp.execute("cont")  # the template was saved stopped, so the restored VM starts paused
        loaded = time.monotonic() - started
        client = self.agent_client(boot.endpoint, spec.agent_secret, timeout=5.0)
        try:
            health = client.wait_ready(RESTORE_AGENT_TIMEOUT * load_factor, poll_interval=0.05)
        finally:
            client.close()
        if health.vm_id != spec.vm_id:
            raise DriverError(log_detail=f"restored agent says vm_id {health.vm_id!r}")
        record = host.read_json_object(paths.record)
        record.update({"restored_from": ref.key, "restore_load_s": round(loaded, 3),
                       "restore_s": round(time.monotonic() - started, 3)})
        host.write_private_file(paths.record, (json.dumps(record, indent=2) + "\n").encode())
        log.info("restored from snapshot", extra={"vm_id": spec.vm_id, "snapshot": ref.key,
                                                  "duration_s": round(time.monotonic() - started, 3)})
        return dataclasses.replace(boot, restored=True)

    def _wait_migration(self, qmp: QmpClient, paths: _Paths, pid: int | None, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if pid is not None and not _is_vm_process(pid, paths.directory):
                raise DriverError(log_detail=f"QEMU exited during the {what}: {_tail(paths.qemu_log)}")
            info = qmp.execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise DriverError(log_detail=f"{what}: migration {status}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise DriverError(log_detail=f"{what}: migration still {status} after {timeout:.0f} s")
            time.sleep(0.05)

    def _undo_restore(self, paths: _Paths) -> None:
        """Back to an empty VM directory (cold boot next): no QEMU, no restored disk."""
        for pid in self._find_pids(paths.directory):
            with contextlib.suppress(DriverError):
                self._kill(pid, paths.directory)
        for name in (paths.disk, paths.directory / TEMPLATE_DISK, paths.qmp, paths.pidfile):
            name.unlink(missing_ok=True)

    def prepare_snapshot(self, vm_type: str) -> SnapshotRef | None:
        from remotecli import images

        image = images.require(self.settings, vm_type)
        vcpus, memory_mib = self.settings.vm_defaults(vm_type)
        facts = self._snapshot_facts(image, vcpus, memory_mib)
        ref, _ = snapshot.check(self.settings, facts)
        if ref is not None:
            return ref
        with snapshot.build_lock(self.settings, vm_type, wait=True):
            ref, problem = snapshot.check(self.settings, facts)
            if ref is not None:
                return ref
            for leftover in snapshot.leftover_builds(self.settings):
                if leftover.name.startswith((f".build-{vm_type}-", f".old-{vm_type}-")):
                    for pid in self._find_pids(leftover):
                        self._kill(pid, leftover)
                    shutil.rmtree(leftover, ignore_errors=True)
            log.info("building a VM snapshot", extra={"vm_type": vm_type, "reason": problem, "key": facts.key})
            return self._build_snapshot(image, facts, vcpus, memory_mib)

    def _build_snapshot(self, image: ImageRef, facts: snapshot.Facts, vcpus: int, memory_mib: int) -> SnapshotRef:
        """Boot a template VM (config disk without a secret), wait until its agent says it is
        ready, save it with migration to a file, keep its disk. Raises ``DriverError``."""
        started = time.monotonic()
        build = snapshot.root(self.settings) / f".build-{facts.vm_type}-{os.urandom(4).hex()}"
        build.mkdir(mode=0o700, parents=True)
        paths = _Paths(build)
        spec = VmSpec(vm_id=f"snapshot-{facts.vm_type}", vm_type=facts.vm_type, vcpus=vcpus, memory_mib=memory_mib,
                      directory=build, agent_secret="", image=image)
        pid: int | None = None
        try:
            self._prepare_disk(paths, image)
            doc = host.config_disk(spec).model_dump(mode="json", exclude_none=True)
            doc.update({"agent_secret": "", "template": True})
            info = {"kernel": str(image.kernel), "initrd": str(image.initrd), "rootfs": str(image.rootfs),
                    "backing": snapshot.BASE_FILE, "hash": image.recipe_hash, "template": facts.key}
            with self._locked(paths):
                boot = self._launch(spec, paths, image.kernel, image.initrd, info, config=encode_config_disk(doc),
                                    migrates=True, cmdline_extra=TEMPLATE_CMDLINE)
            pid = boot.pid
            load_factor = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
            deadline = time.monotonic() + TEMPLATE_READY_TIMEOUT * load_factor
            while True:
                try:
                    if snapshot.TEMPLATE_READY in paths.console.read_bytes():
                        break
                except OSError:
                    pass
                if pid is not None and not _is_vm_process(pid, paths.directory):
                    raise DriverError(log_detail=f"the template VM exited: {_tail(paths.console)}")
                if time.monotonic() > deadline:
                    raise DriverError(log_detail=f"the template VM was not ready in time: {_tail(paths.console)}")
                time.sleep(0.2)
            warmed = b'"warmed":true' in paths.console.read_bytes()
            state_path = build / snapshot.STATE_FILE
            with QmpClient(paths.qmp, timeout=30.0) as qmp:
                qmp.execute("stop")
                qmp.execute("migrate-set-parameters", {"max-bandwidth": 64 * 1024**3})
                fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    qmp.execute("getfd", {"fdname": "snapshot"}, fds=[fd])
                finally:
                    os.close(fd)
                qmp.execute("migrate", {"uri": "fd:snapshot"})
                self._wait_migration(qmp, paths, pid, SAVE_TIMEOUT * load_factor, "save")
                with contextlib.suppress(QmpUnavailable, QmpError):
                    qmp.execute("quit")
            if pid is not None and not self._wait_gone(pid, paths.directory, 10.0):
                self._kill(pid, paths.directory)
            with open(state_path, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chown(paths.disk, os.geteuid(), os.getegid())
            os.chmod(paths.disk, 0o444)
            os.chmod(build, 0o700)
            for name in (paths.config, paths.qmp, paths.pidfile, paths.record, paths.lock, build / "qemu.uid",
                         build / "console.log.1"):
                name.unlink(missing_ok=True)
            snapshot.write_manifest(build, facts, build_s=time.monotonic() - started, warmed=warmed)
            final = snapshot.install(self.settings, build, facts.vm_type)
        except BaseException:
            for stray in self._find_pids(build):
                with contextlib.suppress(DriverError):
                    self._kill(stray, build)
            shutil.rmtree(build, ignore_errors=True)
            raise
        log.info("VM snapshot built", extra={"vm_type": facts.vm_type, "key": facts.key,
                                             "duration_s": round(time.monotonic() - started, 1), "warmed": warmed})
        return SnapshotRef(vm_type=facts.vm_type, key=facts.key, directory=final)

    def start(self, spec: VmSpec) -> BootInfo:
        paths = _Paths(spec.directory)
        if not paths.directory.is_dir():
            raise VmGone("The VM's directory is gone; it cannot be started again.")
        with self._locked(paths):
            pid = self._live_pid(paths)
            if pid is not None:
                return self._boot_info(paths, pid)
            if not paths.disk.exists():
                raise VmGone("The VM's disk is gone; it cannot be started again.")
            info = host.read_json_object(paths.record).get("image", {})
            info = dict(info) if isinstance(info, dict) else {}
            # Any kernel boots any rootfs (the modules live in the initramfs): prefer the current one.
            if spec.image is not None and spec.image.kernel.is_file() and spec.image.initrd.is_file():
                kernel, initrd = spec.image.kernel, spec.image.initrd
            elif info.get("kernel") and Path(str(info["kernel"])).is_file():
                kernel, initrd = Path(str(info["kernel"])), Path(str(info.get("initrd", "")))
            else:
                from remotecli import images

                ref = images.require(self.settings, spec.vm_type)
                kernel, initrd = ref.kernel, ref.initrd
            info.update({"kernel": str(kernel), "initrd": str(initrd)})
            return self._launch(spec, paths, kernel, initrd, info)

    # ---------------------------------------------------------------- control

    def stop(self, spec: VmSpec, timeout: float) -> None:
        paths = _Paths(spec.directory)
        if not paths.directory.is_dir():
            for orphan in self._find_pids(paths.directory):
                self._kill(orphan, paths.directory)
            return
        with self._locked(paths):
            pid = self._live_pid(paths)
            if pid is None:
                return
            try:
                status = qmp_execute(paths.qmp, "query-status", timeout=2.0)
                if isinstance(status, dict) and status.get("status") in ("paused", "suspended"):
                    qmp_execute(paths.qmp, "cont", timeout=2.0)
                # ACPI power button: /sbin/remotecli-init shuts the guest down and it powers off.
                qmp_execute(paths.qmp, "system_powerdown", timeout=2.0)
            except (QmpUnavailable, QmpError):
                pass
            if not self._wait_gone(pid, paths.directory, max(timeout, 0.0)):
                with contextlib.suppress(QmpUnavailable, QmpError):
                    qmp_execute(paths.qmp, "quit", timeout=2.0)
                if not self._wait_gone(pid, paths.directory, 3.0):
                    self._kill(pid, paths.directory)
            for stale in (paths.qmp, paths.pidfile):
                stale.unlink(missing_ok=True)

    def _qmp_control(self, spec: VmSpec, command: str) -> None:
        paths = _Paths(spec.directory)
        if not paths.directory.is_dir() or self._live_pid(paths) is None:
            raise VmGone("The VM is not running on this host.")
        try:
            qmp_execute(paths.qmp, command, timeout=5.0)
        except QmpError as exc:
            raise DriverError(log_detail=f"QMP {command}: {exc}") from exc
        except QmpUnavailable as exc:
            raise DriverError(
                "The VM's hypervisor did not answer; try again.", log_detail=f"QMP {command}: {exc}"
            ) from exc

    def pause(self, spec: VmSpec) -> None:
        self._qmp_control(spec, "stop")  # idempotent in QEMU: stopping a paused VM is a no-op

    def resume(self, spec: VmSpec) -> None:
        self._qmp_control(spec, "cont")

    def destroy(self, spec: VmSpec) -> None:
        paths = _Paths(spec.directory)
        pids = set(self._find_pids(paths.directory))
        if paths.directory.is_dir():
            with self._locked(paths):
                live = self._live_pid(paths)
                if live is not None:
                    pids.add(live)
                for pid in pids:
                    self._kill(pid, paths.directory)
                shutil.rmtree(paths.directory, ignore_errors=True)
        else:
            for pid in pids:
                self._kill(pid, paths.directory)
        if paths.directory.exists():
            shutil.rmtree(paths.directory)

    def fence(self, spec: VmSpec, timeout: float = 5.0) -> Inspection:
        """Kill any QEMU of this VM (its directory present or not) and prove none is left: DEAD only
        when no live QEMU process references the VM's directory any more (ADR 0011)."""
        if self._find_pids(spec.directory) or self._live_pid(_Paths(spec.directory)) is not None:
            self.stop(spec, timeout)
        left = self._find_pids(spec.directory)
        if left:
            return Inspection(Liveness.UNKNOWN, reason=f"QEMU process(es) {left} still run", details={"pids": left})
        return Inspection(Liveness.DEAD, reason="no QEMU process of the VM is left")

    def inspect(self, spec: VmSpec) -> Inspection:
        paths = _Paths(spec.directory)
        if not paths.directory.is_dir():
            return Inspection(Liveness.DEAD, reason="directory missing")
        pid = self._live_pid(paths)
        record = host.read_json_object(paths.record)
        details: dict[str, Any] = {
            "pid": pid,
            "port": record.get("port"),
            "accel": record.get("accel"),
            "image_hash": (record.get("image") or {}).get("hash") if isinstance(record.get("image"), dict) else None,
        }
        if pid is None:
            return Inspection(Liveness.DEAD, reason="process exited", details=details)
        try:
            status = qmp_execute(paths.qmp, "query-status", timeout=3.0)
        except QmpUnavailable as exc:
            details["error"] = str(exc)
            return Inspection(Liveness.UNKNOWN, reason="control socket unresponsive", details=details)
        except QmpError as exc:
            details["error"] = str(exc)
            return Inspection(Liveness.UNKNOWN, reason="control socket error", details=details)
        qmp_status = str(status.get("status", "")) if isinstance(status, dict) else ""
        details["qmp_status"] = qmp_status
        power = _POWER.get(qmp_status, PowerState.UNKNOWN)
        return Inspection(Liveness.ALIVE, reason=qmp_status or "running", power=power, details=details)

    def list_host_vms(self, vms_dir: Path) -> list[HostVm]:
        found: dict[str, HostVm] = {}
        if vms_dir.is_dir():
            for directory in sorted(p for p in vms_dir.iterdir() if p.is_dir()):
                paths = _Paths(directory)
                record = host.read_json_object(paths.record)
                port = record.get("port")
                found[directory.name] = HostVm(
                    vm_id=directory.name,
                    directory=directory,
                    pid=self._live_pid(paths),
                    ports=(port,) if isinstance(port, int) else (),
                )
        prefix = f"{vms_dir}/"
        for pid, argv in _qemu_processes():
            if host.gone_or_zombie(pid):
                continue
            for arg in argv:
                index = arg.find(prefix)
                if index < 0:
                    continue
                vm_id = arg[index + len(prefix) :].split("/", 1)[0].split(",", 1)[0]
                if not vm_id:
                    continue
                existing = found.get(vm_id)
                if existing is None:
                    found[vm_id] = HostVm(vm_id=vm_id, directory=None, pid=pid)
                elif existing.pid is None:
                    found[vm_id] = HostVm(vm_id, existing.directory, pid, existing.ports)
                break
        return sorted(found.values(), key=lambda vm: vm.vm_id)
