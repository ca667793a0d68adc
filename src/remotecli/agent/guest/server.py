"""The agent's HTTP/1.1 server: authentication, routing, handlers and ``main``."""

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from . import AGENT_VERSION
from .config import ConfigError, boot_id, system_uptime
from .credhealth import disk_reader, inspect_home
from .execute import ExecSpawnError, run_command
from .files import FileOpError, read_file, write_file
from .httpio import (
    HttpError,
    encode_response,
    encode_switching,
    read_body,
    read_request_head,
)
from .log import log
from .oauth import OAuthFlows
from .rekey import TemplateState
from .rekey import load as load_config_or_template
from .streams import PtySpawnError, run_pty_session, run_tcp_splice, spawn_pty
from .users import UserError, base_env, default_cwd, lookup_user, process_identity
from .wire import API_PREFIX, MAX_EXEC_TIMEOUT_S, PATH_CREDENTIAL_HEALTH, UPGRADE_PTY, UPGRADE_TCP

PORT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_EXEC_TIMEOUT_S = 60.0


class Upgraded(Exception):
    """Raised by a handler that took over the connection (it is closed afterwards)."""


def _b64decode(value, field):
    if not isinstance(value, str):
        raise HttpError(400, "invalid_request", f"{field} must be a base64 string.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "invalid_request", f"{field} is not valid base64.") from None


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _int_field(value, field, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HttpError(400, "invalid_request", f"{field} must be an integer in [{low}, {high}].")
    return value


def _query_int(request, name, default, low, high):
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HttpError(400, "invalid_request", f"{name} must be an integer.") from None
    if not low <= value <= high:
        raise HttpError(400, "invalid_request", f"{name} must be in [{low}, {high}].")
    return value


def _in_thread(fn, *args):
    """Run a blocking function in a dedicated thread (long execs must not starve the pool)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def target():
        try:
            result = fn(*args)
        except BaseException as exc:  # delivered to the awaiting coroutine
            outcome = (False, exc)
        else:
            outcome = (True, result)

        def resolve():
            if future.done():
                return
            if outcome[0]:
                future.set_result(outcome[1])
            else:
                future.set_exception(outcome[1])

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(resolve)

    threading.Thread(target=target, name="agent-worker", daemon=True).start()
    return future


class Agent:
    def __init__(self, config, dry_run_shutdown=False):
        self.config = config
        self._secret = config.agent_secret.encode("utf-8")
        self.started = time.monotonic()
        self.boot_id = boot_id()
        self.dry_run_shutdown = dry_run_shutdown
        self._ids = itertools.count(1)
        self.connections = set()
        self.oauth = OAuthFlows()
        # Snapshot templates and restored VMs (rekey.py): no secret until the config disk has one.
        self.template: TemplateState | None = None

    # -- connection handling -------------------------------------------------------------------

    def _authorized(self, request):
        header = request.header("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            token = ""
        # Always compare (constant time), even for a missing token. No secret (a template): no one.
        return hmac.compare_digest(token.strip().encode("utf-8", "replace"), self._secret) and bool(self._secret)

    async def handle_connection(self, reader, writer):
        task = asyncio.current_task()
        self.connections.add(task)
        peer = writer.get_extra_info("peername")
        try:
            while True:
                started = time.monotonic()
                request = None
                try:
                    request = await read_request_head(reader)
                    if request is None:
                        return
                    if self.template is not None and not self.template.adopted:
                        await asyncio.to_thread(self.template.adopt, self)
                    if not self._authorized(request):
                        raise HttpError(401, "unauthorized", "Missing or wrong agent secret.", close=True)
                    await read_body(reader, request)
                    status, doc = await self.dispatch(request, reader, writer)
                    close = request.wants_close()
                except Upgraded:
                    return
                except HttpError as exc:
                    status, doc = exc.status, {"code": exc.code, "message": exc.message}
                    close = exc.close or (request is not None and request.wants_close())
                except (UserError, FileOpError) as exc:
                    status, doc = exc.status, {"code": exc.code, "message": exc.message}
                    close = request is not None and request.wants_close()
                extra = (("WWW-Authenticate", "Bearer"),) if status == 401 else ()
                writer.write(encode_response(status, doc, close=close, extra_headers=extra))
                await writer.drain()
                self._log_request(request, status, started, peer)
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            return
        except asyncio.CancelledError:
            # The agent is stopping. Returning (not re-raising) keeps Python 3.11's start_server
            # callback from logging the cancelled task as an error.
            return
        except Exception as exc:  # a bug: answer 500 if we still can, keep serving others
            log("handler_crashed", level="error", error=type(exc).__name__, detail=str(exc)[:300])
            with contextlib.suppress(Exception):
                writer.write(
                    encode_response(500, {"code": "internal_error", "message": "Agent error."}, close=True)
                )
                await writer.drain()
        finally:
            self.connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _log_request(self, request, status, started, peer):
        # Path only: the query may carry a command line; headers carry the secret.
        log(
            "request",
            method=request.method if request else None,
            path=request.path if request else None,
            status=status,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            peer=peer[0] if isinstance(peer, tuple) else None,
        )

    async def dispatch(self, request, reader, writer):
        routes = {
            "/v1/health": {"GET": self.health},
            "/v1/exec": {"POST": self.exec},
            "/v1/files": {"GET": self.get_file, "PUT": self.put_file},
            "/v1/pty": {"GET": self.pty},
            "/v1/tcp": {"GET": self.tcp},
            "/v1/shutdown": {"POST": self.shutdown},
            PATH_CREDENTIAL_HEALTH: {"GET": self.credential_health},
        }
        assert API_PREFIX == "/v1"
        if request.path.startswith("/v1/oauth/"):
            return await self.oauth.dispatch(request)
        methods = routes.get(request.path)
        if methods is None:
            raise HttpError(404, "not_found", f"No endpoint {request.path}.")
        handler = methods.get(request.method)
        if handler is None:
            raise HttpError(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}.")
        return await handler(request, reader, writer)

    # -- endpoints ----------------------------------------------------------------------------

    async def health(self, request, reader, writer):
        uptime = system_uptime()
        agent_uptime = round(time.monotonic() - self.started, 3)
        return 200, {
            "vm_id": self.config.vm_id,
            "vm_type": self.config.vm_type,
            "hostname": self.config.hostname,
            "uptime_s": uptime if uptime is not None else agent_uptime,
            "agent_uptime_s": agent_uptime,
            "agent_version": AGENT_VERSION,
            "boot_id": self.boot_id,
        }

    async def exec(self, request, reader, writer):
        doc = request.json()
        argv = doc.get("argv")
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(arg, str) and "\0" not in arg for arg in argv)
        ):
            raise HttpError(400, "invalid_request", "argv must be a non-empty list of strings.")
        timeout_s = doc.get("timeout_s", DEFAULT_EXEC_TIMEOUT_S)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
            raise HttpError(400, "invalid_request", "timeout_s must be a number.")
        if not 0 < timeout_s <= MAX_EXEC_TIMEOUT_S:
            raise HttpError(400, "invalid_request", f"timeout_s must be in (0, {MAX_EXEC_TIMEOUT_S}].")
        env = doc.get("env") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
            for k, v in env.items()
        ):
            raise HttpError(400, "invalid_request", "env must map names to string values.")
        user = doc.get("user")
        if user is not None and (not isinstance(user, str) or not user):
            raise HttpError(400, "invalid_request", "user must be a user name.")
        cwd = doc.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/")):
            raise HttpError(400, "invalid_request", "cwd must be an absolute path.")
        stdin_b64 = doc.get("stdin_b64")
        stdin_data = _b64decode(stdin_b64, "stdin_b64") if stdin_b64 is not None else None

        identity, entry = process_identity(user)
        full_env = base_env(entry, env)
        run_cwd = cwd or default_cwd(entry)
        exec_id = next(self._ids)
        log("exec_start", exec=exec_id, program=os.path.basename(argv[0]), user=entry.pw_name)
        try:
            result = await _in_thread(
                run_command, argv, float(timeout_s), full_env, run_cwd, identity, stdin_data
            )
        except ExecSpawnError as exc:
            log("exec_spawn_failed", level="warning", exec=exec_id)
            raise HttpError(400, "spawn_failed", str(exc)) from None
        log(
            "exec_end",
            exec=exec_id,
            exit_code=result["exit_code"],
            timed_out=result["timed_out"],
            duration_s=result["duration_s"],
        )
        result["stdout_b64"] = _b64(result.pop("stdout"))
        result["stderr_b64"] = _b64(result.pop("stderr"))
        return 200, result

    async def credential_health(self, request, reader, writer):
        """What the CLIs' credential files in the user's home say: metadata only, never a token."""
        user = request.query.get("user") or self.config.cli_user
        entry = lookup_user(user)
        home = entry.pw_dir
        providers = await asyncio.to_thread(inspect_home, disk_reader(home, entry.pw_uid))
        log("credential_health", user=entry.pw_name, states={e["provider"]: e["state"] for e in providers})
        return 200, {"user": entry.pw_name, "home": home, "checked_at": time.time(), "providers": providers}

    async def put_file(self, request, reader, writer):
        doc = request.json()
        path = doc.get("path")
        data = _b64decode(doc.get("content_b64"), "content_b64")
        mode = _int_field(doc.get("mode"), "mode", 0, 0o7777)
        dir_mode = _int_field(doc.get("dir_mode", 0o755), "dir_mode", 0, 0o7777)
        owner = doc.get("owner")
        if owner is not None and not isinstance(owner, str):
            raise HttpError(400, "invalid_request", "owner must be 'user' or 'user:group'.")
        info = await asyncio.to_thread(write_file, path, data, mode, owner, dir_mode)
        log("file_written", path=info["path"], size=info["size"], mode=oct(info["mode"]), owner=info["owner"])
        return 200, info

    async def get_file(self, request, reader, writer):
        path = request.query.get("path")
        info, data = await asyncio.to_thread(read_file, path)
        info["content_b64"] = _b64(data)
        return 200, info

    async def pty(self, request, reader, writer):
        if not request.is_upgrade(UPGRADE_PTY):
            raise HttpError(
                426, "upgrade_required", f"Send 'Connection: Upgrade' and 'Upgrade: {UPGRADE_PTY}'."
            )
        user = request.query.get("user") or self.config.cli_user
        cols = _query_int(request, "cols", 80, 1, 10000)
        rows = _query_int(request, "rows", 24, 1, 10000)
        cmd = request.query.get("cmd") or None
        term = request.query.get("term") or "xterm-256color"
        identity, entry = process_identity(user)
        env = base_env(entry, term=term)
        try:
            master, proc = spawn_pty(cmd, cols, rows, env, default_cwd(entry), identity)
        except PtySpawnError as exc:
            raise HttpError(500, "spawn_failed", str(exc)) from None
        session = next(self._ids)
        log("pty_start", session=session, user=entry.pw_name, cols=cols, rows=rows, command=bool(cmd))
        try:
            writer.write(encode_switching(UPGRADE_PTY))
            await writer.drain()
        except BaseException:
            os.close(master)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        self._log_request(request, 101, time.monotonic(), None)
        await run_pty_session(reader, writer, master, proc, session)
        raise Upgraded()

    async def tcp(self, request, reader, writer):
        if not request.is_upgrade(UPGRADE_TCP):
            raise HttpError(
                426, "upgrade_required", f"Send 'Connection: Upgrade' and 'Upgrade: {UPGRADE_TCP}'."
            )
        port = _query_int(request, "port", None, 1, 65535)
        if port is None:
            raise HttpError(400, "invalid_request", "port is required.")
        try:
            port_reader, port_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), PORT_CONNECT_TIMEOUT_S
            )
        except (TimeoutError, OSError):
            raise HttpError(
                502, "port_unreachable", f"Nothing accepts connections on guest port {port}."
            ) from None
        stream = next(self._ids)
        try:
            writer.write(encode_switching(UPGRADE_TCP))
            await writer.drain()
        except BaseException:
            port_writer.close()
            raise
        log("tcp_start", stream=stream, port=port)
        self._log_request(request, 101, time.monotonic(), None)
        await run_tcp_splice(reader, writer, port_reader, port_writer, stream, port)
        raise Upgraded()

    async def shutdown(self, request, reader, writer):
        doc = request.json() if request.body else {}
        action = doc.get("action", "poweroff")
        if action not in ("poweroff", "reboot"):
            raise HttpError(400, "invalid_request", "action must be 'poweroff' or 'reboot'.")
        if not self.dry_run_shutdown and not in_guest():
            raise HttpError(501, "shutdown_unavailable", "The agent is not running as a guest's init child.")
        log("shutdown_requested", action=action, dry_run=self.dry_run_shutdown)
        if not self.dry_run_shutdown:
            asyncio.get_running_loop().call_later(0.3, _power_off, action)
        return 202, {"action": action, "accepted": True}


def in_guest():
    """True inside a remotecli VM (PID 1 is remotecli-init); never true on a developer's host."""
    try:
        with open("/proc/1/cmdline", "rb") as handle:
            return b"remotecli-init" in handle.read()
    except OSError:
        return False


def _power_off(action):
    os.sync()
    command = shutil.which("poweroff" if action == "poweroff" else "reboot")
    if command:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([command, "-f"], timeout=10, check=False)
    # Still here: ask the kernel directly.
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(0x4321FEDC if action == "poweroff" else 0x01234567)


def _apply_hostname(hostname):
    if not hostname or not in_guest() or os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        if socket.gethostname() != hostname:
            socket.sethostname(hostname)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="remotecli_guest", description="remotecli guest agent")
    parser.add_argument("--config", required=True, help="config disk or file (JSON, NUL-terminated)")
    parser.add_argument("--listen-host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=None, help="override agent_port (0: any free port)")
    parser.add_argument(
        "--dry-run-shutdown", action="store_true", help="accept /v1/shutdown without powering off (tests)"
    )
    return parser.parse_args(argv)


async def _start_vsock_server(agent):
    """Also listen on AF_VSOCK ``agent_vsock_port`` when the config asks (Firecracker guests)."""
    port = agent.config.agent_vsock_port
    if port is None:
        return None
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        log("vsock_unavailable", level="warning", port=port, detail="no AF_VSOCK in this Python")
        return None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(256)
        sock.setblocking(False)
        server = await asyncio.start_server(agent.handle_connection, sock=sock, limit=64 * 1024)
    except OSError as exc:
        sock.close()
        log("vsock_unavailable", level="warning", port=port, detail=exc.strerror)
        return None
    log("listening_vsock", port=port)
    return server


def _loop_exception(loop, context):
    exc = context.get("exception")
    log(
        "loop_error",
        level="error",
        detail=str(context.get("message", ""))[:300],
        error=type(exc).__name__ if exc is not None else None,
    )


async def serve(agent, host, port):
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_exception)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, lambda s=signum: stop.done() or stop.set_result(s))
    server = await asyncio.start_server(
        agent.handle_connection, host, port, limit=64 * 1024, reuse_address=True, backlog=256
    )
    bound = server.sockets[0].getsockname()
    log(
        "listening",
        host=bound[0],
        port=bound[1],
        vm_id=agent.config.vm_id,
        vm_type=agent.config.vm_type,
        agent_version=AGENT_VERSION,
        pid=os.getpid(),
    )
    vsock_server = await _start_vsock_server(agent)
    if agent.template is not None and not agent.template.adopted:
        agent.template.start(agent)
    async with server:
        signum = await stop
        if vsock_server is not None:
            vsock_server.close()
        log("stopping", signal=signum)
        server.close()
        await agent.oauth.close_all()
        # Close live connections ourselves: from Python 3.12 on, leaving ``async with server``
        # waits for every connection to end.
        tasks = list(agent.connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config, template = load_config_or_template(args.config)
    except ConfigError as exc:
        log("config_error", level="error", detail=str(exc))
        return 2
    _apply_hostname(config.hostname)
    port = config.agent_port if args.port is None else args.port
    agent = Agent(config, dry_run_shutdown=args.dry_run_shutdown)
    agent.template = template
    try:
        asyncio.run(serve(agent, args.listen_host, port))
    except OSError as exc:
        log("listen_failed", level="error", host=args.listen_host, port=port, detail=exc.strerror)
        return 1
    return 0
