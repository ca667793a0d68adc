"""The Incus driver against a fake Incus API at the client seam (an ``httpx.MockTransport``).

The fake keeps instances (status, location, config, devices), pushed files, cluster members and
operations the way Incus answers them (sync/async envelopes, ``/1.0/operations/<id>/wait``, 404
errors), and records every request. What is checked: create (the instance body, the files pushed,
no secret outside the 0600 config disk), idempotence, inspect/list/destroy from the API, a member
that is offline (UNKNOWN, never DEAD), event parsing, the mTLS configuration, and TLS pinning of
the guest agent (through the real TLS forward of ``launch.py`` to a plain HTTP agent).
"""

from __future__ import annotations

import json
import socket
import ssl
import stat
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from remotecli.agent.client import AgentClient
from remotecli.config import Settings
from remotecli.drivers.base import ImageRef, Liveness, PowerState, VmGone, VmSpec
from remotecli.drivers.incus import certs, launch
from remotecli.drivers.incus.client import Connection, IncusClient, IncusUnreachable, parse_event
from remotecli.drivers.incus.driver import CFG_CERT, CFG_PORT, IN, IncusDriver
from remotecli.errors import AgentUnreachable, DriverUnavailable

pytestmark = pytest.mark.timeout(30)

SECRET = "s3cr3t-agent-secret-value"


class FakeIncus:
    """Enough of the Incus REST API for the driver, as an httpx handler."""

    def __init__(self, project: str = "remotecli") -> None:
        self.project = project
        self.instances: dict[str, dict[str, Any]] = {}
        self.files: dict[tuple[str, str], tuple[bytes, dict[str, str]]] = {}
        self.members = {"m1": "Online", "m2": "Online", "m3": "Online"}
        self.projects: set[str] = {"default"}
        self.volumes: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.unreachable = False
        self._ops: dict[str, dict[str, Any]] = {}
        self._next_member = 0

    # -- envelopes
    @staticmethod
    def sync(meta: Any, status: int = 200) -> httpx.Response:
        return httpx.Response(status, json={"type": "sync", "status": "Success", "status_code": 200, "metadata": meta})

    @staticmethod
    def error(code: int, message: str) -> httpx.Response:
        return httpx.Response(code, json={"type": "error", "error": message, "error_code": code})

    def async_op(self, result: dict[str, Any] | None = None, *, fail: str | None = None) -> httpx.Response:
        op_id = uuid.uuid4().hex
        self._ops[op_id] = {"id": op_id, "status": "Failure" if fail else "Success", "err": fail or "",
                            "metadata": result or {}}
        return httpx.Response(202, json={"type": "async", "status": "Operation created", "status_code": 100,
                                         "operation": f"/1.0/operations/{op_id}", "metadata": {"id": op_id}})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.unreachable:
            raise httpx.ConnectError("member down", request=request)
        url = urlsplit(str(request.url))
        query = parse_qs(url.query)
        self.requests.append((request.method, url.path, query))
        path, method = url.path, request.method
        parts = path.strip("/").split("/")
        if path == "/1.0":
            return self.sync({"auth": "trusted", "environment": {"server_version": "6.0.4"}})
        if path.startswith("/1.0/operations/"):
            return self.sync(self._ops[parts[2]])
        if path == "/1.0/cluster/members":
            return self.sync([{"server_name": n, "url": f"https://10.77.0.{i + 1}:8443", "status": st}
                              for i, (n, st) in enumerate(self.members.items())])
        if path.startswith("/1.0/projects"):
            if method == "POST":
                self.projects.add(json.loads(request.content)["name"])
                return self.sync({})
            return self.sync({"name": parts[2]}) if parts[2] in self.projects else self.error(404, "not found")
        if path.startswith("/1.0/storage-pools/"):
            return self._volumes(request, parts, query)
        if path == "/1.0/instances" and method == "GET":
            return self.sync([self._doc(i) for i in self.instances.values()])
        if path == "/1.0/instances" and method == "POST":
            body = json.loads(request.content)
            assert query.get("project") == [self.project]
            location = (query.get("target") or [list(self.members)[self._next_member % len(self.members)]])[0]
            self._next_member += 1
            self.instances[body["name"]] = {**body, "status": "Stopped", "location": location}
            return self.async_op()
        if len(parts) >= 3 and parts[1] == "instances":
            name = parts[2]
            inst = self.instances.get(name)
            if inst is None:
                return self.error(404, "Instance not found")
            rest = parts[3] if len(parts) > 3 else ""
            if rest == "" and method == "GET":
                return self.sync(self._doc(inst))
            if rest == "" and method == "PATCH":
                patch = json.loads(request.content)
                inst["devices"].update(patch.get("devices", {}))
                inst["config"].update(patch.get("config", {}))
                return self.async_op()
            if rest == "" and method == "DELETE":
                if inst["status"] != "Stopped":
                    return self.error(400, "Instance is running")
                del self.instances[name]
                return self.async_op()
            if rest == "state" and method == "GET":
                return self.sync({"status": inst["status"], "pid": 4242 if inst["status"] == "Running" else 0})
            if rest == "state" and method == "PUT":
                action = json.loads(request.content)["action"]
                inst["status"] = {"start": "Running", "stop": "Stopped", "freeze": "Frozen",
                                  "unfreeze": "Running"}[action]
                return self.async_op()
            if rest == "files" and method == "POST":
                headers = {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-incus")}
                self.files[(name, query["path"][0])] = (request.content, headers)
                return self.sync({})
            if rest == "files" and method == "GET":
                found = self.files.get((name, query["path"][0]))
                return httpx.Response(200, content=found[0]) if found else self.error(404, "not found")
        return self.error(404, f"no fake for {method} {path}")

    def _doc(self, inst: dict[str, Any]) -> dict[str, Any]:
        return {"name": inst["name"], "status": inst["status"], "location": inst["location"], "type": inst["type"],
                "config": inst["config"], "devices": inst["devices"]}

    def _volumes(self, request: httpx.Request, parts: list[str], query: dict[str, list[str]]) -> httpx.Response:
        if request.method == "POST":
            body = json.loads(request.content)
            self.volumes[body["name"]] = {**body, "location": (query.get("target") or ["m2"])[0]}
            return self.async_op()
        name = parts[5] if len(parts) > 5 else ""
        vol = self.volumes.get(name)
        if vol is None:
            return self.error(404, "Storage volume not found")
        if len(parts) > 6 and parts[6] == "state":
            return self.sync({"usage": {"used": 12345}})
        if request.method == "DELETE":
            del self.volumes[name]
            return self.async_op()
        if request.method == "PATCH":
            vol["config"].update(json.loads(request.content)["config"])
            return self.sync({})
        return self.sync(vol)


@pytest.fixture
def image(tmp_path: Path) -> ImageRef:
    images = tmp_path / "data" / "images"
    kdir, cdir = images / "kernel-abc", images / "cli-def"
    kdir.mkdir(parents=True)
    cdir.mkdir(parents=True)
    for path in (kdir / "vmlinuz", cdir / "initrd.img", cdir / "rootfs.ext4"):
        path.write_bytes(b"\0" * 4096)
    return ImageRef("cli", kdir / "vmlinuz", cdir / "initrd.img", cdir / "rootfs.ext4", "def")


@pytest.fixture
def fake() -> FakeIncus:
    return FakeIncus()


@pytest.fixture
def driver(tmp_path: Path, fake: FakeIncus) -> IncusDriver:
    settings = Settings(data_dir=tmp_path / "data", driver="incus", incus_url="https://10.77.0.1:8443",
                        incus_member_images_dir="/srv/remotecli/images")
    client = IncusClient(Connection(url=settings.incus_url, project="remotecli"), transport=httpx.MockTransport(fake))
    return IncusDriver(settings, client=client)


def _spec(tmp_path: Path, image: ImageRef, vm_id: str = "vm-0001") -> VmSpec:
    return VmSpec(vm_id=vm_id, vm_type="cli", vcpus=2, memory_mib=1024, directory=tmp_path / "data" / "vms" / vm_id,
                  agent_secret=SECRET, image=image)


def test_create_makes_one_instance_with_jail_limits_tls_and_files(tmp_path: Path, driver: IncusDriver,
                                                                   fake: FakeIncus, image: ImageRef) -> None:
    info = driver.create(_spec(tmp_path, image))
    assert info.endpoint == "incus://vm-0001" and info.accel == "tcg"
    assert "remotecli" in fake.projects  # its own project, made on first use
    inst = fake.instances["vm-0001"]
    assert inst["type"] == "container" and inst["status"] == "Running"
    assert inst["source"] == {"type": "image", "alias": "remotecli-runner"}
    assert inst["config"]["limits.memory"] == "1408MiB" and inst["config"]["limits.cpu"] == "2"
    assert f"lxc.init.cmd = /usr/bin/python3 {IN}/launch.py" in inst["config"]["raw.lxc"]
    assert inst["devices"]["agent"]["type"] == "proxy"
    assert inst["devices"]["agent"]["connect"] == "tcp:127.0.0.1:7443"
    assert inst["devices"]["images"] == {"type": "disk", "source": "/srv/remotecli/images", "path": f"{IN}/images",
                                         "readonly": "true"}
    cert_pem = inst["config"][CFG_CERT]
    assert "BEGIN CERTIFICATE" in cert_pem and "PRIVATE" not in json.dumps(inst)
    pushed = {path: (data, headers) for (name, path), (data, headers) in fake.files.items() if name == "vm-0001"}
    assert set(pushed) >= {f"{IN}/launch.py", f"{IN}/launch.json", f"{IN}/agent-tls.crt", f"{IN}/agent-tls.key",
                           f"{IN}/vm/config.img", f"{IN}/vm/disk.qcow2"}
    # The secret is only in the 0600 config disk; the key is 0600 too.
    for path, (data, _headers) in pushed.items():
        assert (SECRET.encode() in data) == (path == f"{IN}/vm/config.img"), path
    assert pushed[f"{IN}/vm/config.img"][1]["x-incus-mode"] == "0600"
    assert pushed[f"{IN}/agent-tls.key"][1]["x-incus-mode"] == "0600"
    assert pushed[f"{IN}/agent-tls.crt"][0].decode() == cert_pem
    launch_cfg = json.loads(pushed[f"{IN}/launch.json"][0])
    argv = launch_cfg["argv"]
    assert argv[0] == "/usr/bin/qemu-system-x86_64" and "-daemonize" not in argv
    assert f"{IN}/images/kernel-abc/vmlinuz" in argv and f"{IN}/images/cli-def/initrd.img" in argv
    assert any("hostfwd=tcp:127.0.0.1:17000-:7000" in a for a in argv)
    assert b"images/cli-def/rootfs.ext4" in pushed[f"{IN}/vm/disk.qcow2"][0]  # the overlay's backing file
    # Idempotent: a running instance is returned as it is, nothing is created again.
    before = len(fake.requests)
    assert driver.create(_spec(tmp_path, image)).endpoint == "incus://vm-0001"
    assert not any(m == "POST" and p == "/1.0/instances" for m, p, _ in fake.requests[before:])


def test_inspect_list_pause_stop_destroy_from_the_api(tmp_path: Path, driver: IncusDriver, fake: FakeIncus,
                                                      image: ImageRef) -> None:
    spec = _spec(tmp_path, image)
    assert driver.inspect(spec).liveness is Liveness.DEAD  # never created: missing
    driver.create(spec)
    seen = driver.inspect(spec)
    assert seen.liveness is Liveness.ALIVE and seen.power is PowerState.RUNNING
    assert seen.details["member"] == fake.instances["vm-0001"]["location"]
    driver.pause(spec)
    assert driver.inspect(spec).power is PowerState.PAUSED
    driver.resume(spec)
    assert [h.vm_id for h in driver.list_host_vms(tmp_path)] == ["vm-0001"]
    assert driver.list_host_vms(tmp_path)[0].ports == (int(fake.instances["vm-0001"]["config"][CFG_PORT]),)
    # QEMU exited: the launcher (the container's init) exits and the container stops.
    fake.instances["vm-0001"]["status"] = "Stopped"
    dead = driver.inspect(spec)
    assert dead.liveness is Liveness.DEAD and "stopped" in dead.reason
    assert driver.has_state(spec)
    driver.start(spec)
    assert fake.instances["vm-0001"]["status"] == "Running"
    driver.stop(spec, 1.0)
    assert fake.instances["vm-0001"]["status"] == "Stopped"
    driver.destroy(spec)
    assert "vm-0001" not in fake.instances and not spec.directory.exists()
    driver.destroy(spec)  # idempotent
    assert not driver.has_state(spec)
    with pytest.raises(VmGone):
        driver.start(spec)
    with pytest.raises(VmGone):
        driver.pause(spec)


def test_member_offline_is_unknown_not_dead_and_fence_cannot_prove(tmp_path: Path, driver: IncusDriver,
                                                                   fake: FakeIncus, image: ImageRef) -> None:
    spec = _spec(tmp_path, image)
    driver.create(spec)
    member = fake.instances["vm-0001"]["location"]
    fake.members[member] = "Offline"
    driver._members = None
    seen = driver.inspect(spec)
    assert seen.liveness is Liveness.UNKNOWN and member in seen.reason
    assert driver.fence(spec).liveness is Liveness.UNKNOWN  # no proof: the volume stays put
    fake.members[member] = "Online"
    driver._members = None
    assert driver.fence(spec).liveness is Liveness.DEAD  # back: stopped for good, proven
    assert fake.instances["vm-0001"]["status"] == "Stopped"
    fake.unreachable = True
    assert driver.inspect(spec).liveness is Liveness.UNKNOWN  # the API itself is down: not a death


def test_destroy_of_a_running_instance_stops_it_first(tmp_path: Path, driver: IncusDriver, fake: FakeIncus,
                                                      image: ImageRef) -> None:
    spec = _spec(tmp_path, image)
    driver.create(spec)
    driver.destroy(spec)
    calls = [(m, p) for m, p, _ in fake.requests if p.startswith("/1.0/instances/vm-0001") and m in ("PUT", "DELETE")]
    assert calls[-2:] == [("PUT", "/1.0/instances/vm-0001/state"), ("DELETE", "/1.0/instances/vm-0001")]


def test_home_volume_is_a_custom_volume_on_the_instance_member(tmp_path: Path, driver: IncusDriver,
                                                               fake: FakeIncus, image: ImageRef) -> None:
    from remotecli.drivers.base import HomeDisk
    from remotecli.drivers.incus.driver import volume_location

    location = volume_location("default", "rc-home-u1")
    driver.create_volume(location, 1 << 30, owner_uid=1000)
    assert driver.volume_problem(location) is None
    with pytest.raises(Exception, match="never formatted again"):
        driver.create_volume(location, 1 << 30, owner_uid=1000)
    spec = VmSpec(vm_id="vm-0002", vm_type="cli", vcpus=1, memory_mib=512, directory=tmp_path / "vm-0002",
                  agent_secret=SECRET, image=image, home=HomeDisk(volume_id="v1", location=location))
    driver.create(spec)
    inst = fake.instances["vm-0002"]
    assert inst["location"] == fake.volumes["rc-home-u1"]["location"]  # placed where its volume is
    assert inst["devices"]["home"] == {"type": "disk", "pool": "default", "source": "rc-home-u1",
                                       "path": f"{IN}/home"}
    cfg = json.loads(fake.files[("vm-0002", f"{IN}/launch.json")][0])
    assert cfg["home"]["format"] is True and cfg["home"]["size_bytes"] == 1 << 30
    assert fake.volumes["rc-home-u1"]["config"]["user.remotecli.formatted"] == "true"
    assert driver.volume_usage(location) == (12345, 1 << 30)
    driver.delete_volume(location)
    driver.delete_volume(location)
    assert driver.volume_problem(location) is not None


def test_event_parsing() -> None:
    event = parse_event(json.dumps({
        "type": "lifecycle", "location": "m2", "project": "remotecli",
        "metadata": {"action": "instance-stopped", "source": "/1.0/instances/vm-0001?project=remotecli"},
    }), project="remotecli")
    assert event is not None and event.instance == "vm-0001" and event.action == "instance-stopped"
    assert event.location == "m2" and event.wakes_reconciler
    older = parse_event(json.dumps({"type": "lifecycle", "metadata": {
        "action": "instance-started", "source": "/1.0/instances/vm-9?project=remotecli"}}), project="remotecli")
    assert older is not None and older.instance == "vm-9"
    assert parse_event(json.dumps({"type": "lifecycle", "project": "other", "metadata": {
        "action": "instance-stopped", "source": "/1.0/instances/x"}}), project="remotecli") is None
    assert parse_event(json.dumps({"type": "logging", "metadata": {}}), project="remotecli") is None
    assert parse_event("not json", project="remotecli") is None
    member = parse_event(json.dumps({"type": "lifecycle", "project": "remotecli", "metadata": {
        "action": "cluster-member-updated", "source": "/1.0/cluster/members/m1"}}), project="remotecli")
    assert member is not None and member.instance is None and not member.wakes_reconciler


def test_mtls_configuration(tmp_path: Path) -> None:
    cert, key = tmp_path / "incus" / "client.crt", tmp_path / "incus" / "client.key"
    pair = certs.ensure_client_cert(cert, key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and "PRIVATE" not in repr(pair)
    assert certs.ensure_client_cert(cert, key).fingerprint == pair.fingerprint  # kept, not made again
    server = certs.make_self_signed("incus-cluster", server=True)
    conn = Connection(url="https://10.77.0.1:8443", project="p", client_cert=cert, client_key=key,
                      server_cert_pem=server.cert_pem)
    context = conn.ssl_context()
    assert context.verify_mode is ssl.CERT_REQUIRED and not context.check_hostname
    assert context.cert_store_stats()["x509"] == 1  # the pinned certificate is the only trust anchor
    with pytest.raises(DriverUnavailable):
        Connection(url="https://10.77.0.1:8443", project="p", client_cert=cert, client_key=key).ssl_context()
    with pytest.raises(DriverUnavailable):
        IncusClient(Connection(url="http://10.77.0.1:8443", project="p"))  # never plain HTTP across hosts
    unix = IncusClient(Connection(url="unix:///var/lib/incus/unix.socket", project="p"))
    assert unix.events_url() == "ws://incus/1.0/events?type=lifecycle&project=p"
    settings = Settings(data_dir=tmp_path / "d", driver="incus", incus_url="https://10.77.0.1:8443",
                        incus_server_cert=tmp_path / "server.crt")
    (tmp_path / "server.crt").write_text(server.cert_pem)
    made = IncusDriver(settings).connection()  # makes the client certificate on first run
    assert made.client_cert == tmp_path / "d" / "incus" / "client.crt" and made.client_cert.is_file()
    assert IncusClient(made).events_url().startswith("wss://10.77.0.1:8443/1.0/events?")


def test_unreachable_api_is_an_incus_error(tmp_path: Path, fake: FakeIncus) -> None:
    fake.unreachable = True
    client = IncusClient(Connection(url="https://10.77.0.1:8443", project="p"), transport=httpx.MockTransport(fake))
    with pytest.raises(IncusUnreachable):
        client.instances()


# ------------------------------------------------------------------ TLS to the guest agent, pinned


class _Agent(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"vm_id": "vm-0001", "vm_type": "cli", "hostname": "h", "uptime_s": 1.0,
                           "agent_version": "t", "boot_id": "b"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def tls_forward(tmp_path: Path) -> Iterator[tuple[int, certs.CertPair]]:
    """A plain-HTTP agent on loopback behind launch.py's real TLS forward with a per-VM certificate."""
    agent = ThreadingHTTPServer(("127.0.0.1", 0), _Agent)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    pair = certs.make_self_signed("remotecli-vm-vm-0001", server=True, dns_names=("vm-0001",))
    (tmp_path / "a.crt").write_text(pair.cert_pem)
    (tmp_path / "a.key").write_text(pair.key_pem)
    port = _free_port()
    cfg = {"tls_port": port, "tls_bind": "127.0.0.1", "hostfwd_port": agent.server_address[1],
           "tls_cert": str(tmp_path / "a.crt"), "tls_key": str(tmp_path / "a.key")}
    threading.Thread(target=launch.serve_tls, args=(cfg,), daemon=True).start()
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            threading.Event().wait(0.02)
    yield port, pair
    agent.shutdown()


def test_agent_client_pins_the_vm_certificate(tls_forward: tuple[int, certs.CertPair], driver: IncusDriver,
                                              fake: FakeIncus) -> None:
    port, pair = tls_forward
    pinned = AgentClient(f"tcp://127.0.0.1:{port}", SECRET, timeout=5, tls=certs.pinned_client_context(pair.cert_pem))
    with pinned:
        assert pinned.health().vm_id == "vm-0001"
    other = certs.make_self_signed("remotecli-vm-vm-0001", server=True, dns_names=("vm-0001",))
    wrong = AgentClient(f"tcp://127.0.0.1:{port}", SECRET, timeout=5, tls=certs.pinned_client_context(other.cert_pem))
    with wrong, pytest.raises(AgentUnreachable):
        wrong.health()  # same name, another key: refused
    plain = AgentClient(f"tcp://127.0.0.1:{port}", SECRET, timeout=5)
    with plain, pytest.raises(AgentUnreachable):
        plain.health()  # no plain HTTP through the forward
    # The driver's agent_client finds the member address, the port and the pin in the instance.
    fake.instances["vm-0001"] = {"name": "vm-0001", "type": "container", "status": "Running", "location": "m1",
                                 "config": {CFG_CERT: pair.cert_pem, CFG_PORT: str(port)}, "devices": {}}
    target, cert = driver.agent_target("incus://vm-0001")
    assert target == f"tcp://10.77.0.1:{port}" and cert == pair.cert_pem


# ------------------------------------------------------------------ partitions are not deaths (reconciler)


def test_reconciler_unknown_during_grace_then_failed_and_no_second_cli_vm(ctx: Any, fake_driver: Any) -> None:
    """A driver that says 'member unreachable' makes a running VM ``unknown``; during
    ``member_unreachable_grace_s`` it is watched (ensure refuses to make a second CLI VM); an
    answer brings it back; after the grace it is failed; the home stays until a fence proves it dead."""
    import datetime as dt

    from sqlalchemy import update

    from remotecli.background.reconciler import Reconciler
    from remotecli.db.models import Vm
    from remotecli.domain.states import VmStatus
    from remotecli.drivers.base import Inspection
    from remotecli.errors import WorkspaceUnavailable
    from remotecli.services import users as users_service
    from remotecli.services import vm_manager
    from remotecli.services.users import Principal

    user = users_service.create_user(ctx.db, "part")
    alice = Principal(user.id, user.name, False)
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    cut = {"on": False}
    real_inspect, real_fence = fake_driver.inspect, fake_driver.fence

    def inspect(spec: VmSpec) -> Inspection:
        if cut["on"] and spec.vm_id == vm.id:
            return Inspection(Liveness.UNKNOWN, reason="member m2 unreachable",
                              details={"member": "m2", "member_unreachable": "m2"})
        return real_inspect(spec)

    def fence(spec: VmSpec, timeout: float = 5.0) -> Inspection:
        return inspect(spec) if cut["on"] and spec.vm_id == vm.id else real_fence(spec, timeout)

    fake_driver.inspect, fake_driver.fence = inspect, fence
    rec = Reconciler(ctx, owner="t")
    cut["on"] = True
    rec.run_once()
    assert vm_manager.get_vm(ctx, None, vm.id).status == VmStatus.UNKNOWN.value
    rec.run_once()  # within the grace: still unknown, no strikes to failed
    assert vm_manager.get_vm(ctx, None, vm.id).status == VmStatus.UNKNOWN.value
    with pytest.raises(WorkspaceUnavailable):
        vm_manager.ensure_cli_vm(ctx, alice)  # never a second CLI VM during the grace
    cut["on"] = False
    rec.run_once()
    assert vm_manager.get_vm(ctx, None, vm.id).status == VmStatus.RUNNING.value  # the member came back
    cut["on"] = True
    rec.run_once()
    with ctx.db.transaction() as session:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=ctx.settings.member_unreachable_grace_s + 1)
        session.execute(update(Vm).where(Vm.id == vm.id).values(status_changed_at=past))
    rec.run_once()
    failed = vm_manager.get_vm(ctx, None, vm.id)
    assert failed.status == VmStatus.FAILED.value and "unreachable" in (failed.status_reason or "")
    from remotecli.db.models import Volume

    with ctx.db.read() as session:
        home = session.query(Volume).filter(Volume.user_id == user.id).one()
    assert home.attached_vm_id == vm.id  # not fenced yet: the home stays with it
    cut["on"] = False
    rec.run_once()  # the member is back: fenced, the home is freed
    with ctx.db.read() as session:
        home = session.query(Volume).filter(Volume.user_id == user.id).one()
    assert home.attached_vm_id is None
    new, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and new.id != vm.id


def test_workspace_volume_paths_map_to_custom_volumes() -> None:
    from remotecli.drivers.incus.driver import parse_volume_location, volume_location

    assert parse_volume_location("/data/volumes/vol-1234.ext4", "homes") == ("homes", "home-vol-1234")
    assert parse_volume_location(volume_location("ceph", "home-x")) == ("ceph", "home-x")
    from remotecli.errors import DriverError

    with pytest.raises(DriverError):
        parse_volume_location("incus:nopool")


def test_client_goes_on_through_another_member(fake: FakeIncus) -> None:
    down = {"10.77.0.1"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host in down:
            raise httpx.ConnectTimeout("cut off", request=request)
        return fake(request)

    client = IncusClient(Connection(url="https://10.77.0.1:8443,https://10.77.0.2:8443", project="remotecli"),
                         transport=httpx.MockTransport(handler))
    assert client.instances() == [] and client.current_url == "https://10.77.0.2:8443"
    assert client.events_url().startswith("wss://10.77.0.2:8443/")
    down.add("10.77.0.2")
    with pytest.raises(IncusUnreachable):
        client.instances()
