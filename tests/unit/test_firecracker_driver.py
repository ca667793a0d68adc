"""The Firecracker driver against a fake Firecracker API server.

Real Firecracker cannot run in CI here. The fake below stands in for the ``firecracker`` binary:
it is started by the driver exactly like Firecracker (``--api-sock <path> --id <id>``), serves
HTTP/1.1 on that Unix socket with Firecracker's documented status codes (204 on success, 400 with
``{"fault_message": ...}`` on bad input or a pre-boot-only call after boot), keeps the instance
state (``Not started`` / ``Running`` / ``Paused``), exits on ``SendCtrlAltDel`` like a guest that
reboots with ``reboot=k``, and serves the vsock handshake (``CONNECT <port>\\n`` -> ``OK <n>\\n``).
It records every request in ``fake-requests.jsonl`` next to the socket. Files dropped in the VM
directory steer it: ``fake-fault`` ("METHOD PATH": answer 400 and echo the drive file's contents),
``fake-hang`` (GET / never answers in time), ``fake-ignore-cad`` (ignore Ctrl-Alt-Del).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from remotecli.agent.protocol import CONFIG_DISK_SIZE, hostname_for
from remotecli.config import Settings
from remotecli.drivers.base import ImageRef, Liveness, PowerState, VmGone, VmSpec
from remotecli.drivers.firecracker import FirecrackerApiError, FirecrackerDriver, JailerConfig
from remotecli.drivers.firecracker import vsock as fc_vsock
from remotecli.drivers.firecracker.driver import guest_mac, tap_name
from remotecli.errors import AgentUnreachable, DriverError, ImageMissing, VmBootFailed

pytestmark = pytest.mark.timeout(30)

FAKE_FIRECRACKER = r"""
import argparse, json, os, socket, socketserver, sys, threading, time
from http.server import BaseHTTPRequestHandler

parser = argparse.ArgumentParser()
parser.add_argument("--api-sock", required=True)
parser.add_argument("--id", required=True)
args, _unknown = parser.parse_known_args()
directory = os.path.dirname(os.path.abspath(args.api_sock))
print(f"fake-firecracker: starting id={args.id}", flush=True)

state = {"state": "Not started", "vsock": None}
lock = threading.Lock()
PRE_BOOT = ("/logger", "/metrics", "/boot-source", "/machine-config", "/vsock")
PRE_BOOT_PREFIX = ("/drives/", "/network-interfaces/")
AFTER_START = "The requested operation is not supported after starting the microVM."
BEFORE_START = "The requested operation is not supported before starting the microVM."
NO_KERNEL = "The kernel file cannot be opened: No such file or directory (os error 2)"


def record(method, path, body):
    with open(os.path.join(directory, "fake-requests.jsonl"), "a") as handle:
        handle.write(json.dumps({"method": method, "path": path, "body": body}) + "\n")


def exit_soon(code):
    def run():
        time.sleep(0.05)
        print("fake-firecracker: guest reset, exiting", flush=True)
        os._exit(code)
    threading.Thread(target=run, daemon=True).start()


def serve_vsock(path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)

    def handle(conn):
        with conn:
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(1)
                if not chunk:
                    return
                line += chunk
            parts = line.decode().split()
            if len(parts) != 2 or parts[0] != "CONNECT" or parts[1] != "7000":
                return  # nothing listens on that guest port: Firecracker closes the stream
            conn.sendall(b"OK 1073741824\n")
            while True:  # the "guest agent" echoes
                data = conn.recv(4096)
                if not data:
                    return
                conn.sendall(data)

    def accept():
        while True:
            conn, _ = server.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def address_string(self):
        return "uds"

    def reply(self, status, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def fault(self, message, status=400):
        self.reply(status, {"fault_message": message})

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def do_GET(self):
        record("GET", self.path, None)
        if self.path != "/":
            return self.fault(f"Invalid request method and/or path: GET {self.path}.")
        if os.path.exists(os.path.join(directory, "fake-hang")):
            time.sleep(5)
        self.reply(200, {"app_name": "Firecracker", "id": args.id, "state": state["state"],
                         "vmm_version": "1.99.0-fake"})

    def do_PATCH(self):
        body = self.body()
        record("PATCH", self.path, body)
        if self.path != "/vm":
            return self.fault(f"Invalid request method and/or path: PATCH {self.path}.")
        with lock:
            if state["state"] == "Not started":
                return self.fault(BEFORE_START)
            target = (body or {}).get("state")
            if target == "Paused":
                state["state"] = "Paused"
            elif target == "Resumed":
                state["state"] = "Running"
            else:
                return self.fault(f"unknown variant `{target}`, expected `Paused` or `Resumed`")
        self.reply(204)

    def do_PUT(self):
        body = self.body() or {}
        path = self.path
        record("PUT", path, body)
        marker = os.path.join(directory, "fake-fault")
        if os.path.exists(marker) and open(marker).read().strip() == f"PUT {path}":
            # An error that echoes the file it could not use: the driver must redact the secret.
            try:
                echoed = open(body.get("path_on_host", ""), "rb").read(300).rstrip(b"\0").decode()
            except OSError as exc:
                echoed = str(exc)
            return self.fault(f"Unable to create the block device: invalid contents {echoed}")
        with lock:
            started = state["state"] != "Not started"
            if path in PRE_BOOT or path.startswith(PRE_BOOT_PREFIX):
                if started:
                    return self.fault(AFTER_START)
                if path == "/boot-source" and not os.path.isfile(body.get("kernel_image_path", "")):
                    return self.fault(NO_KERNEL)
                if path.startswith("/drives/"):
                    if body.get("drive_id") != path.rsplit("/", 1)[1]:
                        return self.fault("The id from the path does not match the id from the body!")
                    if not os.path.isfile(body.get("path_on_host", "")):
                        return self.fault("Unable to open block device backing file: os error 2")
                if path == "/vsock":
                    state["vsock"] = body["uds_path"]
                return self.reply(204)
            if path == "/actions":
                action = body.get("action_type")
                if action == "InstanceStart":
                    if started:
                        return self.fault(AFTER_START)
                    state["state"] = "Running"
                    if state["vsock"]:
                        serve_vsock(state["vsock"])
                    print("fake-firecracker: guest booting", flush=True)
                    return self.reply(204)
                if action == "SendCtrlAltDel":
                    if not started:
                        return self.fault(BEFORE_START)
                    if not os.path.exists(os.path.join(directory, "fake-ignore-cad")):
                        exit_soon(0)
                    return self.reply(204)
                if action == "FlushMetrics":
                    return self.reply(204)
                return self.fault(f"unknown variant `{action}`")
            if path == "/snapshot/create":
                if state["state"] != "Paused":
                    return self.fault("Cannot save the microVM state: the microVM must be paused.")
                for key in ("snapshot_path", "mem_file_path"):
                    with open(body[key], "wb") as handle:
                        handle.write(b"fake " + key.encode())
                return self.reply(204)
        self.fault(f"Invalid request method and/or path: PUT {path}.")


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


Server(args.api_sock, Handler).serve_forever()
"""


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def base() -> Iterator[Path]:
    # Short path: Unix socket paths are limited to 107 bytes (pytest's tmp_path can be longer).
    path = Path(tempfile.mkdtemp(prefix="fct", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_binary(base: Path) -> Path:
    path = base / "bin" / "fake-firecracker"
    path.parent.mkdir()
    path.write_text(f"#!{sys.executable}\n{FAKE_FIRECRACKER}")
    path.chmod(0o755)
    return path


@pytest.fixture
def image(base: Path) -> ImageRef:
    kernel_dir, rootfs_dir = base / "images" / "kernel-abc", base / "images" / "cli-abc"
    kernel_dir.mkdir(parents=True)
    rootfs_dir.mkdir(parents=True)
    (kernel_dir / "vmlinuz").write_bytes(b"kernel")
    (kernel_dir / "initrd.img").write_bytes(b"initrd")
    rootfs = rootfs_dir / "rootfs.ext4"
    with rootfs.open("wb") as handle:
        handle.write(b"ext4-base")
        handle.truncate(1024 * 1024)
    return ImageRef("cli", kernel_dir / "vmlinuz", kernel_dir / "initrd.img", rootfs, "abc")


@pytest.fixture
def settings(base: Path) -> Settings:
    settings = Settings(data_dir=base / "data")
    settings.ensure_dirs()
    return settings


@pytest.fixture
def driver(settings: Settings, fake_binary: Path, make_spec: Callable[..., VmSpec]) -> Iterator[FirecrackerDriver]:
    drv = FirecrackerDriver(settings, binary=str(fake_binary), api_timeout=1.0, startup_timeout=5.0)
    yield drv
    for vm in drv.list_host_vms(settings.vms_dir):  # never leave a fake running
        drv.destroy(make_spec(vm.vm_id))


@pytest.fixture
def make_spec(settings: Settings, image: ImageRef) -> Callable[..., VmSpec]:
    def make(vm_id: str = "vm-0001", **overrides: Any) -> VmSpec:
        fields: dict[str, Any] = {
            "vm_id": vm_id,
            "vm_type": "cli",
            "vcpus": 2,
            "memory_mib": 512,
            "directory": settings.vms_dir / vm_id,
            "agent_secret": f"SECRET-{vm_id}-d41d8cd98f00b204",
            "image": image,
        }
        fields.update(overrides)
        return VmSpec(**fields)

    return make


def requests_of(spec: VmSpec) -> list[dict[str, Any]]:
    path = spec.directory / "fake-requests.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def calls(spec: VmSpec) -> list[str]:
    return [f"{r['method']} {r['path']}" for r in requests_of(spec)]


def body_of(spec: VmSpec, call: str) -> Any:
    matches = [r["body"] for r in requests_of(spec) if f"{r['method']} {r['path']}" == call]
    assert matches, f"{call} was not sent"
    return matches[-1]


def pid_alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rsplit(")", 1)[-1].split()[0] != "Z"


CREATE_SEQUENCE = [
    "GET /",  # the driver waits for the API socket to answer
    "PUT /logger",
    "PUT /metrics",
    "PUT /boot-source",
    "PUT /drives/rootfs",
    "PUT /drives/config",
    "PUT /machine-config",
    "PUT /network-interfaces/eth0",
    "PUT /vsock",
    "PUT /actions",
]


# -- create ---------------------------------------------------------------------------------------


def test_create_sends_the_documented_configuration(
    driver: FirecrackerDriver, make_spec: Callable[..., VmSpec], image: ImageRef
) -> None:
    spec = make_spec()
    info = driver.create(spec)

    assert info.pid is not None and pid_alive(info.pid)
    assert info.accel == "kvm"
    assert info.endpoint == fc_vsock.make_endpoint(spec.directory / "vsock.sock", 7000)
    assert calls(spec) == CREATE_SEQUENCE

    d = spec.directory
    boot = body_of(spec, "PUT /boot-source")
    assert boot["kernel_image_path"] == str(image.kernel)
    assert boot["initrd_path"] == str(image.initrd)
    assert boot["boot_args"].startswith("console=ttyS0 root=/dev/vda rw panic=-1 quiet remotecli.vm_type=cli")
    assert "reboot=k" in boot["boot_args"].split()
    assert body_of(spec, "PUT /drives/rootfs") == {
        "drive_id": "rootfs",
        "path_on_host": str(d / "rootfs.ext4"),
        "is_root_device": True,
        "is_read_only": False,
    }
    assert body_of(spec, "PUT /drives/config") == {
        "drive_id": "config",
        "path_on_host": str(d / "config.img"),
        "is_root_device": False,
        "is_read_only": True,
    }
    assert body_of(spec, "PUT /machine-config") == {"vcpu_count": 2, "mem_size_mib": 512}
    net = body_of(spec, "PUT /network-interfaces/eth0")
    assert net == {
        "iface_id": "eth0",
        "host_dev_name": tap_name("vm-0001"),
        "guest_mac": guest_mac("vm-0001"),
    }
    assert len(net["host_dev_name"]) <= 15
    assert body_of(spec, "PUT /vsock") == {"guest_cid": 3, "uds_path": str(d / "vsock.sock")}
    assert body_of(spec, "PUT /actions") == {"action_type": "InstanceStart"}
    assert body_of(spec, "PUT /logger")["log_path"] == str(d / "firecracker.log")
    assert body_of(spec, "PUT /metrics") == {"metrics_path": str(d / "metrics.json")}

    # The directory: per-VM disk copy, config disk per the boot contract, pid file, console.
    assert (d / "rootfs.ext4").read_bytes() == image.rootfs.read_bytes()
    config = (d / "config.img").read_bytes()
    assert len(config) == CONFIG_DISK_SIZE
    assert stat.S_IMODE((d / "config.img").stat().st_mode) == 0o600
    doc = json.loads(config[: config.index(b"\0")])
    assert doc["agent_secret"] == spec.agent_secret
    assert doc["agent_port"] == 7000 and doc["vm_id"] == "vm-0001" and doc["vm_type"] == "cli"
    assert doc["hostname"] == hostname_for("vm-0001") and doc["agent_vsock_port"] == 7000
    assert set(config[config.index(b"\0") :]) == {0}
    assert (d / "fc.pid").read_text().strip() == str(info.pid)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert "fake-firecracker: starting id=vm-0001" in driver.console_tail(spec)

    # The secret is nowhere but config.img: not on the command line, not in vm.json or BootInfo.
    cmdline = Path(f"/proc/{info.pid}/cmdline").read_bytes().decode()
    assert spec.agent_secret not in cmdline
    assert "--api-sock" in cmdline and str(d / "firecracker.sock") in cmdline
    assert spec.agent_secret not in (d / "vm.json").read_text()
    assert spec.agent_secret not in repr(info) and spec.agent_secret not in repr(spec)
    assert json.loads((d / "vm.json").read_text())["pid"] == info.pid

    # The process is in its own session: it outlives the controller.
    assert os.getsid(info.pid) == info.pid

    # Idempotent: a second create returns the running VM and sends nothing.
    again = driver.create(spec)
    assert again == info
    assert calls(spec) == CREATE_SEQUENCE


def test_create_without_image_raises_image_missing(driver: FirecrackerDriver, make_spec: Callable[..., VmSpec]) -> None:
    with pytest.raises(ImageMissing):
        driver.create(make_spec(image=None))


def test_guest_agent_is_reachable_through_the_vsock_endpoint(
    driver: FirecrackerDriver, make_spec: Callable[..., VmSpec]
) -> None:
    spec = make_spec()
    info = driver.create(spec)
    uds, port = fc_vsock.parse_endpoint(info.endpoint)
    assert (uds, port) == (spec.directory / "vsock.sock", 7000)
    with fc_vsock.open_stream(uds, port, timeout=2) as stream:
        stream.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        assert stream.recv(100) == b"GET /health HTTP/1.1\r\n\r\n"  # the fake guest echoes
    with pytest.raises(AgentUnreachable):  # nothing listens on guest port 7001
        fc_vsock.open_stream(uds, 7001, timeout=2)


# -- pause / resume / inspect ---------------------------------------------------------------------


def test_pause_and_resume_use_patch_vm_and_are_idempotent(
    driver: FirecrackerDriver, make_spec: Callable[..., VmSpec]
) -> None:
    spec = make_spec()
    driver.create(spec)
    assert driver.inspect(spec).power is PowerState.RUNNING

    driver.pause(spec)
    assert body_of(spec, "PATCH /vm") == {"state": "Paused"}
    paused = driver.inspect(spec)
    assert paused.liveness is Liveness.ALIVE and paused.power is PowerState.PAUSED
    driver.pause(spec)  # already paused: no second PATCH
    assert calls(spec).count("PATCH /vm") == 1

    driver.resume(spec)
    assert body_of(spec, "PATCH /vm") == {"state": "Resumed"}
    running = driver.inspect(spec)
    assert running.alive and running.power is PowerState.RUNNING
    assert running.details["state"] == "Running"
    driver.resume(spec)  # already running: nothing sent
    assert calls(spec).count("PATCH /vm") == 2


def test_inspect_dead_when_process_gone_or_directory_missing(
    driver: FirecrackerDriver, make_spec: Callable[..., VmSpec]
) -> None:
    never = make_spec("vm-never")
    assert driver.inspect(never).liveness is Liveness.DEAD
    assert driver.inspect(never).reason == "directory missing"
    with pytest.raises(VmGone):
        driver.pause(never)
    with pytest.raises(VmGone):
        driver.start(never)

    spec = make_spec()
    info = driver.create(spec)
    assert info.pid is not None
    os.kill(info.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pid_alive(info.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    dead = driver.inspect(spec)
    assert dead.liveness is Liveness.DEAD and dead.reason == "process exited"
    with pytest.raises(VmGone):
        driver.resume(spec)

    driver.destroy(spec)
    assert driver.inspect(spec).reason == "directory missing"


def test_inspect_unknown_when_api_socket_hangs(driver: FirecrackerDriver, make_spec: Callable[..., VmSpec]) -> None:
    spec = make_spec()
    driver.create(spec)
    (spec.directory / "fake-hang").touch()
    result = driver.inspect(spec)
    assert result.liveness is Liveness.UNKNOWN
    assert result.reason == "API socket timed out"


# -- stop / start ---------------------------------------------------------------------------------


def test_stop_sends_ctrl_alt_del_and_start_boots_a_fresh_process_on_the_same_disk(
    driver: FirecrackerDriver, make_spec: Callable[..., VmSpec]
) -> None:
    spec = make_spec()
    first = driver.create(spec)
    assert first.pid is not None
    driver.pause(spec)
    t0 = time.monotonic()
    driver.stop(spec, timeout=5)
    assert time.monotonic() - t0 < 2  # it exited on Ctrl-Alt-Del; no kill timeout
    assert calls(spec)[-3:] == ["GET /", "PATCH /vm", "PUT /actions"]  # resumed first, then CAD
    assert body_of(spec, "PUT /actions") == {"action_type": "SendCtrlAltDel"}
    assert not pid_alive(first.pid)
    assert driver.inspect(spec).liveness is Liveness.DEAD
    assert (spec.directory / "rootfs.ext4").exists() and not (spec.directory / "fc.pid").exists()
    driver.stop(spec, timeout=5)  # stopping a stopped VM does nothing

    with (spec.directory / "rootfs.ext4").open("r+b") as disk:  # the guest wrote to its disk
        disk.write(b"guest-data")
    before = len(requests_of(spec))
    second = driver.start(spec)
    assert second.pid is not None and second.pid != first.pid and pid_alive(second.pid)
    assert calls(spec)[before:] == CREATE_SEQUENCE
    assert (spec.directory / "rootfs.ext4").read_bytes().startswith(b"guest-data")  # not re-copied
    assert driver.start(spec) == second  # idempotent
    assert driver.inspect(spec).power is PowerState.RUNNING


def test_start_without_image_in_spec_uses_recorded_paths(
    driver: FirecrackerDriver, make_spec: Callable[..., VmSpec], image: ImageRef
) -> None:
    spec = make_spec()
    driver.create(spec)
    driver.stop(spec, timeout=5)
    driver.start(make_spec(image=None))
    assert body_of(spec, "PUT /boot-source")["kernel_image_path"] == str(image.kernel)


def test_stop_kills_a_guest_that_ignores_ctrl_alt_del(
    driver: FirecrackerDriver, make_spec: Callable[..., VmSpec]
) -> None:
    spec = make_spec()
    info = driver.create(spec)
    assert info.pid is not None
    (spec.directory / "fake-ignore-cad").touch()
    driver.stop(spec, timeout=0.3)
    assert not pid_alive(info.pid)
    assert driver.inspect(spec).liveness is Liveness.DEAD


# -- destroy / list -------------------------------------------------------------------------------


def test_destroy_is_idempotent_and_removes_the_directory(
    driver: FirecrackerDriver, make_spec: Callable[..., VmSpec]
) -> None:
    driver.destroy(make_spec("vm-never"))  # never created: fine
    spec = make_spec()
    info = driver.create(spec)
    assert info.pid is not None
    driver.destroy(spec)
    assert not spec.directory.exists()
    assert not pid_alive(info.pid)
    driver.destroy(spec)
    assert driver.inspect(spec).liveness is Liveness.DEAD


def test_list_host_vms_finds_directories_and_orphan_processes(
    driver: FirecrackerDriver, make_spec: Callable[..., VmSpec], settings: Settings
) -> None:
    a, b = make_spec("vm-a"), make_spec("vm-b")
    info_a, info_b = driver.create(a), driver.create(b)
    # c: a stopped VM (directory, no process); qemu-ish: a directory that is not ours.
    c = make_spec("vm-c")
    driver.create(c)
    driver.stop(c, timeout=5)
    (settings.vms_dir / "vm-qemu").mkdir()
    (settings.vms_dir / "vm-qemu" / "qmp.sock").touch()
    # b's directory vanishes while its process runs on: an orphan process.
    shutil.rmtree(b.directory)

    found = {vm.vm_id: vm for vm in driver.list_host_vms(settings.vms_dir)}
    assert set(found) == {"vm-a", "vm-b", "vm-c"}
    assert found["vm-a"].directory == a.directory and found["vm-a"].pid == info_a.pid
    assert found["vm-b"].directory is None and found["vm-b"].pid == info_b.pid
    assert found["vm-c"].directory == c.directory and found["vm-c"].pid is None
    assert all(vm.ports == () for vm in found.values())

    driver.destroy(b)  # finds the orphan by its --id although the pid file is gone
    assert info_b.pid is not None and not pid_alive(info_b.pid)
    assert "vm-b" not in {vm.vm_id for vm in driver.list_host_vms(settings.vms_dir)}


# -- errors ---------------------------------------------------------------------------------------


def test_fault_message_becomes_driver_error_without_the_secret(
    driver: FirecrackerDriver, make_spec: Callable[..., VmSpec]
) -> None:
    spec = make_spec()
    spec.directory.mkdir(parents=True)
    (spec.directory / "fake-fault").write_text("PUT /drives/config")

    with pytest.raises(DriverError) as caught:
        driver.create(spec)

    exc = caught.value
    assert isinstance(exc, FirecrackerApiError)
    assert exc.status == 400 and exc.code == "driver_error" and exc.http_status == 502
    assert "PUT /drives/config" in exc.message
    assert exc.log_detail is not None and "Unable to create the block device" in exc.log_detail
    assert "[redacted]" in exc.log_detail  # the fake echoed config.img, secret included
    for text in (
        str(exc),
        exc.message,
        exc.log_detail,
        repr(exc),
        json.dumps(exc.to_dict()),
        exc.fault_message,
    ):
        assert spec.agent_secret not in text
    assert exc.__cause__ is None
    # The half-configured Firecracker was killed; nothing is left running.
    assert driver.inspect(spec).liveness is Liveness.DEAD
    assert driver._find_pids(driver._layout(spec)) == []


def test_hypervisor_exiting_at_start_up_is_vm_boot_failed(
    settings: Settings, make_spec: Callable[..., VmSpec], base: Path
) -> None:
    broken = base / "bin" / "broken-firecracker"
    broken.parent.mkdir(exist_ok=True)
    broken.write_text("#!/bin/sh\necho 'Error: KVM: No such device' \nexit 1\n")
    broken.chmod(0o755)
    drv = FirecrackerDriver(settings, binary=str(broken), startup_timeout=5.0)
    spec = make_spec()
    with pytest.raises(VmBootFailed) as caught:
        drv.create(spec)
    assert caught.value.log_detail is not None and "KVM: No such device" in caught.value.log_detail
    assert not (spec.directory / "fc.pid").exists()


def test_snapshot_pauses_creates_and_resumes(driver: FirecrackerDriver, make_spec: Callable[..., VmSpec]) -> None:
    spec = make_spec()
    driver.create(spec)
    before = len(requests_of(spec))
    state_file, mem_file = driver.snapshot(spec, "snap1")
    assert calls(spec)[before:] == ["GET /", "PATCH /vm", "PUT /snapshot/create", "PATCH /vm"]
    assert body_of(spec, "PUT /snapshot/create") == {
        "snapshot_type": "Full",
        "snapshot_path": str(spec.directory / "snap1.vmstate"),
        "mem_file_path": str(spec.directory / "snap1.mem"),
    }
    assert stat.S_IMODE(mem_file.stat().st_mode) == 0o600 and state_file.exists()
    assert driver.inspect(spec).power is PowerState.RUNNING


# -- availability and command line ----------------------------------------------------------------


def test_availability_reports_missing_binary_and_kvm(settings: Settings, fake_binary: Path, base: Path) -> None:
    missing = FirecrackerDriver(settings, binary="firecracker-not-installed-here")
    result = missing.availability()
    assert not result.ok and "not on PATH" in result.detail
    assert missing.availability() is result  # cached

    no_kvm = FirecrackerDriver(settings, binary=str(fake_binary), kvm_device=base / "no-kvm")
    result = no_kvm.availability()
    assert not result.ok and "no-kvm does not exist" in result.detail
    assert result.facts["firecracker"] == str(fake_binary)


def test_default_driver_is_unavailable_on_this_host(settings: Settings) -> None:
    # No firecracker binary is installed here; the answer says so in words.
    result = FirecrackerDriver(settings).availability()
    if shutil.which("firecracker") is None:
        assert not result.ok and "firecracker" in result.detail


def test_jailer_command_line(settings: Settings, fake_binary: Path, make_spec: Callable[..., VmSpec]) -> None:
    jailed = FirecrackerDriver(
        settings,
        binary=str(fake_binary),
        jailer=JailerConfig(uid=123, gid=100, netns="/var/run/netns/{fc_id}"),
    )
    spec = make_spec("vm_odd.id")
    argv = jailed.command(spec)
    assert argv[:3] == ["jailer", "--id", "vm-odd-id"]
    assert argv[argv.index("--exec-file") + 1] == str(fake_binary)
    assert argv[argv.index("--uid") + 1] == "123" and argv[argv.index("--gid") + 1] == "100"
    assert argv[argv.index("--chroot-base-dir") + 1] == str(spec.directory / "jail")
    assert argv[argv.index("--netns") + 1] == "/var/run/netns/vm-odd-id"
    assert argv[-3:] == ["--", "--api-sock", "/firecracker.sock"]
    assert spec.agent_secret not in " ".join(argv)
    plain = FirecrackerDriver(settings, binary="firecracker").command(spec)
    assert plain == [
        "firecracker",
        "--api-sock",
        str(spec.directory / "firecracker.sock"),
        "--id",
        "vm-odd-id",
    ]


# -- home volume (ADR 0011) -----------------------------------------------------------------------


def test_home_volume_is_the_third_drive_and_named_in_the_config_disk(
    driver: FirecrackerDriver, make_spec: Callable[..., VmSpec], base: Path
) -> None:
    from remotecli.drivers.base import HomeDisk

    volume = base / "data" / "volumes" / "vol-1.ext4"
    volume.parent.mkdir(parents=True, exist_ok=True)
    volume.write_bytes(b"\0" * 4096)
    spec = make_spec(home=HomeDisk(volume_id="vol-1", location=str(volume)))
    driver.create(spec)

    sequence = calls(spec)
    assert sequence.index("PUT /drives/config") < sequence.index("PUT /drives/home") < sequence.index("PUT /actions")
    assert body_of(spec, "PUT /drives/home") == {
        "drive_id": "home",
        "path_on_host": str(volume),
        "is_root_device": False,
        "is_read_only": False,
    }
    config = (spec.directory / "config.img").read_bytes()
    doc = json.loads(config[: config.index(b"\0")])
    assert doc["home_volume_id"] == "vol-1"
    assert doc["home_device"] == "/dev/vdc" and doc["home_path"] == "/home/cli" and doc["home_serial"] == "rc-home"

    # Destroying the VM never touches the volume.
    driver.destroy(spec)
    assert volume.read_bytes() == b"\0" * 4096


def test_no_home_drive_without_a_home(driver: FirecrackerDriver, make_spec: Callable[..., VmSpec]) -> None:
    spec = make_spec()
    driver.create(spec)
    assert "PUT /drives/home" not in calls(spec)
    config = (spec.directory / "config.img").read_bytes()
    assert "home_volume_id" not in json.loads(config[: config.index(b"\0")])
