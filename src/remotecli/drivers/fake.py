"""An in-process fake driver (and fake guest agent) for unit tests of the control logic.

It keeps the same contract as the real drivers (idempotent calls, liveness from "the host"), where
"the host" is a dictionary plus a real directory per VM, so tests can delete the directory (the
seed's case), kill a VM (``kill``), hang its agent (``hang_agent``) or make boots fail
(``fail_next_boot``). It is never the proof that a capability works with real VMs.
"""

from __future__ import annotations

import asyncio
import hmac
import shutil
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from remotecli.agent.client import AgentCallError, AgentFileNotFound
from remotecli.agent.protocol import (
    AgentHealth,
    CredentialHealthReport,
    ExecResult,
    FileContent,
    FileInfo,
    GuestAgent,
    GuestPty,
    OAuthBrowser,
    OAuthFlowSpec,
    OAuthFlowState,
)
from remotecli.drivers.base import (
    Availability,
    BootInfo,
    Capabilities,
    HostResources,
    HostVm,
    Inspection,
    Liveness,
    PowerState,
    VmDriver,
    VmGone,
    VmSpec,
)
from remotecli.errors import AgentError, AgentRejected, AgentTimeout, AgentUnreachable, DriverError, VmBootFailed

FAKE_VOLUME_MAGIC = b"remotecli-fake-ext4\n"
HOME_STATUS_PATH = "/run/remotecli/home.json"

#: A file in a fake guest: (content, mode, owner).
FakeFile = tuple[bytes, int, str | None]
#: Called with (vm_id, path) by the fake agent's ``write_file`` (see ``FakeDriver.during_write``).
WriteHook = Callable[[str, str], None]


class FakeVolume:
    """What a fake home volume holds: its files (by guest path) and how often each was written."""

    def __init__(self) -> None:
        self.files: dict[str, FakeFile] = {}
        self.generations: dict[str, int] = {}

    def put(self, path: str, value: FakeFile) -> None:
        self.files[path] = value
        self.generations[path] = self.generations.get(path, 0) + 1


class _GuestFiles(MutableMapping[str, FakeFile]):
    """A fake guest's files: those under its home mount live in the home volume (so they outlive
    the VM, as on a real host), the others on the VM's own root disk."""

    def __init__(self) -> None:
        self._root: dict[str, FakeFile] = {}
        self._home: tuple[str, FakeVolume] | None = None

    def mount(self, mount_path: str, volume: FakeVolume) -> None:
        self._home = (mount_path.rstrip("/"), volume)

    def _in_home(self, path: str) -> FakeVolume | None:
        if self._home is not None and (path == self._home[0] or path.startswith(self._home[0] + "/")):
            return self._home[1]
        return None

    def __getitem__(self, path: str) -> FakeFile:
        volume = self._in_home(path)
        return volume.files[path] if volume is not None else self._root[path]

    def __setitem__(self, path: str, value: FakeFile) -> None:
        volume = self._in_home(path)
        if volume is not None:
            volume.put(path, value)
        else:
            self._root[path] = value

    def __delitem__(self, path: str) -> None:
        volume = self._in_home(path)
        del (volume.files if volume is not None else self._root)[path]

    def __iter__(self) -> Iterator[str]:
        yield from self._root
        if self._home is not None:
            yield from self._home[1].files

    def __len__(self) -> int:
        return len(self._root) + (len(self._home[1].files) if self._home is not None else 0)


@dataclass
class _FakeVm:
    spec: VmSpec
    power: PowerState = PowerState.RUNNING
    process_alive: bool = True
    agent_hung: bool = False
    control_lost: bool = False  # inspect answers UNKNOWN (a real driver: QMP socket gone or hung)
    files: _GuestFiles = field(default_factory=_GuestFiles)
    boots: int = 1
    pid: int = 0  # a made-up process id, so list_host_vms can say "a process exists"


class FakeDriver(VmDriver):
    name = "fake"
    capabilities = Capabilities(pause=True, snapshot=False, restart=True, guest_image=False)

    def __init__(self, boot_delay_s: float = 0.0) -> None:
        self.boot_delay_s = boot_delay_s
        self._vms: dict[str, _FakeVm] = {}
        self._lock = threading.RLock()
        self._fail_next_boots = 0
        self._next_pid = 10_000
        self.calls: list[tuple[str, str]] = []
        # Fake OAuth flows in browser VMs: flow_id -> state dict (see FakeAgent.oauth_*).
        self.oauth_flows: dict[str, dict[str, object]] = {}
        self.warm_browsers: set[str] = set()  # VMs whose (fake) Chromium the warm pool started
        # What the next user "does" in the fake browser: ("complete", token_response) or ("deny", None).
        self.login_outcome: tuple[str, dict[str, object] | None] | None = None
        # Home volumes: a boot that found its volume in use by another live fake VM (QEMU's image
        # lock would refuse it the same way); tests assert this stays empty.
        self.double_attach: list[tuple[str, str, str]] = []
        self._home_mount_error: str | None = None
        # Home volumes (by location) whose filesystem is full: writes into them fail with no_space.
        self.full_homes: set[str] = set()
        # What each home volume holds (by location): files written under a guest's home land here
        # and outlive the VM, like the data in a real volume file.
        self.volumes: dict[str, FakeVolume] = {}
        # Fault hooks for the fake agent's write_file, called with (vm_id, path): ``during_write``
        # after the write began and before it reached the disk (a kill there loses only that
        # write), ``after_write`` once it is on the disk.
        self.during_write: WriteHook | None = None
        self.after_write: WriteHook | None = None
        # The imaginary host fake VMs "run" on: large, so capacity admission only refuses fake VMs
        # when a test sets ``host_memory_mib``/``host_vcpus`` (or this) small.
        self.resources = HostResources(memory_mib=1024 * 1024, vcpus=1024, source="the fake driver's imaginary host")

    # --- test controls -------------------------------------------------------------------
    def kill(self, vm_id: str) -> None:
        with self._lock:
            if vm_id in self._vms:
                self._vms[vm_id].process_alive = False

    def hang_agent(self, vm_id: str, hung: bool = True) -> None:
        with self._lock:
            self._vms[vm_id].agent_hung = hung

    def lose_control_socket(self, vm_id: str, lost: bool = True) -> None:
        """The VM runs but its control socket does not answer: ``inspect`` says UNKNOWN."""
        with self._lock:
            self._vms[vm_id].control_lost = lost

    def delete_directory(self, vm_id: str) -> None:
        """Remove the VM's directory behind the controller's back (the seed's case)."""
        with self._lock:
            vm = self._vms.get(vm_id)
        if vm is not None:
            shutil.rmtree(vm.spec.directory, ignore_errors=True)

    def fail_next_boot(self, count: int = 1) -> None:
        self._fail_next_boots += count

    def fail_home_mount(self, error: str | None = "mount: wrong fs type") -> None:
        """The next guests report that their home volume could not be mounted (None: they can)."""
        self._home_mount_error = error

    def home_of(self, vm_id: str) -> str | None:
        with self._lock:
            vm = self._vms.get(vm_id)
            return vm.spec.home.location if vm is not None and vm.spec.home is not None else None

    def _attach_home(self, spec: VmSpec, vm: _FakeVm) -> None:
        """Like a guest's init: the home volume is 'mounted' and its status written before the agent."""
        if spec.home is None:
            return
        for other_id, other in self._vms.items():
            if (other_id != spec.vm_id and other.process_alive and other.spec.home is not None
                    and other.spec.home.location == spec.home.location):
                self.double_attach.append((spec.home.location, other_id, spec.vm_id))
                raise DriverError(log_detail=f"fake: volume {spec.home.location} is in use by {other_id}")
        import json

        vm.files.mount(spec.home.mount_path, self.volumes.setdefault(spec.home.location, FakeVolume()))
        state = {"volume_id": spec.home.volume_id, "state": "mounted", "fsck": 0}
        if self._home_mount_error:
            state = {"volume_id": spec.home.volume_id, "state": "failed", "error": self._home_mount_error}
        vm.files[HOME_STATUS_PATH] = (json.dumps(state).encode(), 0o644, "root")

    def volume_files(self, location: str) -> dict[str, tuple[bytes, int]]:
        """What the home volume at ``location`` holds: path → (content, times written)."""
        with self._lock:
            volume = self.volumes.get(location)
            if volume is None:
                return {}
            return {path: (data, volume.generations[path]) for path, (data, _mode, _owner) in volume.files.items()}

    def running_ids(self) -> set[str]:
        with self._lock:
            return {vm_id for vm_id, vm in self._vms.items() if vm.process_alive}

    # --- contract ------------------------------------------------------------------------
    def availability(self) -> Availability:
        return Availability(ok=True, detail="fake driver (tests only)", facts={"accel": "none"})

    def host_resources(self) -> HostResources:
        return self.resources

    def create(self, spec: VmSpec) -> BootInfo:
        self.calls.append(("create", spec.vm_id))
        with self._lock:
            existing = self._vms.get(spec.vm_id)
            if existing and existing.process_alive:
                return BootInfo(endpoint=f"fake://{spec.vm_id}", pid=None, accel="none")
            if self._fail_next_boots > 0:
                self._fail_next_boots -= 1
                spec.directory.mkdir(parents=True, exist_ok=True)
                (spec.directory / "console.log").write_text("fake: kernel panic - not syncing\n")
                raise VmBootFailed(log_detail="fake: kernel panic - not syncing")
            spec.directory.mkdir(parents=True, exist_ok=True)
            (spec.directory / "console.log").write_text("fake: booted\n")
            self._next_pid += 1
            vm = _FakeVm(spec=spec, pid=self._next_pid)
            self._attach_home(spec, vm)
            self._vms[spec.vm_id] = vm
        if self.boot_delay_s:
            time.sleep(self.boot_delay_s)
        return BootInfo(endpoint=f"fake://{spec.vm_id}", pid=None, accel="none")

    def start(self, spec: VmSpec) -> BootInfo:
        self.calls.append(("start", spec.vm_id))
        with self._lock:
            vm = self._vms.get(spec.vm_id)
            if vm is None or not spec.directory.is_dir():
                raise VmGone(log_detail=f"{spec.vm_id}: directory missing")
            vm.spec = spec
            self._attach_home(spec, vm)
            vm.process_alive = True
            vm.power = PowerState.RUNNING
            vm.boots += 1
        return BootInfo(endpoint=f"fake://{spec.vm_id}", pid=None, accel="none")

    def stop(self, spec: VmSpec, timeout: float) -> None:
        self.calls.append(("stop", spec.vm_id))
        with self._lock:
            vm = self._vms.get(spec.vm_id)
            if vm is not None:
                vm.process_alive = False
                vm.power = PowerState.SHUTDOWN

    def _require(self, spec: VmSpec) -> _FakeVm:
        vm = self._vms.get(spec.vm_id)
        if vm is None or not vm.process_alive or not spec.directory.is_dir():
            raise VmGone(log_detail=f"{spec.vm_id}: not running on the host")
        return vm

    def pause(self, spec: VmSpec) -> None:
        self.calls.append(("pause", spec.vm_id))
        with self._lock:
            self._require(spec).power = PowerState.PAUSED

    def resume(self, spec: VmSpec) -> None:
        self.calls.append(("resume", spec.vm_id))
        with self._lock:
            self._require(spec).power = PowerState.RUNNING

    def destroy(self, spec: VmSpec) -> None:
        self.calls.append(("destroy", spec.vm_id))
        with self._lock:
            self._vms.pop(spec.vm_id, None)
        shutil.rmtree(spec.directory, ignore_errors=True)

    def inspect(self, spec: VmSpec) -> Inspection:
        with self._lock:
            vm = self._vms.get(spec.vm_id)
            if not spec.directory.is_dir():
                return Inspection(Liveness.DEAD, "directory missing")
            if vm is None or not vm.process_alive:
                return Inspection(Liveness.DEAD, "process exited")
            if vm.control_lost:
                return Inspection(Liveness.UNKNOWN, "control socket unresponsive")
            return Inspection(Liveness.ALIVE, "", power=vm.power)

    def fence(self, spec: VmSpec, timeout: float = 5.0) -> Inspection:
        """Like a real host: the process is what counts (its directory may be gone while it runs)."""
        with self._lock:
            vm = self._vms.get(spec.vm_id)
            alive = vm is not None and vm.process_alive
        if alive:
            self.stop(spec, timeout)
        with self._lock:
            vm = self._vms.get(spec.vm_id)
            if vm is not None and vm.process_alive:
                return Inspection(Liveness.UNKNOWN, "process still runs")
        return Inspection(Liveness.DEAD, "no process")

    def list_host_vms(self, vms_dir: Path) -> list[HostVm]:
        with self._lock:
            found = {
                vm_id: HostVm(vm_id, vm.spec.directory, vm.pid) for vm_id, vm in self._vms.items() if vm.process_alive
            }
        if vms_dir.is_dir():
            for path in vms_dir.iterdir():
                if path.is_dir() and path.name.startswith("vm-") and path.name not in found:
                    found[path.name] = HostVm(path.name, path, None)
        return list(found.values())

    # --- home volumes: small marker files instead of ext4 images -------------------------
    def create_volume(self, location: str, size_bytes: int, owner_uid: int) -> None:
        self.calls.append(("create_volume", location))
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "xb") as handle:
                handle.write(FAKE_VOLUME_MAGIC)
        except FileExistsError:
            raise DriverError(log_detail=f"fake: refusing to format over {location}") from None
        with self._lock:
            self.volumes[location] = FakeVolume()

    def delete_volume(self, location: str) -> None:
        with self._lock:
            self.volumes.pop(location, None)
        Path(location).unlink(missing_ok=True)

    def volume_problem(self, location: str) -> str | None:
        try:
            head = Path(location).read_bytes()[: len(FAKE_VOLUME_MAGIC)]
        except FileNotFoundError:
            return f"its volume file {location} is missing"
        except OSError as exc:
            return f"its volume file {location} cannot be read ({exc.strerror})"
        return None if head == FAKE_VOLUME_MAGIC else f"its volume file {location} holds no ext4 filesystem"

    def volume_usage(self, location: str) -> tuple[int, int] | None:
        try:
            return Path(location).stat().st_size, 20 * 1024**3
        except OSError:
            return None

    # --- fake guest agent ----------------------------------------------------------------
    def agent_client(self, endpoint: str, secret: str, *, timeout: float) -> GuestAgent:
        return FakeAgent(self, endpoint.removeprefix("fake://"), secret)


class FakeAgent:
    """Answers like a guest agent when its fake VM is running; refuses a wrong secret."""

    def __init__(self, driver: FakeDriver, vm_id: str, secret: str) -> None:
        self._driver = driver
        self._vm_id = vm_id
        self._secret = secret

    def _vm(self) -> _FakeVm:
        vm = self._driver._vms.get(self._vm_id)
        if vm is None or not vm.process_alive or not vm.spec.directory.is_dir():
            raise AgentUnreachable()
        if vm.agent_hung or vm.power is PowerState.PAUSED:
            raise AgentTimeout()
        if not hmac.compare_digest(vm.spec.agent_secret, self._secret):
            raise AgentRejected()
        return vm

    def health(self, *, timeout: float | None = None) -> AgentHealth:
        vm = self._vm()
        return AgentHealth(vm_id=vm.spec.vm_id, vm_type=vm.spec.vm_type, hostname=vm.spec.vm_id,
                           uptime_s=0.0, agent_version="fake", boot_id=f"fake-boot-{vm.boots}")

    def wait_ready(self, deadline_s: float, poll_interval: float = 0.05) -> AgentHealth:
        end = time.monotonic() + deadline_s
        while True:
            try:
                return self.health()
            except (AgentUnreachable, AgentTimeout):
                if time.monotonic() >= end:
                    raise AgentTimeout() from None
                time.sleep(poll_interval)

    def write_file(self, path: str, data: bytes, *, mode: int, owner: str | None = None,
                   dir_mode: int | None = None) -> FileInfo:
        vm = self._vm()
        if vm.spec.home is not None and vm.spec.home.location in self._driver.full_homes:
            from remotecli.agent.client import AgentCallError

            raise AgentCallError(status=507, agent_code="no_space", agent_message=f"No space left to write {path}.")
        if self._driver.during_write is not None:
            self._driver.during_write(self._vm_id, path)  # a fault may kill the VM mid-write
        with self._driver._lock:
            if not vm.process_alive:
                raise AgentUnreachable()  # killed before the write reached the disk: not written
            vm.files[path] = (data, mode, owner)
        if self._driver.after_write is not None:
            self._driver.after_write(self._vm_id, path)
        user = (owner or "root").split(":")[0]
        return FileInfo(path=path, mode=mode, owner=user, group=user, size=len(data))

    def exec(self, argv: list[str], *, timeout_s: float, env: dict[str, str] | None = None, cwd: str | None = None,
             user: str | None = None, stdin: bytes | None = None) -> ExecResult:
        """A few commands, enough for control-logic tests: ``echo``, ``cat FILE`` (fake files),
        ``true``, ``false``; anything else exits 127 as a shell would."""
        vm = self._vm()
        program, args = argv[0], argv[1:]
        out, err, code = b"", b"", 0
        if program == "echo":
            out = (" ".join(args) + "\n").encode()
        elif program == "cat":
            try:
                out = b"".join(vm.files[path][0] for path in args) if args else (stdin or b"")
            except KeyError as missing:
                err, code = f"cat: {missing.args[0]}: No such file or directory\n".encode(), 1
        elif program in ("true", "false"):
            code = 0 if program == "true" else 1
        elif argv[-3:] == ["codex", "login", "--with-api-key"] and user:
            # As the real Codex 0.171 does with the key on stdin (services/key_signin.py).
            import json

            doc = {"auth_mode": "apikey", "OPENAI_API_KEY": (stdin or b"").decode().strip()}
            vm.files[f"/home/{user}/.codex/auth.json"] = (json.dumps(doc, indent=2).encode(), 0o600, user)
            err = b"Reading API key from stdin...\nAPI key saved. Authentication is checked when you send a request.\n"
        else:
            err, code = f"{program}: command not found\n".encode(), 127
        return ExecResult(exit_code=code, stdout=out, stderr=err, timed_out=False, duration_s=0.001)

    def read_file(self, path: str) -> FileContent:
        try:
            data, mode, owner = self._vm().files[path]
        except KeyError:
            raise AgentFileNotFound(status=404, agent_code="file_not_found", log_detail="fake: no such file") from None
        user = (owner or "root").split(":")[0]
        return FileContent(data=data, mode=mode, owner=user, group=user, size=len(data))

    def credential_health(self, user: str | None = None) -> CredentialHealthReport:
        """The guest's own parser (agent/guest/credhealth.py) over the fake files of ``/home/<user>``."""
        from remotecli.agent.guest.credhealth import inspect_home

        vm = self._vm()
        home = f"/home/{user or 'cli'}"

        def read(relative: str) -> tuple[bytes, float | None] | None:
            found = vm.files.get(f"{home}/{relative}")
            return (found[0], None) if found is not None else None

        return CredentialHealthReport.model_validate(
            {"user": user or "cli", "home": home, "checked_at": time.time(), "providers": inspect_home(read)})  # type: ignore[no-untyped-call]

    def shutdown(self, action: str = "poweroff") -> None:
        """The guest powers itself off (``reboot``: it comes back at once)."""
        vm = self._vm()
        if action != "reboot":
            vm.process_alive = False
            vm.power = PowerState.SHUTDOWN

    # The fake OAuth agent: a flow shows its page at the first poll and then waits for
    # ``FakeDriver.login_outcome`` (what the user does in the browser).

    def oauth_warm(self, browser: OAuthBrowser, timeout_s: float = 90.0) -> None:
        """The warm pool's Chromium on a blank page: recorded per VM (``FakeDriver.warm_browsers``)."""
        self._vm()
        self._driver.warm_browsers.add(self._vm_id)

    def oauth_start(self, spec: OAuthFlowSpec) -> OAuthFlowState:
        self._vm()
        flow_id = spec.flow_id
        self._driver.oauth_flows[flow_id] = {"status": "page_loading", "vm_id": self._vm_id, "polls": 0}
        return OAuthFlowState.model_validate(
            {"flow_id": flow_id, "status": "page_loading", "redirect_uri": "http://localhost:1/callback"})

    def oauth_status(self, flow_id: str) -> OAuthFlowState:
        self._vm()
        flow = self._driver.oauth_flows.get(flow_id)
        if flow is None:
            raise AgentError(log_detail="fake: no such flow")
        flow["polls"] = int(flow["polls"]) + 1  # type: ignore[call-overload]
        if flow["status"] == "page_loading":
            flow["status"] = "awaiting_user"
        elif flow["status"] == "awaiting_user" and self._driver.login_outcome is not None:
            action, result = self._driver.login_outcome
            if action == "complete":
                flow["status"], flow["result"] = "completed", result
            else:
                flow["status"], flow["error_code"] = "denied", "access_denied"
        answer = {k: v for k, v in flow.items() if k not in ("vm_id", "polls")}
        answer["flow_id"] = flow_id
        return OAuthFlowState.model_validate(answer)

    def oauth_cancel(self, flow_id: str) -> None:
        self._driver.oauth_flows.pop(flow_id, None)

    # No terminal or port streams: tests that need them patch ``open_pty``/``open_tcp``.

    async def open_pty(self, user: str, cols: int, rows: int, cmd: str | None = None) -> GuestPty:
        self._vm()
        raise AgentCallError(status=501, agent_code="not_implemented", log_detail="fake: no terminals")

    async def open_tcp(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self._vm()
        raise AgentCallError(status=501, agent_code="not_implemented", log_detail="fake: no port streams")

    def close(self) -> None:
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
