"""The Incus driver: each remotecli VM is one Incus instance named after the VM id, in an Incus
project of its own (``incus_project``), placed by Incus on a cluster member.

Here (no KVM or vhost_vsock on the members) each VM is a **container** that runs our QEMU
``microvm`` under TCG: the container is the VM's jail and cgroup (``limits.memory``/``limits.cpu``),
its init is ``launch.py`` (pushed with the VM's files), and when QEMU exits the container stops.
The QEMU command line is the qemu driver's. The guest agent is reached over TLS only: the
launcher terminates TLS with a per-VM certificate the controller made (its certificate is in the
instance's config, ``user.remotecli.agent_cert``, and is the one certificate the agent client
trusts) and forwards to QEMU's host forward on the container's loopback; an Incus ``proxy`` device
publishes that TLS port on the member's address. Incus VM instances (KVM members) are not built
yet: see docs/incus-operators-guide.md.

The controller talks to the Incus API over mutual TLS (``drivers.incus.client``). Inspect and list
come from the API; ``watch_events`` follows ``/1.0/events`` and wakes the reconciler.

Files in the container, under ``/var/lib/remotecli-vm``::

    launch.py, launch.json       the init and its settings (QEMU argv, ports; no secret)
    agent-tls.crt / .key         the VM's TLS certificate and key (0600)
    vm/config.img                the config disk with the agent secret (0600)
    vm/disk.qcow2                the writable overlay over images/<...>/rootfs.ext4
    vm/console.log, qemu.log     the guest console and QEMU's stderr
    images/                      the guest images (a read-only disk device from the member)
    home/home.ext4               the user's home (an Incus custom volume, when the VM has one)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from remotecli.agent.client import AgentClient
from remotecli.agent.protocol import GuestAgent
from remotecli.config import Settings
from remotecli.drivers import host
from remotecli.drivers.base import (
    Availability,
    BootInfo,
    Capabilities,
    HomeDisk,
    HostResources,
    HostVm,
    ImageRef,
    Inspection,
    Liveness,
    PowerState,
    VmDriver,
    VmGone,
    VmSpec,
)
from remotecli.drivers.incus import certs
from remotecli.drivers.incus.client import (
    Connection,
    EventWatcher,
    IncusClient,
    IncusError,
    IncusEvent,
    IncusNotFound,
    IncusUnreachable,
    Instance,
    Member,
)
from remotecli.drivers.qemu.driver import EARLY_BOOT_TIMEOUT, INITRAMFS_MARKER, TCG_BOOT_ATTEMPTS, QemuDriver, _Paths
from remotecli.errors import DriverError, DriverUnavailable, ImageMissing, VmBootFailed
from remotecli.logging import get_logger

log = get_logger("incus")

IN = "/var/lib/remotecli-vm"  # the VM's directory inside its container
HOSTFWD_PORT = 17000  # QEMU's host forward to the agent, on the container's loopback
TLS_PORT = 7443  # the launcher's TLS port in the container
QEMU_OVERHEAD_MIB = 384  # QEMU (TCG), the launcher: added to the guest's memory for the cgroup
CFG_CERT = "user.remotecli.agent_cert"
CFG_PORT = "user.remotecli.agent_port"
CFG_VM_TYPE = "user.remotecli.vm_type"
ENDPOINT_SCHEME = "incus"
VOLUME_PREFIX = "incus:"
_MEMBER_CACHE_S = 5.0
_PORT_ATTEMPTS = 6


def _port_for(vm_id: str, low: int, high: int, attempt: int) -> int:
    digest = hashlib.sha256(f"{vm_id}/{attempt}".encode()).digest()
    return low + int.from_bytes(digest[:4], "big") % (high - low + 1)


def volume_location(pool: str, name: str) -> str:
    """A home volume's ``location`` on this driver: ``incus:<pool>/<volume>``."""
    return f"{VOLUME_PREFIX}{pool}/{name}"


def parse_volume_location(location: str, default_pool: str = "default") -> tuple[str, str]:
    """(pool, volume name) of a home volume's ``location``: ``incus:<pool>/<name>``, or a volume
    file path as ``services.workspaces`` names them for the local drivers (``.../<volume-id>.ext4``),
    which maps to the custom volume ``home-<volume-id>`` in ``default_pool``."""
    if location.startswith(VOLUME_PREFIX):
        pool, _, name = location[len(VOLUME_PREFIX):].partition("/")
        if pool and name:
            return pool, name
    elif location and not location.endswith("/"):
        return default_pool, f"home-{Path(location).name.removesuffix('.ext4')}"
    raise DriverError(log_detail=f"not an Incus volume location: {location!r}")


class IncusDriver(VmDriver):
    name = "incus"
    capabilities = Capabilities(pause=True, snapshot=False, restart=True)

    def __init__(self, settings: Settings, *, client: IncusClient | None = None) -> None:
        self.settings = settings
        self._client = client
        self._project_ready = False
        self._members: tuple[float, dict[str, Member]] | None = None
        self._targets: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def _vol(self, location: str) -> tuple[str, str]:
        return parse_volume_location(location, self.settings.incus_storage_pool)

    # ---------------------------------------------------------------- connection

    def connection(self) -> Connection:
        s = self.settings
        if s.incus_url.startswith("unix:"):
            return Connection(url=s.incus_url, project=s.incus_project)
        cert_path, key_path = s.incus_client_cert_path, s.incus_client_key_path
        certs.ensure_client_cert(cert_path, key_path)
        server_pem = s.incus_server_cert.read_text() if s.incus_server_cert is not None else None
        return Connection(url=s.incus_url, project=s.incus_project, client_cert=cert_path, client_key=key_path,
                          server_cert_pem=server_pem)

    @property
    def client(self) -> IncusClient:
        with self._lock:
            if self._client is None:
                self._client = IncusClient(self.connection(), timeout=self.settings.incus_timeout_s)
            return self._client

    def _ready(self) -> IncusClient:
        client = self.client
        if not self._project_ready:
            client.ensure_project()
            self._project_ready = True
        return client

    def members(self, *, fresh: bool = False) -> dict[str, Member]:
        cached = self._members
        if not fresh and cached is not None and time.monotonic() - cached[0] < _MEMBER_CACHE_S:
            return cached[1]
        members = {m.name: m for m in self.client.members()}
        self._members = (time.monotonic(), members)
        return members

    def availability(self) -> Availability:
        try:
            server = self.client.server()
            members = self.members(fresh=True)
        except (IncusError, DriverUnavailable) as exc:
            why = exc.log_detail or exc.message
            return Availability(ok=False, detail=f"Incus API at {self.settings.incus_url}: {why}")
        auth = str(server.get("auth", ""))
        if auth != "trusted":
            return Availability(ok=False, detail="The Incus API does not trust this controller's client "
                                f"certificate ({self.settings.incus_client_cert_path}); add it to the trust store.")
        env = server.get("environment") or {}
        online = sum(1 for m in members.values() if m.online)
        facts = {"incus": str(env.get("server_version", "")), "members": str(len(members) or 1),
                 "online": str(online if members else 1), "instance_type": self.settings.incus_instance_type,
                 "accel": "tcg" if self.settings.incus_instance_type == "container" else "kvm"}
        return Availability(ok=True, detail=f"Incus {facts['incus']}, {facts['online']} of {facts['members']} "
                            f"member(s) online, VMs as {self.settings.incus_instance_type}s", facts=facts)

    def host_resources(self) -> HostResources:
        """Memory and CPUs of all online members (from ``/1.0/resources`` of each member)."""
        members = self.members()
        names = [m.name for m in members.values() if m.online] or [""]
        memory = cpus = 0
        for name in names:
            params = {"target": name} if name else None
            doc = self.client.get("/1.0/resources", params, project=False) or {}
            memory += int((doc.get("memory") or {}).get("total", 0)) // (1024 * 1024)
            cpus += int((doc.get("cpu") or {}).get("total", 0))
        return HostResources(memory_mib=memory, vcpus=cpus, source=f"the Incus resources of {len(names)} member(s)")

    # ---------------------------------------------------------------- boot

    def _image_for(self, spec: VmSpec) -> ImageRef:
        if spec.image is not None:
            return spec.image
        from remotecli import images

        return images.require(self.settings, spec.vm_type)

    def _in_images(self, path: Path) -> str:
        """Where an image file is inside the container (under the read-only images device)."""
        try:
            rel = path.resolve().relative_to(self.settings.images_dir.resolve())
        except ValueError:
            rel = Path(path.parent.name) / path.name
        return f"{IN}/images/{rel}"

    def _qemu_argv(self, spec: VmSpec, image: ImageRef) -> list[str]:
        """The qemu driver's command line, with paths inside the container, in the foreground."""
        qemu = QemuDriver(self.settings)
        home = replace(spec.home, location=f"{IN}/home/home.ext4") if spec.home is not None else None
        inner = replace(spec, directory=Path(f"{IN}/vm"), home=home)
        usr = self.settings.incus_runner_usr.rstrip("/")
        qemu._qemu_binary = lambda: f"{usr}/bin/qemu-system-x86_64"  # type: ignore[method-assign]
        argv = qemu._argv(inner, _Paths(Path(f"{IN}/vm")), Path(self._in_images(image.kernel)),
                          Path(self._in_images(image.initrd)), "tcg", HOSTFWD_PORT, None)
        argv = [arg for arg in argv if arg != "-daemonize"]
        firmware = ["-L", f"{usr}/share/qemu"] if usr != "/usr" else []
        return [*self._runner(argv[0]), *firmware, *argv[1:]]

    def _runner(self, binary: str) -> list[str]:
        """How the container runs ``binary`` of the runner's /usr (through the loader if set)."""
        return [*shlex.split(self.settings.incus_runner_loader), binary]

    def _init_cmd(self) -> str:
        usr = self.settings.incus_runner_usr.rstrip("/")
        return shlex.join(self._runner(f"{usr}/bin/python3")) + f" {IN}/launch.py"

    def _overlay(self, image: ImageRef) -> bytes:
        """A qcow2 overlay whose backing file is the rootfs inside the container (made here)."""
        qemu_img = shutil.which("qemu-img")
        if qemu_img is None:
            raise DriverUnavailable("qemu-img is not installed; install it with 'apt-get install qemu-utils'.")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "disk.qcow2"
            size = image.rootfs.stat().st_size
            proc = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-u",
                                   "-b", self._in_images(image.rootfs), str(out), str(size)],
                                  capture_output=True, text=True, timeout=60, check=False)
            if proc.returncode != 0:
                raise DriverError(log_detail=f"qemu-img create: {proc.stderr.strip()}")
            return out.read_bytes()

    def _devices(self, spec: VmSpec, port: int) -> dict[str, dict[str, str]]:
        s = self.settings
        devices: dict[str, dict[str, str]] = {
            "agent": {"type": "proxy", "listen": f"tcp:0.0.0.0:{port}", "connect": f"tcp:127.0.0.1:{TLS_PORT}",
                      "bind": "host"},
        }
        if s.incus_member_images_dir:
            devices["images"] = {"type": "disk", "source": s.incus_member_images_dir, "path": f"{IN}/images",
                                 "readonly": "true"}
        for index, pair in enumerate(p for p in s.incus_runner_disks.split(",") if p.strip()):
            inside, _, source = pair.partition("=")
            devices[f"runner{index}"] = {"type": "disk", "source": source.strip(), "path": inside.strip(),
                                         "readonly": "true"}
        if spec.home is not None:
            pool, name = self._vol(spec.home.location)
            devices["home"] = {"type": "disk", "pool": pool, "source": name, "path": f"{IN}/home"}
        return devices

    def _endpoint(self, spec: VmSpec) -> BootInfo:
        return BootInfo(endpoint=f"{ENDPOINT_SCHEME}://{spec.vm_id}", pid=None, accel="tcg")

    def _launch_config(self, spec: VmSpec, image: ImageRef, *, format_home: bool, owner_uid: int) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "vm_id": spec.vm_id,
            "argv": self._qemu_argv(spec, image),
            "hostfwd_port": HOSTFWD_PORT,
            "tls_port": TLS_PORT,
            "tcg": True,
            "attempts": TCG_BOOT_ATTEMPTS,
            "early_boot_timeout": EARLY_BOOT_TIMEOUT,
            "marker": INITRAMFS_MARKER.decode(),
            "mkfs": self._runner(f"{self.settings.incus_runner_usr.rstrip('/')}/sbin/mkfs.ext4"),
            "image_hash": image.recipe_hash,
        }
        if spec.home is not None:
            cfg["home"] = {"file": f"{IN}/home/home.ext4", "format": format_home,
                           "size_bytes": self._volume_size(spec.home), "owner_uid": owner_uid}
        return cfg

    def _volume_size(self, home: HomeDisk) -> int:
        pool, name = self._vol(home.location)
        try:
            doc = self.client.volume(pool, name)
        except IncusNotFound:
            raise VmGone(f"The home volume {name} is gone.") from None
        return int((doc.get("config") or {}).get("user.remotecli.size_bytes", "0") or 0)

    def _push_files(self, spec: VmSpec, image: ImageRef, pair: certs.CertPair) -> None:
        client = self.client
        name = spec.vm_id
        format_home, owner_uid = False, 0
        if spec.home is not None:
            pool, vol = self._vol(spec.home.location)
            vconf = (client.volume(pool, vol).get("config") or {})
            format_home = vconf.get("user.remotecli.formatted") != "true"
            owner_uid = int(vconf.get("user.remotecli.owner_uid", "0") or 0)
        client.make_dirs(name, f"{IN}/vm", mode=0o700)
        if not self.settings.incus_member_images_dir:
            for path in (image.kernel, image.initrd, image.rootfs):
                client.make_dirs(name, str(Path(self._in_images(path)).parent))
        launch = resources.files("remotecli.drivers.incus").joinpath("launch.py").read_bytes()
        client.push_file(name, f"{IN}/launch.py", launch, mode=0o700)
        cfg = self._launch_config(spec, image, format_home=format_home, owner_uid=owner_uid)
        client.push_file(name, f"{IN}/launch.json", json.dumps(cfg, indent=1).encode(), mode=0o600)
        client.push_file(name, f"{IN}/agent-tls.crt", pair.cert_pem.encode(), mode=0o644)
        client.push_file(name, f"{IN}/agent-tls.key", pair.key_pem.encode(), mode=0o600)
        client.push_file(name, f"{IN}/vm/config.img", host.config_disk(spec).encode(), mode=0o600)
        client.push_file(name, f"{IN}/vm/disk.qcow2", self._overlay(image), mode=0o600)
        if not self.settings.incus_member_images_dir:
            for path in (image.kernel, image.initrd, image.rootfs):
                client.push_file(name, self._in_images(path), path.read_bytes(), mode=0o644)

    def _record(self, spec: VmSpec, data: dict[str, Any]) -> None:
        """A small record in the controller's VM directory (no secret): which instance this is."""
        spec.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        host.write_private_file(spec.directory / "vm.json", (json.dumps(data, indent=2) + "\n").encode())

    def create(self, spec: VmSpec) -> BootInfo:
        if self.settings.incus_instance_type != "container":
            raise DriverUnavailable("Incus VM instances (KVM members) are not built yet; set "
                                    "incus_instance_type=container (docs/incus-operators-guide.md).")
        client = self._ready()
        try:
            current = client.instance(spec.vm_id)
        except IncusNotFound:
            current = None
        if current is not None:
            if current.status == "Running":
                return self._endpoint(spec)
            return self._start(spec, current)
        image = self._image_for(spec)
        for path in (image.kernel, image.initrd, image.rootfs):
            if not path.is_file():
                raise ImageMissing(f"The guest image file {path.name} is missing; run 'remotecli images build'.")
        pair = certs.make_self_signed(f"remotecli-vm-{spec.vm_id}", server=True, dns_names=(spec.vm_id,))
        low, high = self.settings.incus_agent_port_range
        port = _port_for(spec.vm_id, low, high, 0)
        body: dict[str, Any] = {
            "name": spec.vm_id,
            "type": "container",
            "source": {"type": "image", "alias": self.settings.incus_runner_image},
            "config": {
                "limits.memory": f"{spec.memory_mib + QEMU_OVERHEAD_MIB}MiB",
                "limits.cpu": str(spec.vcpus),
                "raw.lxc": f"lxc.init.cmd = {self._init_cmd()}",
                CFG_CERT: pair.cert_pem,
                CFG_PORT: str(port),
                CFG_VM_TYPE: spec.vm_type,
                "user.remotecli.image_hash": self._image_for(spec).recipe_hash,
            },
            "devices": self._devices(spec, port),
            "start": False,
        }
        usr = self.settings.incus_runner_usr.rstrip("/")
        if usr != "/usr":  # python3 and QEMU's modules (TCG is one in Debian's QEMU) from that /usr
            body["config"]["environment.PYTHONHOME"] = usr
            body["config"]["environment.QEMU_MODULE_DIR"] = f"{usr}/lib/x86_64-linux-gnu/qemu"
        target = None
        if spec.home is not None:
            target = self._volume_member(spec.home)
        client.create_instance(body, target=target)
        try:
            self._push_files(spec, image, pair)
        except Exception:
            with contextlib.suppress(IncusError):
                client.delete_instance(spec.vm_id)
            raise
        self._record(spec, {"vm_id": spec.vm_id, "driver": self.name, "instance": spec.vm_id,
                            "project": self.settings.incus_project, "created_at": time.time()})
        return self._start(spec, client.instance(spec.vm_id))

    def _volume_member(self, home: HomeDisk) -> str | None:
        pool, name = self._vol(home.location)
        location = str(self.client.volume(pool, name).get("location") or "")
        return location if location and location != "none" else None

    def _start(self, spec: VmSpec, instance: Instance) -> BootInfo:
        client = self.client
        low, high = self.settings.incus_agent_port_range
        for attempt in range(_PORT_ATTEMPTS):
            try:
                client.set_state(spec.vm_id, "start", timeout=60)
                break
            except IncusError as exc:
                detail = (exc.log_detail or "").lower()
                if "address already in use" not in detail or attempt == _PORT_ATTEMPTS - 1:
                    raise VmBootFailed("Incus could not start the VM's container.",
                                       log_detail=f"{exc.log_detail}\n{self.console_tail(spec)}") from None
                port = _port_for(spec.vm_id, low, high, attempt + 1)
                devices = {k: dict(v) for k, v in instance.devices.items()}
                devices["agent"]["listen"] = f"tcp:0.0.0.0:{port}"
                client.update_instance(spec.vm_id, {"devices": devices, "config": {CFG_PORT: str(port)}})
        if spec.home is not None:
            self._mark_formatted(spec.home)
        return self._endpoint(spec)

    def _mark_formatted(self, home: HomeDisk) -> None:
        pool, name = self._vol(home.location)
        with contextlib.suppress(IncusError):
            doc = self.client.volume(pool, name)
            if (doc.get("config") or {}).get("user.remotecli.formatted") != "true":
                self.client.request("PATCH", f"/1.0/storage-pools/{pool}/volumes/custom/{name}",
                                    body={"config": {"user.remotecli.formatted": "true"}})

    def start(self, spec: VmSpec) -> BootInfo:
        try:
            instance = self._ready().instance(spec.vm_id)
        except IncusNotFound:
            raise VmGone("The VM's instance is gone; it cannot be started again.") from None
        if instance.status == "Running":
            return self._endpoint(spec)
        if spec.agent_secret:  # the config disk is written again at every start (as the qemu driver does)
            self.client.push_file(spec.vm_id, f"{IN}/vm/config.img", host.config_disk(spec).encode(), mode=0o600)
        return self._start(spec, instance)

    # ---------------------------------------------------------------- control

    def stop(self, spec: VmSpec, timeout: float) -> None:
        client = self.client
        try:
            instance = client.instance(spec.vm_id)
        except IncusNotFound:
            return
        if instance.status == "Stopped":
            return
        if instance.status == "Frozen":
            with contextlib.suppress(IncusError):
                client.set_state(spec.vm_id, "unfreeze", timeout=10)
        try:
            client.set_state(spec.vm_id, "stop", timeout=max(timeout, 1.0))
        except IncusError:
            client.set_state(spec.vm_id, "stop", timeout=10, force=True)

    def pause(self, spec: VmSpec) -> None:
        self._control(spec, "freeze")

    def resume(self, spec: VmSpec) -> None:
        self._control(spec, "unfreeze")

    def _control(self, spec: VmSpec, action: str) -> None:
        try:
            instance = self.client.instance(spec.vm_id)
        except IncusNotFound:
            raise VmGone("The VM is not running on the cluster.") from None
        if instance.status == "Stopped":
            raise VmGone("The VM is not running on the cluster.")
        if instance.status == {"freeze": "Frozen", "unfreeze": "Running"}[action]:
            return
        self.client.set_state(spec.vm_id, action, timeout=10)

    def destroy(self, spec: VmSpec) -> None:
        client = self.client
        try:
            instance = client.instance(spec.vm_id)
        except IncusNotFound:
            instance = None
        if instance is not None:
            if instance.status != "Stopped":
                with contextlib.suppress(IncusNotFound):
                    client.set_state(spec.vm_id, "stop", timeout=10, force=True)
            with contextlib.suppress(IncusNotFound):
                client.delete_instance(spec.vm_id)
        shutil.rmtree(spec.directory, ignore_errors=True)

    def fence(self, spec: VmSpec, timeout: float = 5.0) -> Inspection:
        """Stop the instance for good (force) and prove from Incus that it does not run. A member
        that cannot be reached cannot prove it: UNKNOWN, and the volume stays where it is."""
        try:
            instance = self._find(spec.vm_id)
        except IncusError as exc:
            return Inspection(Liveness.UNKNOWN, reason="Incus API unreachable", details={"error": exc.log_detail})
        if instance is None:
            return Inspection(Liveness.DEAD, reason="no instance")
        member = self.members(fresh=True).get(instance.location)
        if member is not None and not member.online:
            return Inspection(Liveness.UNKNOWN, reason=f"member {member.name} unreachable",
                              details={"member": member.name})
        if instance.status != "Stopped":
            try:
                self.client.set_state(spec.vm_id, "stop", timeout=10, force=True)
            except IncusError as exc:
                return Inspection(Liveness.UNKNOWN, reason="stop refused", details={"error": exc.log_detail})
        return self.inspect(spec)

    def _find(self, name: str) -> Instance | None:
        """The instance, or None when Incus has none of that name. When its member cannot answer,
        Incus still lists it (from the cluster database) with its location: that is used then."""
        try:
            return self.client.instance(name)
        except IncusNotFound:
            return None
        except IncusUnreachable:
            raise
        except IncusError as exc:
            for instance in self.client.instances():
                if instance.name == name:
                    return instance
            raise exc from None

    def inspect(self, spec: VmSpec) -> Inspection:
        try:
            instance = self._find(spec.vm_id)
        except IncusError as exc:
            return Inspection(Liveness.UNKNOWN, reason="Incus API unreachable", details={"error": exc.log_detail})
        if instance is None:
            return Inspection(Liveness.DEAD, reason="missing")
        details: dict[str, Any] = {"member": instance.location, "instance_status": instance.status,
                                   "port": instance.config.get(CFG_PORT)}
        try:
            member = self.members().get(instance.location)
        except IncusError:
            member = None
        if member is not None and not member.online:
            details.update(member_status=member.status, member_unreachable=member.name)
            return Inspection(Liveness.UNKNOWN, reason=f"member {member.name} unreachable", details=details)
        status = instance.status
        if status == "Running":
            return Inspection(Liveness.ALIVE, reason="running", power=PowerState.RUNNING, details=details)
        if status == "Frozen":
            return Inspection(Liveness.ALIVE, reason="paused", power=PowerState.PAUSED, details=details)
        if status == "Stopped":
            return Inspection(Liveness.DEAD, reason="instance stopped (QEMU exited)", details=details)
        return Inspection(Liveness.UNKNOWN, reason=f"instance {status.lower() or 'state unknown'}", details=details)

    def list_host_vms(self, vms_dir: Path) -> list[HostVm]:
        found: list[HostVm] = []
        for instance in self.client.instances():
            running = instance.status in ("Running", "Frozen")
            port = instance.config.get(CFG_PORT, "")
            found.append(HostVm(vm_id=instance.name, directory=None, pid=1 if running else None,
                                ports=(int(port),) if port.isdigit() else ()))
        return sorted(found, key=lambda vm: vm.vm_id)

    def member_of(self, vm_id: str) -> str | None:
        """The member the VM's instance is on (None when it has none)."""
        try:
            location = self.client.instance(vm_id).location
        except IncusError:
            return None
        return None if location in ("", "none") else location

    # ---------------------------------------------------------------- reads through the driver

    def console_log(self, spec: VmSpec) -> str | None:
        try:
            return self.client.read_file(spec.vm_id, f"{IN}/vm/console.log").decode("utf-8", errors="replace")
        except IncusError:
            return None

    def console_tail(self, spec: VmSpec, lines: int = 40) -> str:
        text = self.console_log(spec) or ""
        return "\n".join(text[-64 * 1024:].splitlines()[-lines:])

    def has_state(self, spec: VmSpec) -> bool:
        try:
            self.client.instance(spec.vm_id)
        except IncusNotFound:
            return False
        except IncusError:
            return True  # cannot tell: not proof that it is gone
        return True

    # ---------------------------------------------------------------- guest agent over TLS

    def agent_target(self, endpoint: str, vm_id: str | None = None) -> tuple[str, str]:
        """(``tcp://ADDRESS:PORT`` of the VM's TLS forward, the pinned certificate PEM), from Incus."""
        name = vm_id or endpoint.removeprefix(f"{ENDPOINT_SCHEME}://")
        try:
            instance = self.client.instance(name)
        except IncusNotFound:
            self._targets.pop(name, None)
            raise
        except IncusError:
            # The API is down (its member, or incusd killed) but the guest may well run: the last
            # target seen for it (its pin cannot change) is used; a moved VM just fails to answer.
            if name in self._targets:
                return self._targets[name]
            raise
        cert = instance.config.get(CFG_CERT, "")
        port = instance.config.get(CFG_PORT, "")
        if not cert or not port.isdigit():
            raise DriverError(log_detail=f"instance {name} has no agent certificate or port")
        member = self.members().get(instance.location)
        if member is None or not member.address:
            address = self.settings.incus_agent_address or "127.0.0.1"
        else:
            address = member.address
        self._targets[name] = (f"tcp://{address}:{port}", cert)
        return self._targets[name]

    def agent_client(self, endpoint: str, secret: str, *, timeout: float) -> GuestAgent:
        if not endpoint.startswith(f"{ENDPOINT_SCHEME}://"):
            raise DriverError(log_detail=f"not an Incus agent endpoint: {endpoint!r}")
        target, cert = self.agent_target(endpoint)
        return AgentClient(target, secret, timeout=timeout, tls=certs.pinned_client_context(cert))

    # ---------------------------------------------------------------- events

    def watch_events(self, wake: Callable[[], None]) -> Callable[[], None] | None:
        """Follow the project's lifecycle events and call ``wake`` on each one about an instance.
        Returns the function that stops following."""

        def on_event(event: IncusEvent) -> None:
            if event.wakes_reconciler:
                log.debug("Incus event %s for %s", event.action, event.instance)
                wake()

        watcher = EventWatcher(self.client, on_event)
        watcher.start()
        return watcher.stop

    # ---------------------------------------------------------------- home volumes (custom volumes)

    def create_volume(self, location: str, size_bytes: int, owner_uid: int) -> None:
        pool, name = self._vol(location)
        client = self._ready()
        try:
            client.volume(pool, name)
        except IncusNotFound:
            pass
        else:
            raise DriverError("A workspace volume already exists there; it is never formatted again.",
                              log_detail=f"refusing to create {location}: it exists")
        # The ext4 file inside is made by the VM's launcher at its first boot (never over one).
        # On a pool local to each member the volume is made on the online member with the fewest
        # of our instances, and the user's CLI VMs then go where it is; a shared pool (Ceph)
        # leaves placement to Incus.
        client.create_volume(pool, name, target=self._volume_target(pool), size_bytes=size_bytes + 64 * 1024 * 1024,
                             config={"user.remotecli.size_bytes": str(size_bytes),
                                     "user.remotecli.owner_uid": str(owner_uid),
                                     "user.remotecli.formatted": "false"})

    def _volume_target(self, pool: str) -> str | None:
        try:
            doc = self.client.get(f"/1.0/storage-pools/{pool}", project=False) or {}
        except IncusError:
            doc = {}
        if str(doc.get("driver", "")) in ("ceph", "cephfs", "lvmcluster"):
            return None
        online = [m.name for m in self.members(fresh=True).values() if m.online]
        if not online:
            return None
        load = dict.fromkeys(online, 0)
        for instance in self.client.instances():
            if instance.location in load:
                load[instance.location] += 1
        return min(online, key=lambda name: (load[name], name))

    def volume_problem(self, location: str) -> str | None:
        try:
            pool, name = self._vol(location)
            self.client.volume(pool, name)
        except IncusNotFound:
            return f"its Incus volume {location} is missing"
        except IncusError as exc:
            return f"its Incus volume {location} cannot be read ({exc.log_detail or exc.message})"
        return None

    def delete_volume(self, location: str) -> None:
        pool, name = self._vol(location)
        with contextlib.suppress(IncusNotFound):
            self.client.delete_volume(pool, name)

    def volume_usage(self, location: str) -> tuple[int, int] | None:
        try:
            pool, name = self._vol(location)
            doc = self.client.volume(pool, name)
            state = self.client.get(f"/1.0/storage-pools/{pool}/volumes/custom/{name}/state") or {}
        except IncusError:
            return None
        size = int((doc.get("config") or {}).get("user.remotecli.size_bytes", "0") or 0)
        used = int((state.get("usage") or {}).get("used", 0) or 0)
        return used, size
