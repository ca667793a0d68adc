"""The real guest agent, run as a subprocess on the host (loopback only), driven by AgentClient.

The agent is started the way a VM image runs it: the package copied to ``<tmp>/remotecli_guest``
and ``python -S -m remotecli_guest --config <file>`` with ``PYTHONPATH=<tmp>`` (``-S``: no
site-packages, so an accidental non-stdlib or ``remotecli`` import fails here too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import remotecli.agent.guest as guest_package
from remotecli.agent.client import (
    AgentCallError,
    AgentClient,
    AgentFileNotFound,
    AgentPortUnreachable,
    PtyData,
    PtyExit,
    PtyStream,
)
from remotecli.errors import AgentError, AgentRejected, AgentTimeout, AgentUnreachable
from tests.support.server import free_port

pytestmark = pytest.mark.timeout(60)

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="user switching needs root")

# The guest image runs Python 3.13; point this at another interpreter to run the agent under it.
GUEST_PYTHON = os.environ.get("REMOTECLI_TEST_GUEST_PYTHON") or sys.executable

LISTEN_ARGS = ("--listen-host", "127.0.0.1", "--port", "0")

SECRET = "vm-a-secret-" + "x" * 32
OTHER_SECRET = "vm-b-secret-" + "y" * 32


@dataclass
class RunningAgent:
    process: subprocess.Popen[bytes]
    port: int
    secret: str
    workdir: Path
    log_lines: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def client(self, secret: str | None = None, timeout: float = 10.0) -> AgentClient:
        return AgentClient(self.endpoint, secret or self.secret, timeout=timeout)

    def logs(self) -> str:
        return "\n".join(self.log_lines)


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def start_agent(workdir: Path, secret: str, vm_id: str) -> RunningAgent:
    workdir.mkdir(parents=True, exist_ok=True)
    package_dir = workdir / "opt" / "remotecli_guest"
    if not package_dir.exists():
        shutil.copytree(
            Path(guest_package.__file__).parent,
            package_dir,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    config = {
        "vm_id": vm_id,
        "vm_type": "cli",
        "agent_secret": secret,
        "agent_port": 7000,
        "hostname": f"{vm_id}.guest",
        "cli_user": _current_user(),
    }
    config_path = workdir / "config.img"
    config_path.write_bytes(json.dumps(config).encode().ljust(64 * 1024, b"\0")[: 64 * 1024])
    config_path.chmod(0o600)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(package_dir.parent)}
    process = subprocess.Popen(
        [GUEST_PYTHON, "-S", "-m", "remotecli_guest", "--config", str(config_path), *LISTEN_ARGS],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    listening = threading.Event()
    found_port: list[int] = []

    def pump() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "listening":
                found_port.append(int(record["port"]))
                listening.set()

    threading.Thread(target=pump, daemon=True).start()
    if not listening.wait(15):
        process.kill()
        raise AssertionError("agent did not start:\n" + "\n".join(lines))
    return RunningAgent(process=process, port=found_port[0], secret=secret, workdir=workdir, log_lines=lines)


def stop_agent(agent: RunningAgent) -> int | None:
    """SIGTERM the agent; its exit code, or None when it had to be killed."""
    agent.process.terminate()
    try:
        return agent.process.wait(5)
    except subprocess.TimeoutExpired:
        agent.process.kill()
        agent.process.wait(5)
        return None


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    running = start_agent(tmp_path_factory.mktemp("agent-a"), SECRET, "vm-a")
    yield running
    assert stop_agent(running) == 0, "the agent did not stop cleanly on SIGTERM"
    logs = running.logs()
    # Logs are JSON lines tagged with the module, and never carry the secret.
    for line in running.log_lines:
        assert json.loads(line)["module"] == "guest-agent"
    assert SECRET not in logs
    assert "x" * 32 not in logs


@pytest.fixture
def client(agent: RunningAgent) -> Iterator[AgentClient]:
    with agent.client() as c:
        yield c


def _process_group_alive(pgid: int) -> list[int]:
    """PIDs (not zombies) whose process group is ``pgid``."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            alive.append(int(entry))
    return alive


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] not in ("Z", "X")


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- health and authentication ------------------------------------------------------------------


def test_health(client: AgentClient) -> None:
    health = client.health()
    assert health.vm_id == "vm-a"
    assert health.vm_type == "cli"
    assert health.hostname == "vm-a.guest"
    assert health.uptime_s > 0
    assert health.agent_version == guest_package.AGENT_VERSION
    assert health.boot_id
    assert client.health().boot_id == health.boot_id


def test_request_without_secret_is_refused(agent: RunningAgent) -> None:
    for headers in ({}, {"Authorization": "Basic Zm9vOmJhcg=="}, {"Authorization": "Bearer wrong-secret"}):
        response = httpx.get(f"http://127.0.0.1:{agent.port}/v1/health", headers=headers)
        assert response.status_code == 401
        assert response.json()["code"] == "unauthorized"
        assert SECRET not in response.text


def test_wrong_secret_is_rejected_without_leaking_it(agent: RunningAgent) -> None:
    with agent.client(secret=OTHER_SECRET) as wrong:
        with pytest.raises(AgentRejected) as caught:
            wrong.health()
        with pytest.raises(AgentRejected):
            wrong.exec(["true"], timeout_s=5)
        assert OTHER_SECRET not in repr(wrong)
    error = caught.value
    for text in (str(error), repr(error), error.message, error.log_detail or ""):
        assert OTHER_SECRET not in text
        assert SECRET not in text
    assert error.__cause__ is None


def test_another_vms_secret_is_rejected(agent: RunningAgent, tmp_path: Path) -> None:
    other = start_agent(tmp_path / "agent-b", OTHER_SECRET, "vm-b")
    try:
        with other.client(secret=SECRET) as crossed, pytest.raises(AgentRejected):
            crossed.health()
        with other.client() as own:
            assert own.health().vm_id == "vm-b"
    finally:
        stop_agent(other)
    assert OTHER_SECRET not in other.logs()


def test_repr_and_errors_never_show_the_secret(agent: RunningAgent) -> None:
    client = AgentClient(f"tcp://127.0.0.1:{free_port()}", SECRET, timeout=2)
    assert SECRET not in repr(client)
    with pytest.raises(AgentUnreachable) as caught:
        client.health()
    assert SECRET not in str(caught.value) and SECRET not in (caught.value.log_detail or "")
    client.close()


def test_unreachable_and_wait_ready(agent: RunningAgent) -> None:
    with AgentClient(f"tcp://127.0.0.1:{free_port()}", SECRET, timeout=2) as nobody:
        started = time.monotonic()
        with pytest.raises(AgentTimeout):
            nobody.wait_ready(0.6, poll_interval=0.1)
        assert time.monotonic() - started < 3
    with agent.client() as c:
        assert c.wait_ready(5).vm_id == "vm-a"


def test_read_timeout_is_agent_timeout() -> None:
    # Accepts connections (kernel backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        with AgentClient(f"tcp://127.0.0.1:{port}", SECRET, timeout=0.5) as c, pytest.raises(AgentTimeout):
            c.health()


def test_unknown_endpoint_and_upgrade_required(agent: RunningAgent) -> None:
    headers = {"Authorization": f"Bearer {SECRET}"}
    response = httpx.get(f"http://127.0.0.1:{agent.port}/v1/nope", headers=headers)
    assert response.status_code == 404
    response = httpx.get(f"http://127.0.0.1:{agent.port}/v1/pty", headers=headers)
    assert response.status_code == 426
    assert response.json()["code"] == "upgrade_required"
    response = httpx.post(f"http://127.0.0.1:{agent.port}/v1/exec", headers=headers, content=b"{not json")
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"


def test_shutdown_is_refused_outside_a_guest(client: AgentClient) -> None:
    with pytest.raises(AgentCallError) as caught:
        client.shutdown()
    assert caught.value.agent_code == "shutdown_unavailable"


# --- exec ---------------------------------------------------------------------------------------


def test_exec_exit_code_and_outputs(client: AgentClient) -> None:
    result = client.exec(["sh", "-c", "printf 'out\\n'; printf 'err\\n' >&2; exit 7"], timeout_s=10)
    assert result.exit_code == 7
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"
    assert not result.timed_out
    assert result.duration_s < 5


def test_exec_stdin_env_cwd(client: AgentClient, tmp_path: Path) -> None:
    result = client.exec(
        ["sh", "-c", 'cat; printf "|%s|%s" "$GREETING" "$(pwd)"'],
        timeout_s=10,
        env={"GREETING": "hello"},
        cwd=str(tmp_path),
        stdin=b"\x00binary\xff",
    )
    assert result.exit_code == 0
    assert result.stdout == b"\x00binary\xff|hello|" + str(tmp_path).encode()


def test_exec_timeout_kills_the_process_group(client: AgentClient) -> None:
    started = time.monotonic()
    result = client.exec(["sh", "-c", "echo $$; sleep 30 & sleep 30"], timeout_s=1)
    elapsed = time.monotonic() - started
    assert result.timed_out
    assert elapsed < 5
    assert result.exit_code == 128 + 9 and result.signal == 9
    pgid = int(result.stdout.split()[0])
    assert _wait_until(lambda: not _process_group_alive(pgid), 3), _process_group_alive(pgid)


def test_exec_output_is_capped(client: AgentClient) -> None:
    result = client.exec(["sh", "-c", "head -c 9000000 /dev/zero; echo tail >&2"], timeout_s=20)
    assert result.exit_code == 0
    assert len(result.stdout) == 8 * 1024 * 1024
    assert result.stdout_truncated and not result.stderr_truncated
    assert result.stderr == b"tail\n"


def test_exec_missing_program(client: AgentClient) -> None:
    with pytest.raises(AgentCallError) as caught:
        client.exec(["/nonexistent/program"], timeout_s=5)
    assert caught.value.agent_code == "spawn_failed"
    assert caught.value.status == 400
    assert isinstance(caught.value, AgentError)


def test_exec_unknown_user(client: AgentClient) -> None:
    with pytest.raises(AgentCallError) as caught:
        client.exec(["true"], timeout_s=5, user="no-such-user-here")
    assert caught.value.agent_code == "unknown_user"


@needs_root
def test_exec_as_another_user(client: AgentClient) -> None:
    result = client.exec(["sh", "-c", 'id -u; id -g; echo "$HOME:$USER"'], timeout_s=10, user="nobody")
    assert result.exit_code == 0, result.stderr
    uid, gid, home = result.stdout.decode().split()
    import pwd

    entry = pwd.getpwnam("nobody")
    assert int(uid) == entry.pw_uid != 0
    assert int(gid) == entry.pw_gid
    assert home == f"{entry.pw_dir}:nobody"


def test_many_concurrent_requests(agent: RunningAgent) -> None:
    results: list[float] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            with agent.client() as c:
                results.append(c.exec(["sleep", "0.5"], timeout_s=10).duration_s)
                c.health()
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not errors
    assert len(results) == 24
    assert time.monotonic() - started < 5


# --- files --------------------------------------------------------------------------------------


def test_write_and_read_file(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "creds" / "nested" / "token.json"
    payload = b'{"token": "t"}\x00\xff' * 100
    info = client.write_file(str(target), payload, mode=0o600)
    assert info.mode == 0o600 and info.size == len(payload)
    assert target.read_bytes() == payload
    assert target.stat().st_mode & 0o7777 == 0o600
    content = client.read_file(str(target))
    assert content.data == payload
    assert content.mode == 0o600
    assert content.size == len(payload)
    assert content.owner == _current_user()


def test_write_is_atomic_and_leaves_no_temp_files(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "config.toml"
    client.write_file(str(target), b"first", mode=0o644)
    first_inode = target.stat().st_ino
    client.write_file(str(target), b"second", mode=0o640)
    assert target.read_bytes() == b"second"
    assert target.stat().st_ino != first_inode  # replaced by rename, never rewritten in place
    assert target.stat().st_mode & 0o7777 == 0o640
    with pytest.raises(AgentCallError) as caught:
        client.write_file(str(target), b"third", mode=0o600, owner="no-such-user-here")
    assert caught.value.agent_code == "unknown_user"
    assert sorted(os.listdir(tmp_path)) == ["config.toml"]
    assert target.read_bytes() == b"second"


@needs_root
def test_write_with_owner_creates_owned_parents(client: AgentClient, tmp_path: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    target = tmp_path / "home" / ".config" / "cli" / "auth.json"
    client.write_file(str(target), b"secret-ish", mode=0o600, owner="nobody", dir_mode=0o700)
    st = target.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (nobody.pw_uid, nobody.pw_gid, 0o600)
    for directory in (tmp_path / "home", tmp_path / "home" / ".config", target.parent):
        dst = directory.stat()
        assert (dst.st_uid, dst.st_mode & 0o7777) == (nobody.pw_uid, 0o700)
    content = client.read_file(str(target))
    assert (content.owner, content.mode) == ("nobody", 0o600)


def test_read_missing_file(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentFileNotFound) as caught:
        client.read_file(str(tmp_path / "missing"))
    assert caught.value.agent_code == "file_not_found"
    assert caught.value.status == 404
    with pytest.raises(AgentCallError) as caught_dir:
        client.read_file(str(tmp_path))
    assert caught_dir.value.agent_code == "not_a_file"


# --- PTY ----------------------------------------------------------------------------------------


async def _collect(
    stream: PtyStream, until: bytes | None = None, timeout: float = 10
) -> tuple[bytes, PtyExit | None]:
    output = b""
    async with asyncio.timeout(timeout):
        while True:
            event = await stream.read()
            if event is None:
                return output, None
            if isinstance(event, PtyExit):
                return output, event
            assert isinstance(event, PtyData)
            output += event.data
            if until is not None and until in output:
                return output, None


async def _read_pid(stream: PtyStream) -> int:
    """Read output until a ``pid:<digits><newline>`` line (the test commands print one first)."""
    output = b""
    while (match := re.search(rb"pid:(\d+)\r?\n", output)) is None:
        more, exit_event = await _collect(stream, until=b"\n")
        assert more or exit_event is None, output
        output += more
    return int(match.group(1))


def test_pty_runs_command_and_reports_exit(client: AgentClient) -> None:
    async def scenario() -> tuple[bytes, PtyExit | None]:
        stream = await client.open_pty(_current_user(), 80, 24, cmd="echo hi; exit 3")
        async with stream:
            return await _collect(stream)

    output, exit_event = asyncio.run(scenario())
    assert b"hi" in output
    assert exit_event == PtyExit(code=3, signal=None)


def test_pty_input_and_resize(client: AgentClient) -> None:
    async def scenario() -> tuple[bytes, PtyExit | None]:
        stream = await client.open_pty(
            _current_user(), 80, 24, cmd="stty size; read line; echo got:$line; stty size; exit 0"
        )
        async with stream:
            first, _ = await _collect(stream, until=b"24 80")
            await stream.resize(132, 50)
            await stream.write(b"abc\n")
            rest, exit_event = await _collect(stream)
            return first + rest, exit_event

    output, exit_event = asyncio.run(scenario())
    assert b"24 80" in output
    assert b"got:abc" in output
    assert b"50 132" in output
    assert exit_event is not None and exit_event.code == 0


def test_pty_hangup_kills_the_shell_and_agent_survives(client: AgentClient) -> None:
    async def scenario() -> int:
        stream = await client.open_pty(_current_user(), 80, 24, cmd="echo pid:$$; sleep 60")
        pid = await _read_pid(stream)
        await stream.write(b"partial input")
        stream._writer.transport.abort()  # drop the connection mid-stream
        return pid

    pid = asyncio.run(scenario())
    assert _wait_until(lambda: not _pid_alive(pid), 5), f"shell {pid} survived the hangup"
    assert client.health().vm_id == "vm-a"


def test_agent_stops_cleanly_with_live_streams(tmp_path: Path, echo_server: int) -> None:
    running = start_agent(tmp_path / "agent-c", SECRET, "vm-c")

    async def scenario() -> int:
        with running.client() as c:
            stream = await c.open_pty(_current_user(), 80, 24, cmd="echo pid:$$; sleep 60")
            pid = await _read_pid(stream)
            _reader, writer = await c.open_tcp(echo_server)
            c.health()  # and an idle keep-alive connection
            started = time.monotonic()
            code = await asyncio.to_thread(stop_agent, running)
            assert time.monotonic() - started < 4
            assert code == 0
            assert await stream.read() is None  # the stream ends without an exit frame
            writer.close()
            return pid

    pid = asyncio.run(scenario())
    assert _wait_until(lambda: not _pid_alive(pid), 3), "the shell outlived the agent"


@needs_root
def test_pty_as_another_user(client: AgentClient) -> None:
    async def scenario() -> tuple[bytes, PtyExit | None]:
        async with await client.open_pty("nobody", 80, 24, cmd='echo "uid=$(id -u) home=$HOME"') as stream:
            return await _collect(stream)

    output, exit_event = asyncio.run(scenario())
    assert b"uid=65534 home=/nonexistent" in output
    assert exit_event is not None and exit_event.code == 0


def test_pty_unknown_user(client: AgentClient) -> None:
    with pytest.raises(AgentCallError) as caught:
        asyncio.run(client.open_pty("no-such-user-here", 80, 24))
    assert caught.value.agent_code == "unknown_user"


def test_pty_with_wrong_secret(agent: RunningAgent) -> None:
    with agent.client(secret=OTHER_SECRET) as wrong, pytest.raises(AgentRejected):
        asyncio.run(wrong.open_pty(_current_user(), 80, 24))


# --- TCP port streams ---------------------------------------------------------------------------


@pytest.fixture
def echo_server() -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def accept_loop() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    server.close()


def test_tcp_stream_to_echo_server(client: AgentClient, echo_server: int) -> None:
    async def scenario() -> bytes:
        reader, writer = await client.open_tcp(echo_server)
        payload = os.urandom(300_000)
        writer.write(payload)
        await writer.drain()
        received = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
        assert received == payload
        writer.write(b"bye")
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), 10)  # echo, then EOF after the half-close
        writer.close()
        await writer.wait_closed()
        return rest

    assert asyncio.run(scenario()) == b"bye"


def test_tcp_stream_to_closed_port(client: AgentClient) -> None:
    with pytest.raises(AgentPortUnreachable) as caught:
        asyncio.run(client.open_tcp(free_port()))
    assert caught.value.agent_code == "port_unreachable"
    assert caught.value.status == 502


def test_tcp_client_disconnect_mid_stream(client: AgentClient, echo_server: int) -> None:
    async def scenario() -> None:
        for _ in range(3):
            reader, writer = await client.open_tcp(echo_server)
            writer.write(b"x" * 100_000)
            await writer.drain()
            await reader.read(10)
            writer.transport.abort()
        reader, writer = await client.open_tcp(echo_server)
        writer.write(b"still-works")
        assert await asyncio.wait_for(reader.readexactly(11), 5) == b"still-works"
        writer.close()

    asyncio.run(scenario())
    assert client.health().vm_id == "vm-a"


# --- Firecracker-style hybrid vsock endpoint ------------------------------------------------------


@pytest.fixture
def fake_vsock(agent: RunningAgent, tmp_path: Path) -> Iterator[Path]:
    """A Unix socket that answers ``CONNECT <port>\\n`` with ``OK``, then splices to the agent,
    like Firecracker's vsock device does to the guest's AF_VSOCK listener."""
    path = tmp_path / "vsock.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def handle(conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(1)
            if not chunk:
                conn.close()
                return
            line += chunk
        assert line == b"CONNECT 7000\n"
        upstream = socket.create_connection(("127.0.0.1", agent.port))
        conn.sendall(b"OK 1073741824\n")
        threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join(2)
    server.close()


def test_vsock_endpoint(fake_vsock: Path) -> None:
    endpoint = f"unix+vsock://{fake_vsock}?port=7000"
    with AgentClient(endpoint, SECRET, timeout=5) as c:
        assert c.health().vm_id == "vm-a"
        assert c.exec(["echo", "over-vsock"], timeout_s=5).stdout == b"over-vsock\n"

        async def scenario() -> PtyExit | None:
            async with await c.open_pty(_current_user(), 80, 24, cmd="exit 5") as stream:
                return (await _collect(stream))[1]

        assert asyncio.run(scenario()) == PtyExit(code=5, signal=None)
    with AgentClient(endpoint, OTHER_SECRET, timeout=5) as wrong, pytest.raises(AgentRejected):
        wrong.health()
