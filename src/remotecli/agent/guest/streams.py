"""Upgraded streams: PTY sessions (framed) and TCP port splicing (raw bytes)."""

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading

from .log import log
from .wire import FRAME_DATA, FRAME_EXIT, FRAME_HEADER_SIZE, FRAME_RESIZE, MAX_FRAME_PAYLOAD

_HEADER = struct.Struct(">BI")
READ_CHUNK = 65536
OUTPUT_DRAIN_S = 1.0  # after the shell exits, keep forwarding its last output this long
HANGUP_GRACE_S = 2.0  # after the host hangs up, SIGHUP then (this much later) SIGKILL
SPLICE_CHUNK = 65536

# The pty child: make the slave its controlling terminal, drop to the target user, exec the shell.
# It runs as a tiny child program, started as the agent's own user (so the agent's interpreter is
# always executable) because the agent is multi-threaded: no preexec_fn, no bare fork.
# argv: IDENTITY ("-" or "uid:gid:g1,g2,...") CWD PROGRAM ARGS...
_PTY_HELPER = """
import fcntl, os, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
identity, cwd, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if identity != "-":
    uid, gid, groups = identity.split(":")
    os.setgroups([int(g) for g in groups.split(",") if g])
    os.setgid(int(gid))
    os.setuid(int(uid))
try:
    os.chdir(cwd)
except OSError:
    os.chdir("/")
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    sys.stderr.write("remotecli: cannot start %s: %s\\r\\n" % (argv[0], exc.strerror))
    os._exit(127)
"""


def encode_frame(kind, payload):
    return _HEADER.pack(kind, len(payload)) + payload


def login_shell():
    for candidate in ("/bin/bash", "/usr/bin/bash"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("bash") or "/bin/sh"


def set_winsize(fd, cols, rows):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class PtySpawnError(Exception):
    pass


def spawn_pty(cmd, cols, rows, env, cwd, identity):
    """Start a login shell on a new pty. Returns (master_fd, Popen)."""
    master, slave = os.openpty()
    try:
        set_winsize(master, cols, rows)
        shell = login_shell()
        argv = [shell, "-l", "-c", cmd] if cmd else [shell, "-l"]
        python = sys.executable or "python3"
        if identity:
            groups = ",".join(str(gid) for gid in identity["extra_groups"])
            spec = f"{identity['user']}:{identity['group']}:{groups}"
        else:
            spec = "-"
        try:
            proc = subprocess.Popen(
                [python, "-I", "-S", "-c", _PTY_HELPER, spec, cwd, *argv],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd="/",
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise PtySpawnError(f"Cannot start a shell: {reason}.") from None
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    return master, proc


def _exit_doc(returncode):
    if returncode is None:
        return {"code": None, "signal": None}
    if returncode < 0:
        return {"code": 128 - returncode, "signal": -returncode}
    return {"code": returncode, "signal": None}


def _watch_exit(loop, proc):
    """A future resolved with the process's return code (waited for in a thread)."""
    future = loop.create_future()

    def wait():
        returncode = proc.wait()

        def resolve():
            if not future.done():
                future.set_result(returncode)

        with contextlib.suppress(RuntimeError):  # the loop is gone: the agent is exiting
            loop.call_soon_threadsafe(resolve)

    threading.Thread(target=wait, name=f"pty-wait-{proc.pid}", daemon=True).start()
    return future


async def _wait_fd(loop, fd, writable):
    future = loop.create_future()

    def ready():
        if not future.done():
            future.set_result(None)

    if writable:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await future
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _signal_group(pgid, signum):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


async def run_pty_session(reader, writer, master, proc, session_id):
    """Pump frames between the host connection and the pty until either side ends."""
    loop = asyncio.get_running_loop()
    exited = _watch_exit(loop, proc)

    async def pty_to_host():
        while True:
            try:
                data = os.read(master, READ_CHUNK)
            except BlockingIOError:
                await _wait_fd(loop, master, writable=False)
                continue
            except OSError:  # EIO: every slave end is closed
                return
            if not data:
                return
            writer.write(encode_frame(FRAME_DATA, data))
            await writer.drain()

    async def write_pty(data):
        view = memoryview(data)
        while view:
            try:
                written = os.write(master, view)
            except BlockingIOError:
                await _wait_fd(loop, master, writable=True)
                continue
            view = view[written:]

    async def host_to_pty():
        while True:
            header = await reader.readexactly(FRAME_HEADER_SIZE)
            kind, length = _HEADER.unpack(header)
            if length > MAX_FRAME_PAYLOAD:
                log("pty_protocol_error", level="warning", session=session_id, reason="frame too large")
                return
            payload = await reader.readexactly(length) if length else b""
            if kind == FRAME_DATA:
                await write_pty(payload)
            elif kind == FRAME_RESIZE:
                try:
                    doc = json.loads(payload)
                    cols, rows = int(doc["cols"]), int(doc["rows"])
                except (ValueError, KeyError, TypeError):
                    log("pty_protocol_error", level="warning", session=session_id, reason="bad resize")
                    continue
                if 1 <= cols <= 10000 and 1 <= rows <= 10000:
                    with contextlib.suppress(OSError):
                        set_winsize(master, cols, rows)
            # Unknown frame types are ignored (forward compatibility).

    output = asyncio.ensure_future(pty_to_host())
    inbound = asyncio.ensure_future(host_to_pty())
    reason = "exited"
    try:
        await asyncio.wait({exited, inbound}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            await asyncio.wait({output}, timeout=OUTPUT_DRAIN_S)
            output.cancel()
            with contextlib.suppress(BaseException):
                await output
            with contextlib.suppress(ConnectionError, OSError):
                payload = json.dumps(_exit_doc(exited.result())).encode()
                writer.write(encode_frame(FRAME_EXIT, payload))
                await writer.drain()
        else:
            reason = "host_closed"
            _signal_group(proc.pid, signal.SIGHUP)
            await asyncio.wait({exited}, timeout=HANGUP_GRACE_S)
            if not exited.done():
                _signal_group(proc.pid, signal.SIGKILL)
    finally:
        for task in (output, inbound):
            task.cancel()
        for task in (output, inbound):
            with contextlib.suppress(BaseException):
                await task
        os.close(master)
        if not exited.done() and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
        returncode = exited.result() if exited.done() else proc.poll()
        log("pty_end", session=session_id, reason=reason, **_exit_doc(returncode))


async def splice(reader, writer):
    """Copy bytes reader -> writer until EOF, then half-close the writer."""
    while True:
        data = await reader.read(SPLICE_CHUNK)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()


async def run_tcp_splice(host_reader, host_writer, port_reader, port_writer, stream_id, port):
    upstream = asyncio.ensure_future(splice(host_reader, port_writer))
    downstream = asyncio.ensure_future(splice(port_reader, host_writer))
    pending = {upstream, downstream}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(task.exception() is not None for task in done if not task.cancelled()):
                break  # a reset on either side ends both directions
    finally:
        for task in (upstream, downstream):
            task.cancel()
        for task in (upstream, downstream):
            with contextlib.suppress(BaseException):
                await task
        port_writer.close()
        with contextlib.suppress(Exception):
            await port_writer.wait_closed()
        log("tcp_end", stream=stream_id, port=port)
