"""The Firecracker VM driver: one ``firecracker`` process per VM, configured over its API socket.

Layout of ``spec.directory`` (without the jailer)::

    firecracker.sock   API socket (``--api-sock``)
    vsock.sock         host end of the guest's virtio-vsock device; the agent endpoint
    console.log        the guest serial console (Firecracker writes it to its stdout)
    firecracker.log    Firecracker's own log (``PUT /logger``), metrics.json (``PUT /metrics``)
    fc.pid             pid of the firecracker process
    rootfs.ext4        the VM's writable root disk (reflink/sparse copy of the image's rootfs)
    config.img         the config disk (vdb): NUL-terminated JSON with the agent secret, 0600
    vm.json            what the driver booted (no secret)

With the jailer, Firecracker runs chrooted in ``<dir>/jail/<exec name>/<fc id>/root``; the API and
vsock sockets and Firecracker's log live there, and the disks, kernel and initrd are hard-linked
(or copied) in. Nothing secret is ever on a command line: the secret only reaches ``config.img``.

See docs/decisions/0004-firecracker-driver.md for the design, what was tested and what was not.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remotecli.agent.protocol import CONFIG_DISK_FILE
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
    VmDriver,
    VmGone,
    VmSpec,
)
from remotecli.drivers.firecracker import vsock
from remotecli.drivers.firecracker.api import (
    REDACTED,
    FirecrackerApi,
    FirecrackerApiError,
    FirecrackerUnreachable,
)
from remotecli.errors import DriverError, ImageMissing, VmBootFailed

log = logging.getLogger(__name__)

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
GUEST_CID = 3  # Firecracker's vsock is per-VM (backed by a host UDS): every VM may use CID 3.
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
_META = "vm.json"
_PID = "fc.pid"
_API_SOCK = "firecracker.sock"
_VSOCK = "vsock.sock"


@dataclass(frozen=True)
class JailerConfig:
    """Run Firecracker through the jailer (requires root). See Firecracker's docs/jailer.md."""

    uid: int
    gid: int
    binary: str = "jailer"
    # Network namespace to join, e.g. "/var/run/netns/{fc_id}"; "{fc_id}"/"{vm_id}" are expanded.
    netns: str | None = None


@dataclass(frozen=True)
class _Layout:
    directory: Path
    root: Path  # the directory Firecracker sees its files in (the chroot root when jailed)
    jailed: bool
    fc_id: str

    @property
    def api_socket(self) -> Path:
        return self.root / _API_SOCK

    @property
    def vsock(self) -> Path:
        return self.root / _VSOCK

    @property
    def fc_log(self) -> Path:
        return self.root / "firecracker.log"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def console(self) -> Path:
        return self.directory / "console.log"

    @property
    def pid_file(self) -> Path:
        return self.directory / _PID

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs.ext4"

    @property
    def config(self) -> Path:
        return self.directory / CONFIG_DISK_FILE

    @property
    def meta(self) -> Path:
        return self.directory / _META

    def vm_path(self, host_path: Path) -> str:
        """The path Firecracker must be given for a file (chroot-relative when jailed)."""
        if not self.jailed:
            return str(host_path)
        return "/" + str(host_path.relative_to(self.root))


def firecracker_id(vm_id: str) -> str:
    """Firecracker's ``--id`` (and the jailer's): alphanumerics and hyphens, at most 64 chars."""
    cleaned = re.sub(r"[^A-Za-z0-9-]", "-", vm_id)[:64]
    return cleaned or "vm"


def tap_name(vm_id: str, prefix: str = "fc") -> str:
    """A stable TAP device name for a VM (Linux limits interface names to 15 characters)."""
    digest = hashlib.sha256(vm_id.encode()).hexdigest()
    return (prefix + digest)[:15]


def guest_mac(vm_id: str) -> str:
    """A stable, locally administered unicast MAC for the VM's eth0."""
    digest = hashlib.sha256(b"mac:" + vm_id.encode()).digest()
    return "06:00:" + ":".join(f"{b:02x}" for b in digest[:4])


def boot_args(vm_type: str) -> str:
    """The contract's kernel command line plus what Firecracker needs.

    ``reboot=k`` makes a guest reboot exit Firecracker (keyboard-controller reset), ``pci=off``
    because Firecracker has only virtio-mmio devices (it appends their ``virtio_mmio.device=``
    parameters itself), ``i8042.*`` skip slow probing of the i8042 used by ``SendCtrlAltDel``.
    """
    return (
        f"console=ttyS0 root=/dev/vda rw panic=-1 quiet remotecli.vm_type={vm_type} "
        "reboot=k pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
    )


def config_disk(spec: VmSpec) -> bytes:
    """The config disk's bytes: the same contract as every driver's (``agent.protocol.ConfigDisk``),
    with ``agent_vsock_port``: under Firecracker the host reaches the agent over vsock on that port
    (see ADR 0004); agents that do not know the key ignore it.
    """
    return host.config_disk(spec, vsock_port=spec.agent_guest_port).encode()


def _arg_value(argv: list[str], name: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def _has_id(argv: list[str], fc_id: str) -> bool:
    for index, arg in enumerate(argv):
        if arg == f"--id={fc_id}":
            return True
        if arg == "--id" and index + 1 < len(argv) and argv[index + 1] == fc_id:
            return True
    return False


class FirecrackerDriver(VmDriver):
    """VMs as Firecracker microVMs. Synchronous; idempotent; see ``drivers.base``."""

    name = "firecracker"
    # restart: Firecracker cannot reboot a process; ``start`` boots a fresh process on the same disk.
    capabilities = Capabilities(pause=True, snapshot=True, restart=True)

    def __init__(
        self,
        settings: Settings,
        binary: str = "firecracker",
        jailer: JailerConfig | None = None,
        *,
        network: bool = True,
        tap_prefix: str = "fc",
        kvm_device: Path = Path("/dev/kvm"),
        api_timeout: float = 5.0,
        startup_timeout: float = 10.0,
    ) -> None:
        self.settings = settings
        self.binary = binary
        self.jailer = jailer
        self.network = network
        self.tap_prefix = tap_prefix
        self.kvm_device = kvm_device
        self.api_timeout = api_timeout
        self.startup_timeout = startup_timeout
        self._availability: Availability | None = None
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- availability --------------------------------------------------------------------------

    def availability(self) -> Availability:
        if self._availability is None:
            self._availability = self._probe()
        return self._availability

    def _probe(self) -> Availability:
        facts: dict[str, str] = {}
        problems: list[str] = []
        path = shutil.which(self.binary)
        if path is None:
            problems.append(
                f"the '{self.binary}' binary is not on PATH (install a Firecracker release: "
                "firecracker and jailer from github.com/firecracker-microvm/firecracker/releases)"
            )
        else:
            facts["firecracker"] = path
            version = self._version(path)
            if version:
                facts["version"] = version
        kvm_problem = self._kvm_problem()
        if kvm_problem:
            problems.append(kvm_problem)
        else:
            facts["accel"] = "kvm"
        if self.jailer is not None:
            if shutil.which(self.jailer.binary) is None:
                problems.append(f"the jailer binary '{self.jailer.binary}' is not on PATH")
            if os.geteuid() != 0:
                problems.append("the jailer needs root (the controller is not running as root)")
        if problems:
            return Availability(
                ok=False, detail="Firecracker cannot run here: " + "; ".join(problems) + ".", facts=facts
            )
        return Availability(ok=True, detail="Firecracker and KVM are usable.", facts=facts)

    def _kvm_problem(self) -> str | None:
        try:
            fd = os.open(self.kvm_device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return f"{self.kvm_device} does not exist (no KVM: Firecracker needs hardware virtualization)"
        except PermissionError:
            return f"{self.kvm_device} is not readable and writable by this user (add it to the 'kvm' group)"
        except OSError as exc:
            return f"{self.kvm_device} cannot be opened ({exc.strerror})"
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        except OSError as exc:
            return f"{self.kvm_device} does not answer KVM_GET_API_VERSION ({exc.strerror})"
        finally:
            os.close(fd)
        if version != KVM_API_VERSION:
            return f"{self.kvm_device} reports KVM API version {version}, expected {KVM_API_VERSION}"
        return None

    @staticmethod
    def _version(path: str) -> str | None:
        try:
            done = subprocess.run([path, "--version"], capture_output=True, timeout=5, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        first = done.stdout.decode("utf-8", "replace").strip().splitlines()[:1]
        return first[0][:80] if first else None

    # -- helpers -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, vm_id: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(vm_id, threading.RLock())
        with lock:
            self._reap()
            yield

    def _layout(self, spec: VmSpec) -> _Layout:
        return self._layout_for(spec.directory, firecracker_id(spec.vm_id), self.jailer is not None)

    def _layout_for(self, directory: Path, fc_id: str, jailed: bool) -> _Layout:
        if not jailed:
            return _Layout(directory, directory, False, fc_id)
        root = directory / "jail" / Path(self.binary).name / fc_id / "root"
        return _Layout(directory, root, True, fc_id)

    def _api(self, layout: _Layout, spec: VmSpec, timeout: float | None = None) -> FirecrackerApi:
        return FirecrackerApi(
            layout.api_socket,
            timeout=self.api_timeout if timeout is None else timeout,
            redact=(spec.agent_secret,),
        )

    def _gone(self, pid: int) -> bool:
        """Has process ``pid`` exited (reaping it if it is our child or a zombie)?"""
        child = self._children.get(pid)
        if child is not None:
            if child.poll() is None:
                if not host.gone_or_zombie(pid):
                    return False
                # A zombie leader whose other threads are still exiting cannot be reaped yet.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=2)
            self._children.pop(pid, None)
            return True
        if host.gone_or_zombie(pid):
            host.reap(pid)
            return True
        return False

    def _reap(self) -> None:
        """Collect exit statuses of our children that ended (no zombies are left behind)."""
        for pid in list(self._children):
            self._gone(pid)

    @staticmethod
    def _owns(pid: int, layout: _Layout) -> bool:
        """Is ``pid`` the Firecracker of this VM directory (not a reused pid, not another host's VM)?"""
        argv = host.proc_cmdline(pid)
        if not _has_id(argv, layout.fc_id):
            return False
        if layout.jailed:  # jailed: "--api-sock /firecracker.sock" is chroot-relative; the id decides
            return True
        return _arg_value(argv, "--api-sock") == str(layout.api_socket)

    def _alive(self, pid: int, layout: _Layout) -> bool:
        """Is ``pid`` a live (not zombie) Firecracker process of this VM?"""
        return not self._gone(pid) and self._owns(pid, layout)

    def _running_pid(self, layout: _Layout) -> int | None:
        pid = host.read_pid(layout.pid_file)
        if pid is not None and self._alive(pid, layout):
            return pid
        return None

    def _find_pids(self, layout: _Layout) -> list[int]:
        """Every live process of this VM (also ones whose pid file is gone)."""
        return [pid for pid in host.other_pids() if self._owns(pid, layout) and not host.gone_or_zombie(pid)]

    def _read_meta(self, layout: _Layout) -> dict[str, Any]:
        return host.read_json_object(layout.meta)

    def _endpoint(self, layout: _Layout, spec: VmSpec) -> str:
        return vsock.make_endpoint(layout.vsock, spec.agent_guest_port)

    def _boot_info(self, layout: _Layout, spec: VmSpec, pid: int) -> BootInfo:
        return BootInfo(endpoint=self._endpoint(layout, spec), pid=pid, accel="kvm")

    def _redact(self, text: str, spec: VmSpec) -> str:
        return text.replace(spec.agent_secret, REDACTED) if spec.agent_secret else text

    def _kill(self, pid: int, wait: float = 5.0) -> None:
        for sender in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                sender(pid, signal.SIGKILL)
        # Wait for the process itself to go (not just its cmdline: a dying process loses it early).
        child = self._children.pop(pid, None)
        if child is not None:
            try:
                child.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                self._children[pid] = child  # reaped later by _reap
            return
        deadline = time.monotonic() + wait
        while not self._gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- preparing the directory ---------------------------------------------------------------

    def _check_socket_paths(self, layout: _Layout) -> None:
        for path in (layout.api_socket, layout.vsock):
            if len(os.fsencode(path)) > _UNIX_PATH_MAX:
                raise DriverError(
                    "The VM directory's path is too long for a Unix socket; use a shorter data directory.",
                    log_detail=f"{path} is longer than {_UNIX_PATH_MAX} bytes",
                )

    def _prepare(self, spec: VmSpec, layout: _Layout, image: ImageRef) -> None:
        self._check_socket_paths(layout)
        spec.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(spec.directory, 0o700)
        if not layout.rootfs.exists():
            self._copy_rootfs(image.rootfs, layout.rootfs)
        host.write_private_file(layout.config, config_disk(spec))
        self._write_meta(spec, layout, image, pid=None)

    @staticmethod
    def _copy_rootfs(source: Path, target: Path) -> None:
        if not source.is_file():
            raise ImageMissing(log_detail=f"rootfs {source} is missing")
        tmp = target.with_name(target.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        cp = shutil.which("cp")
        try:
            if cp is not None:
                subprocess.run(
                    [cp, "--reflink=auto", "--sparse=always", str(source), str(tmp)],
                    check=True,
                    capture_output=True,
                    timeout=600,
                )
            else:
                shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o600)
        except (OSError, subprocess.SubprocessError) as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            detail = (
                exc.stderr.decode("utf-8", "replace") if isinstance(exc, subprocess.CalledProcessError) else str(exc)
            )
            raise DriverError("Could not create the VM's disk.", log_detail=f"copy {source}: {detail}") from None
        os.replace(tmp, target)

    def _write_meta(self, spec: VmSpec, layout: _Layout, image: ImageRef, pid: int | None) -> None:
        meta = {
            "driver": self.name,
            "vm_id": spec.vm_id,
            "vm_type": spec.vm_type,
            "fc_id": layout.fc_id,
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            "base_rootfs": str(image.rootfs),
            "recipe_hash": image.recipe_hash,
            "tap": tap_name(spec.vm_id, self.tap_prefix) if self.network else None,
            "guest_mac": guest_mac(spec.vm_id) if self.network else None,
            "endpoint": self._endpoint(layout, spec),
            "jailed": layout.jailed,
            "pid": pid,
        }
        host.write_private_file(layout.meta, (json.dumps(meta, indent=2) + "\n").encode())

    def _image_from_meta(self, spec: VmSpec, layout: _Layout) -> ImageRef:
        if spec.image is not None:
            return spec.image
        meta = self._read_meta(layout)
        try:
            return ImageRef(
                vm_type=str(meta.get("vm_type", spec.vm_type)),
                kernel=Path(meta["kernel"]),
                initrd=Path(meta["initrd"]),
                rootfs=Path(meta["base_rootfs"]),
                recipe_hash=str(meta.get("recipe_hash", "")),
            )
        except KeyError:
            raise ImageMissing(log_detail=f"{layout.meta} does not record the VM's kernel") from None

    @staticmethod
    def _kernel(image: ImageRef) -> Path:
        """Firecracker on x86_64 boots an uncompressed ELF ``vmlinux``; prefer one next to vmlinuz."""
        vmlinux = image.kernel.with_name("vmlinux")
        return vmlinux if vmlinux.is_file() else image.kernel

    def _stage_jail(self, layout: _Layout, kernel: Path, initrd: Path) -> tuple[Path, Path, Path, Path]:
        """Hard-link (or copy) what Firecracker opens into the chroot; returns host paths inside it."""
        assert self.jailer is not None
        layout.root.mkdir(parents=True, exist_ok=True)
        staged = []
        for source, name in (
            (kernel, "vmlinux"),
            (initrd, "initrd.img"),
            (layout.rootfs, "rootfs.ext4"),
            (layout.config, CONFIG_DISK_FILE),
        ):
            target = layout.root / name
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            try:
                os.link(source, target)
            except OSError:
                if name in ("rootfs.ext4", CONFIG_DISK_FILE):
                    raise DriverError(
                        "The VM's disks must be on the same filesystem as its jail.",
                        log_detail=f"cannot hard-link {source} into {layout.root}",
                    ) from None
                shutil.copyfile(source, target)
            os.chown(target, self.jailer.uid, self.jailer.gid)
            staged.append(target)
        return staged[0], staged[1], staged[2], staged[3]

    def _stage_home(self, layout: _Layout, volume: Path) -> Path:
        """Hard-link the home volume into the chroot (owned by the jailer's user while it runs)."""
        assert self.jailer is not None
        target = layout.root / "home.ext4"
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        try:
            os.link(volume, target)
        except OSError:
            raise DriverError(
                "The workspace volume must be on the same filesystem as the VM's jail.",
                log_detail=f"cannot hard-link {volume} into {layout.root}",
            ) from None
        os.chown(target, self.jailer.uid, self.jailer.gid)
        return target

    # -- booting -------------------------------------------------------------------------------

    def command(self, spec: VmSpec) -> list[str]:
        """The argv that starts this VM's hypervisor (paths and ids only, never the secret)."""
        layout = self._layout(spec)
        if self.jailer is None:
            return [self.binary, "--api-sock", str(layout.api_socket), "--id", layout.fc_id]
        exec_file = shutil.which(self.binary) or self.binary
        argv = [
            self.jailer.binary,
            "--id",
            layout.fc_id,
            "--exec-file",
            str(Path(exec_file).resolve()),
            "--uid",
            str(self.jailer.uid),
            "--gid",
            str(self.jailer.gid),
            "--chroot-base-dir",
            str(spec.directory / "jail"),
        ]
        if self.jailer.netns:
            argv += ["--netns", self.jailer.netns.format(fc_id=layout.fc_id, vm_id=spec.vm_id)]
        return [*argv, "--", "--api-sock", "/" + _API_SOCK]

    def _boot(self, spec: VmSpec, layout: _Layout, image: ImageRef) -> BootInfo:
        kernel, initrd, rootfs, config = self._kernel(image), image.initrd, layout.rootfs, layout.config
        for path in (kernel, initrd):
            if not path.is_file():
                raise ImageMissing(log_detail=f"{path} is missing")
        home = Path(spec.home.location) if spec.home is not None else None
        if layout.jailed:
            kernel, initrd, rootfs, config = self._stage_jail(layout, kernel, initrd)
            if home is not None:
                home = self._stage_home(layout, home)
        for path in (layout.api_socket, layout.vsock, layout.pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for path in (layout.fc_log, layout.metrics):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600, exist_ok=True)
            if self.jailer is not None:
                os.chown(path, self.jailer.uid, self.jailer.gid)

        argv = self.command(spec)
        with open(layout.console, "ab") as console:
            os.chmod(layout.console, 0o600)
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    cwd=spec.directory,
                    env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise VmBootFailed(log_detail=f"cannot run {argv[0]}: {exc}") from None
        self._children[proc.pid] = proc
        layout.pid_file.write_text(f"{proc.pid}\n")
        log.info("firecracker for VM %s started, pid %d", spec.vm_id, proc.pid)
        try:
            api = self._wait_for_api(spec, layout, proc)
            with api:
                self._configure(api, spec, layout, kernel, initrd, rootfs, config, home)
                api.action("InstanceStart")
        except BaseException:
            self._kill(proc.pid)
            with contextlib.suppress(FileNotFoundError):
                layout.pid_file.unlink()
            raise
        self._write_meta(spec, layout, image, pid=proc.pid)
        return self._boot_info(layout, spec, proc.pid)

    def _wait_for_api(self, spec: VmSpec, layout: _Layout, proc: subprocess.Popen[bytes]) -> FirecrackerApi:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if proc.poll() is not None:
                self._children.pop(proc.pid, None)
                raise VmBootFailed(
                    log_detail=f"firecracker exited with status {proc.returncode} during start-up:\n"
                    + self._redact(self.console_tail(spec), spec)
                )
            if layout.api_socket.exists():
                with self._api(layout, spec, timeout=1.0) as probe:
                    try:
                        ready = probe.accepts_connections() and bool(probe.describe_instance())
                    except FirecrackerUnreachable:
                        ready = False
                if ready:
                    return self._api(layout, spec)
            if time.monotonic() > deadline:
                raise VmBootFailed(
                    log_detail=f"the API socket did not answer within {self.startup_timeout:.0f}s:\n"
                    + self._redact(self.console_tail(spec), spec)
                )
            time.sleep(0.01)

    def _configure(
        self,
        api: FirecrackerApi,
        spec: VmSpec,
        layout: _Layout,
        kernel: Path,
        initrd: Path,
        rootfs: Path,
        config: Path,
        home: Path | None = None,
    ) -> None:
        vm = layout.vm_path
        api.put_logger(vm(layout.fc_log), level="Warning")
        api.put_metrics(vm(layout.metrics))
        api.put_boot_source(vm(kernel), boot_args(spec.vm_type), vm(initrd))
        # The root device becomes /dev/vda, the next drive /dev/vdb (order of configuration).
        api.put_drive("rootfs", vm(rootfs), is_root_device=True, is_read_only=False)
        api.put_drive("config", vm(config), is_root_device=False, is_read_only=True)
        if home is not None:
            # The user's home volume (ADR 0011) becomes /dev/vdc; Firecracker drives have no serial,
            # so the guest takes the device named in the config disk.
            api.put_drive("home", vm(home), is_root_device=False, is_read_only=False)
        api.put_machine_config(spec.vcpus, spec.memory_mib)
        if self.network:
            api.put_network_interface("eth0", tap_name(spec.vm_id, self.tap_prefix), guest_mac(spec.vm_id))
        api.put_vsock(GUEST_CID, vm(layout.vsock))

    # -- the contract --------------------------------------------------------------------------

    def create(self, spec: VmSpec) -> BootInfo:
        with self._lock(spec.vm_id):
            layout = self._layout(spec)
            pid = self._running_pid(layout)
            if pid is not None:
                return self._boot_info(layout, spec, pid)
            if spec.image is None:
                raise ImageMissing()
            self._prepare(spec, layout, spec.image)
            return self._boot(spec, layout, spec.image)

    def start(self, spec: VmSpec) -> BootInfo:
        with self._lock(spec.vm_id):
            layout = self._layout(spec)
            if not spec.directory.is_dir():
                raise VmGone()
            pid = self._running_pid(layout)
            if pid is not None:
                return self._boot_info(layout, spec, pid)
            if not layout.rootfs.is_file():
                raise VmGone("The VM's disk is gone.")
            image = self._image_from_meta(spec, layout)
            self._check_socket_paths(layout)
            host.write_private_file(layout.config, config_disk(spec))
            return self._boot(spec, layout, image)

    def stop(self, spec: VmSpec, timeout: float) -> None:
        with self._lock(spec.vm_id):
            layout = self._layout(spec)
            pid = self._running_pid(layout)
            if pid is not None:
                self._graceful_stop(spec, layout, pid, timeout)
            self._forget_process(layout)

    def _graceful_stop(self, spec: VmSpec, layout: _Layout, pid: int, timeout: float) -> None:
        try:
            with self._api(layout, spec, timeout=min(self.api_timeout, max(timeout, 0.1))) as api:
                if api.describe_instance().get("state") == "Paused":
                    api.patch_vm("Resumed")  # a paused guest cannot react to Ctrl-Alt-Del
                api.action("SendCtrlAltDel")
        except DriverError as exc:
            log.warning("VM %s: graceful stop request failed (%s); killing", spec.vm_id, exc.log_detail)
        else:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self._gone(pid):
                time.sleep(0.05)
        if not self._gone(pid):
            log.info("VM %s did not power off within %.0fs; killing firecracker", spec.vm_id, timeout)
            self._kill(pid)

    def _forget_process(self, layout: _Layout) -> None:
        for path in (layout.pid_file, layout.api_socket, layout.vsock):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _require_running(self, spec: VmSpec, layout: _Layout) -> None:
        if not spec.directory.is_dir():
            raise VmGone()
        if self._running_pid(layout) is None:
            raise VmGone("The VM's hypervisor process is not running.")

    def pause(self, spec: VmSpec) -> None:
        self._set_state(spec, "Paused")

    def resume(self, spec: VmSpec) -> None:
        self._set_state(spec, "Resumed")

    def _set_state(self, spec: VmSpec, target: str) -> None:
        with self._lock(spec.vm_id):
            layout = self._layout(spec)
            self._require_running(spec, layout)
            with self._api(layout, spec) as api:
                state = api.describe_instance().get("state")
                if state == "Not started":
                    raise DriverError("The VM's guest was never started.")
                if (state == "Paused") == (target == "Paused"):
                    return  # already there
                api.patch_vm(target)

    def snapshot(self, spec: VmSpec, name: str = "snapshot") -> tuple[Path, Path]:
        """Full snapshot into the VM directory: (vmstate file, memory file), both 0600.

        Pauses the guest for the duration (Firecracker requires it) and resumes it afterwards if it
        was running. The memory file holds the guest's RAM, secrets included: it stays in the VM
        directory and ``destroy`` removes it.
        """
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise DriverError("Invalid snapshot name.")
        with self._lock(spec.vm_id):
            layout = self._layout(spec)
            self._require_running(spec, layout)
            state_file, mem_file = layout.root / f"{name}.vmstate", layout.root / f"{name}.mem"
            with self._api(layout, spec, timeout=max(self.api_timeout, 120.0)) as api:
                was_running = api.describe_instance().get("state") == "Running"
                if was_running:
                    api.patch_vm("Paused")
                try:
                    api.create_snapshot(layout.vm_path(state_file), layout.vm_path(mem_file))
                finally:
                    if was_running:
                        api.patch_vm("Resumed")
            for path in (state_file, mem_file):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(path, 0o600)
            return state_file, mem_file

    def destroy(self, spec: VmSpec) -> None:
        with self._lock(spec.vm_id):
            layout = self._layout(spec)
            pids = set(self._find_pids(layout))
            recorded = self._running_pid(layout)
            if recorded is not None:
                pids.add(recorded)
            for pid in pids:
                self._kill(pid)
            try:
                shutil.rmtree(spec.directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise DriverError(
                    "Could not remove the VM's directory.", log_detail=f"{spec.directory}: {exc}"
                ) from None

    def inspect(self, spec: VmSpec) -> Inspection:
        self._reap()
        layout = self._layout(spec)
        if not spec.directory.is_dir():
            return Inspection(Liveness.DEAD, reason="directory missing")
        pid = host.read_pid(layout.pid_file)
        if pid is None:
            return Inspection(Liveness.DEAD, reason="no process")
        if not self._alive(pid, layout):
            return Inspection(Liveness.DEAD, reason="process exited", details={"pid": pid})
        details: dict[str, Any] = {"pid": pid}
        try:
            with self._api(layout, spec, timeout=min(self.api_timeout, 2.0)) as api:
                info = api.describe_instance()
        except DriverError as exc:
            reason = "API socket timed out" if getattr(exc, "timed_out", False) else "API socket does not answer"
            if isinstance(exc, FirecrackerApiError):
                reason = "API returned an error"
            return Inspection(Liveness.UNKNOWN, reason=reason, details=details)
        state = info.get("state")
        details.update({"state": state, "vmm_version": info.get("vmm_version")})
        if state == "Running":
            return Inspection(Liveness.ALIVE, reason="running", power=PowerState.RUNNING, details=details)
        if state == "Paused":
            return Inspection(Liveness.ALIVE, reason="paused", power=PowerState.PAUSED, details=details)
        return Inspection(Liveness.UNKNOWN, reason="hypervisor up, guest not started", details=details)

    def list_host_vms(self, vms_dir: Path) -> list[HostVm]:
        self._reap()
        found: dict[str, HostVm] = {}
        try:
            entries = sorted(vms_dir.iterdir())
        except OSError:
            entries = []
        for directory in entries:
            if not directory.is_dir():
                continue
            meta_path, pid_path = directory / _META, directory / _PID
            meta = host.read_json_object(meta_path)
            ours = meta.get("driver") == self.name or (directory / _API_SOCK).exists()
            if not ours and not meta and pid_path.exists():
                ours = True  # a pid file but no metadata: a half-created firecracker VM
            if not ours:
                continue
            vm_id = str(meta.get("vm_id") or directory.name)
            fc_id = str(meta.get("fc_id") or firecracker_id(vm_id))
            layout = self._layout_for(directory, fc_id, bool(meta.get("jailed", self.jailer is not None)))
            pid = host.read_pid(pid_path)
            alive = pid is not None and self._alive(pid, layout)
            found[vm_id] = HostVm(vm_id=vm_id, directory=directory, pid=pid if alive else None)
        for pid, vm_id in self._processes_under(vms_dir):
            current = found.get(vm_id)
            if current is None:
                found[vm_id] = HostVm(vm_id=vm_id, directory=None, pid=pid)
            elif current.pid is None:
                found[vm_id] = HostVm(vm_id=vm_id, directory=current.directory, pid=pid)
        return sorted(found.values(), key=lambda vm: vm.vm_id)

    def _processes_under(self, vms_dir: Path) -> Iterator[tuple[int, str]]:
        """(pid, vm_id) of firecracker processes whose API socket or chroot is under ``vms_dir``."""
        base = vms_dir.resolve() if vms_dir.exists() else vms_dir
        for pid in host.other_pids():
            argv = host.proc_cmdline(pid)
            if "--api-sock" not in argv or host.gone_or_zombie(pid):
                continue
            sock = argv[argv.index("--api-sock") + 1] if argv.index("--api-sock") + 1 < len(argv) else ""
            where = Path(sock)
            if not where.is_absolute() or where == Path("/" + _API_SOCK):
                with contextlib.suppress(OSError):  # jailed: Firecracker's root is its chroot
                    where = Path(os.readlink(f"/proc/{pid}/root")) / sock.lstrip("/")
            try:
                relative = where.relative_to(base)
            except ValueError:
                try:
                    relative = where.relative_to(vms_dir)
                except ValueError:
                    continue
            if relative.parts:
                yield pid, relative.parts[0]
