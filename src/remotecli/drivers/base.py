"""The VM driver interface: the only way remotecli touches a hypervisor.

Contract, for every implementation (``qemu``, ``firecracker``, ``fake``):

* **Synchronous and blocking.** Every call may block (spawning a process, QMP round trips, a
  graceful shutdown waits up to ``timeout``). Callers must not hold a database transaction open
  across a driver call; the services run them outside any session/transaction.
* **Idempotent.** Calling ``create``/``start`` for a VM whose hypervisor is already up returns its
  current ``BootInfo``; ``stop`` on a stopped VM, ``destroy`` on a destroyed or never-created VM,
  ``pause`` on a paused VM and ``resume`` on a running VM all succeed and do nothing.
* **The host is the truth.** ``inspect`` answers from the host (process, directory, control
  socket), never from the database. ``Liveness.DEAD`` means "certainly not running": the process
  is gone, or the directory is gone. ``Liveness.UNKNOWN`` means the driver could not tell (for
  example the control socket timed out while the process exists); callers treat it as "not proven
  alive" when selecting a VM for work, but the reconciler does not kill on a single UNKNOWN.
* **"Not found"** (no directory, no process for that VM id) is not an error for ``stop``,
  ``destroy`` and ``inspect``: it means there is nothing to do / ``DEAD`` with reason ``missing``.
  ``pause``, ``resume`` and ``start`` on a missing VM raise ``VmGone``.
* **Resources.** Everything a VM owns on the host lives in ``spec.directory`` (console log,
  control socket, pid file, disk overlay, config) plus the processes and loopback ports recorded
  there. ``destroy`` removes all of it. ``list_host_vms`` reports every VM the driver finds on the
  host, so the reconciler can find orphans that no database row owns.
* **Optional abilities** are declared in ``capabilities``; callers check them instead of guessing
  (``pause`` on a driver without it raises ``NotSupported``).
* **The guest agent.** ``agent_client`` is the one way to reach a VM's agent (httpx's transport
  pattern): the base returns the real ``AgentClient`` for the endpoint in ``BootInfo``; a driver
  whose guests are reached differently (the fake driver's in-process agent) overrides it.
* **Secrets.** ``spec.agent_secret`` reaches the guest through a channel that other local users and
  other VMs cannot read (a 0600 file in the VM directory, never a command-line argument). It must
  never appear in ``BootInfo``, ``Inspection`` details, exceptions or logs.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remotecli.agent.client import AgentClient
from remotecli.agent.protocol import GuestAgent
from remotecli.errors import DriverError


class Liveness(enum.StrEnum):
    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWN = "unknown"


class PowerState(enum.StrEnum):
    """What the hypervisor says the guest CPU is doing (only meaningful when ALIVE)."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ImageRef:
    """A built guest image: what the driver boots. Paths are read-only shared files."""

    vm_type: str
    kernel: Path
    initrd: Path
    rootfs: Path
    recipe_hash: str


@dataclass(frozen=True)
class HomeDisk:
    """A user's home volume, attached to a CLI VM as its third virtio disk (ADR 0011).

    The guest finds it by ``serial`` (or, where the hypervisor has no drive serials, as
    ``guest_device``), runs ``e2fsck -p`` and mounts it at ``mount_path`` before its agent starts.
    """

    volume_id: str
    location: str  # a file on the host for the qemu, firecracker and fake drivers
    mount_path: str = "/home/cli"
    serial: str = "rc-home"
    guest_device: str = "/dev/vdc"


@dataclass(frozen=True)
class VmSpec:
    """Everything a driver needs to create, boot, inspect or remove one VM."""

    vm_id: str
    vm_type: str
    vcpus: int
    memory_mib: int
    directory: Path
    agent_secret: str = field(repr=False)
    image: ImageRef | None = None
    # Guest port the agent listens on; the driver forwards a host loopback port to it.
    agent_guest_port: int = 7000
    # The user's home volume (CLI VMs); None: the home lives on the VM's own disk.
    home: HomeDisk | None = None

    def __repr__(self) -> str:  # never show the secret
        return f"VmSpec(vm_id={self.vm_id!r}, vm_type={self.vm_type!r}, directory={str(self.directory)!r})"


@dataclass(frozen=True)
class SnapshotRef:
    """A saved, booted VM of one type that new VMs of that type are restored from (ADR 0012)."""

    vm_type: str
    key: str  # hash of the image, hypervisor version and machine config the snapshot fits
    directory: Path


@dataclass(frozen=True)
class BootInfo:
    """What the controller records after a successful create/start."""

    endpoint: str  # how to reach the guest agent, e.g. "tcp://127.0.0.1:40123"
    pid: int | None = None
    accel: str | None = None  # "kvm", "tcg", or None when not applicable
    # Restored from a snapshot (ADR 0012) instead of booted; the agent already answers with the
    # VM's own secret when ``create`` returns.
    restored: bool = False
    # A restore was tried and failed, or the snapshot did not fit: the VM was booted cold instead.
    # Words for an event and the log, no secret.
    warning: str | None = None


@dataclass(frozen=True)
class Inspection:
    liveness: Liveness
    reason: str = ""  # short words: "process exited", "directory missing", ...
    power: PowerState = PowerState.UNKNOWN
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.liveness is Liveness.ALIVE


@dataclass(frozen=True)
class HostVm:
    """A VM the driver found on the host (directory and/or process), for orphan detection."""

    vm_id: str
    directory: Path | None
    pid: int | None
    ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class Capabilities:
    pause: bool = False
    snapshot: bool = False
    restart: bool = True  # stop then start again on the same disk
    guest_image: bool = True  # boots a built guest image: ``VmSpec.image`` must be given


@dataclass(frozen=True)
class HostResources:
    """What the host(s) a driver places VMs on hold in all (``services.capacity`` admits VMs
    against it after the operator's reserve and overcommit)."""

    memory_mib: int
    vcpus: int
    source: str  # in words, e.g. "/proc/meminfo and the CPU count of this host"


@dataclass(frozen=True)
class Availability:
    ok: bool
    detail: str
    facts: dict[str, str] = field(default_factory=dict)  # e.g. {"accel": "tcg", "qemu": "7.2.0"}


class VmGone(DriverError):
    code = "vm_gone"
    default_message = "The VM's resources on the host are gone."


class NotSupported(DriverError):
    code = "not_supported"
    http_status = 409
    default_message = "This VM driver does not support that action."


class VmDriver(abc.ABC):
    """One hypervisor backend. See the module docstring for the contract."""

    name: str = "abstract"
    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    def availability(self) -> Availability:
        """Can this driver run VMs on this host? Cheap after the first call (cached probes)."""

    def guest_confinement(self, *, repair: bool = False) -> Availability | None:
        """How this driver keeps guests off the host (its user, its network rules).

        ``ok`` is False when confinement the settings ask for is not in force. Without ``repair``
        nothing changes (``doctor``); with it, missing host rules are installed first (idempotent,
        well under a second; ``up`` and every reconciler pass). None: the driver does not say.
        """
        return None

    @abc.abstractmethod
    def create(self, spec: VmSpec) -> BootInfo:
        """Prepare ``spec.directory`` and boot the VM. Returns once the hypervisor process runs.

        Does not wait for the guest agent (the caller polls it). Raises ``VmBootFailed`` when the
        hypervisor exits during start-up, with the console's last lines in ``log_detail``.
        Idempotent: if the VM already runs, returns its BootInfo.
        """

    @abc.abstractmethod
    def start(self, spec: VmSpec) -> BootInfo:
        """Boot a stopped VM again on its existing disk. Raises ``VmGone`` if the directory is gone."""

    @abc.abstractmethod
    def stop(self, spec: VmSpec, timeout: float) -> None:
        """Graceful power-down, then kill after ``timeout`` seconds. Keeps the directory/disk."""

    @abc.abstractmethod
    def pause(self, spec: VmSpec) -> None:
        """Freeze the guest's CPUs (QMP ``stop``). Requires ``capabilities.pause``."""

    @abc.abstractmethod
    def resume(self, spec: VmSpec) -> None:
        """Unfreeze a paused guest (QMP ``cont``). Requires ``capabilities.pause``."""

    @abc.abstractmethod
    def destroy(self, spec: VmSpec) -> None:
        """Kill the hypervisor, release ports, remove the directory. Never fails on 'not found'."""

    @abc.abstractmethod
    def inspect(self, spec: VmSpec) -> Inspection:
        """Liveness from the host: process, directory, control socket. Never raises for 'not found'."""

    @abc.abstractmethod
    def list_host_vms(self, vms_dir: Path) -> list[HostVm]:
        """Every VM of this driver present on the host (directories under ``vms_dir``, processes)."""

    def prepare_snapshot(self, vm_type: str) -> SnapshotRef | None:
        """Make sure a snapshot for ``vm_type`` fits the current image and hypervisor, building it
        (blocking; a VM boots) when it is missing or stale. None: this driver restores nothing
        (``capabilities.snapshot`` is False). While one fits, ``create`` of that VM type restores
        from it and falls back to a cold boot (``BootInfo.warning``) when that fails."""
        return None

    def agent_client(self, endpoint: str, secret: str, *, timeout: float) -> GuestAgent:
        """A client of the guest agent at ``endpoint`` (``BootInfo.endpoint``), authenticated
        with ``secret``; ``timeout`` bounds each request. The caller closes it."""
        return AgentClient(endpoint, secret, timeout=timeout)

    # ---------------------------------------------------------------- home volumes (ADR 0011)

    def create_volume(self, location: str, size_bytes: int, owner_uid: int) -> None:
        """Make a new, empty ext4 home volume at ``location`` (a sparse file). Refuses to touch a
        volume that exists: raises ``DriverError`` instead of formatting over it."""
        from remotecli.drivers import volumes

        volumes.create_ext4_file(Path(location), size_bytes, owner_uid=owner_uid)

    def volume_problem(self, location: str) -> str | None:
        """None when the volume at ``location`` can be attached; else why not, in words."""
        from remotecli.drivers import volumes

        return volumes.file_problem(Path(location))

    def delete_volume(self, location: str) -> None:
        """Remove a volume for good (operator purge only). Idempotent."""
        Path(location).unlink(missing_ok=True)

    def volume_usage(self, location: str) -> tuple[int, int] | None:
        """(bytes allocated on the host, size) of a volume, or None when it cannot be read."""
        from remotecli.drivers import volumes

        return volumes.file_usage(Path(location))

    def fence(self, spec: VmSpec, timeout: float = 5.0) -> Inspection:
        """Make sure no hypervisor process of this VM runs any more, and prove it from the host.

        Kills the process if it still runs (whether or not its directory still exists), then
        inspects. Only ``Liveness.DEAD`` is a proof; a volume moves to another VM only after it.
        """
        self.stop(spec, timeout)
        return self.inspect(spec)

    # ---------------------------------------------------------------- reads of a VM's state
    # Everything the controller reads about one VM's state goes through these, never through
    # ``spec.directory`` directly: the defaults read the controller's own disk (the qemu,
    # firecracker and fake drivers keep each VM in ``spec.directory`` there); a driver whose VMs
    # live on other hosts (Incus) answers from there.

    def console_tail(self, spec: VmSpec, lines: int = 40) -> str:
        """The last lines of the guest console, or '' when there is none."""
        path = spec.directory / "console.log"
        try:
            data = path.read_bytes()[-64 * 1024 :]
        except OSError:
            return ""
        text = data.decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def console_log(self, spec: VmSpec) -> str | None:
        """The whole guest console log of the current boot, or None when the VM has none."""
        try:
            return (spec.directory / "console.log").read_text(errors="replace")
        except FileNotFoundError:
            return None

    def has_state(self, spec: VmSpec) -> bool:
        """Does the VM's state on its host (directory, disk) still exist? False once it is gone:
        such a VM can never be started again."""
        return spec.directory.is_dir()

    def watch_events(self, wake: Callable[[], None]) -> Callable[[], None] | None:
        """Follow the hypervisor's events (if it has a stream) and call ``wake`` when a VM changes,
        so the reconciler looks at once. Returns the function that stops following, or None: the
        reconciler's interval is all there is (the local drivers)."""
        return None

    def host_resources(self) -> HostResources:
        """The memory and CPUs of the host this driver runs VMs on (this machine by default)."""
        from remotecli.drivers import host

        return host.local_resources()
