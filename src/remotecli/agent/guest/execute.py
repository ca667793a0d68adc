"""``POST /v1/exec``: run a command to completion with a timeout and capped output.

Runs in its own thread (blocking selector loop). The command gets a new session (so its process
group can be killed as a whole on timeout), an environment built from the target user, and the
requested uid/gid/supplementary groups via ``subprocess.Popen`` (no ``preexec_fn``: the agent is
multi-threaded).
"""

import contextlib
import os
import selectors
import signal
import subprocess
import time

from .wire import MAX_OUTPUT_BYTES

# After the command's main process exits, keep reading its pipes this long (a background child may
# still hold them open); after a timeout kill, give the pipes this long to drain.
EXIT_GRACE_S = 1.0
KILL_GRACE_S = 2.0
READ_CHUNK = 65536


class ExecSpawnError(Exception):
    pass


def _killpg(pgid):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_command(argv, timeout_s, env, cwd, identity, stdin_data, max_output=MAX_OUTPUT_BYTES):
    """Run ``argv``; return the result document (without base64 encoding of outputs)."""
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin_data else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
            close_fds=True,
            **identity,
        )
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        filename = getattr(exc, "filename", None)
        where = f" ({filename})" if filename and filename != argv[0] else ""
        raise ExecSpawnError(f"Cannot start {argv[0]!r}: {reason}{where}.") from None

    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    stdin_fd = proc.stdin.fileno() if proc.stdin is not None else -1
    outputs = {out_fd: bytearray(), err_fd: bytearray()}
    truncated = {out_fd: False, err_fd: False}
    selector = selectors.DefaultSelector()
    for pipe in (proc.stdout, proc.stderr):
        os.set_blocking(pipe.fileno(), False)
        selector.register(pipe.fileno(), selectors.EVENT_READ)
    pending_stdin = memoryview(stdin_data or b"")
    if proc.stdin is not None:
        os.set_blocking(proc.stdin.fileno(), False)
        selector.register(proc.stdin.fileno(), selectors.EVENT_WRITE)

    deadline = started + timeout_s
    timed_out = False
    exited_at = None
    killed_at = None
    try:
        while True:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            readers_open = any(key.events & selectors.EVENT_READ for key in selector.get_map().values())
            if exited_at is not None and not readers_open:
                break
            if exited_at is not None and now - exited_at > EXIT_GRACE_S:
                break
            if not timed_out and exited_at is None and now >= deadline:
                timed_out = True
                killed_at = now
                _killpg(proc.pid)
            if killed_at is not None and now - killed_at > KILL_GRACE_S:
                break
            wait = 0.05 if exited_at is None and not readers_open else 0.1
            if not timed_out and exited_at is None:
                wait = max(0.0, min(wait, deadline - now))
            for key, _events in selector.select(timeout=wait):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        written = os.write(fd, pending_stdin[:READ_CHUNK])
                        pending_stdin = pending_stdin[written:]
                    except BlockingIOError:
                        continue
                    except OSError:  # EPIPE: the command does not read its stdin
                        pending_stdin = pending_stdin[:0]
                    if not pending_stdin:
                        selector.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, READ_CHUNK)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    selector.unregister(fd)
                    continue
                buffer = outputs[fd]
                room = max_output - len(buffer)
                if room > 0:
                    buffer += chunk[:room]
                if len(chunk) > room:
                    truncated[fd] = True
    finally:
        selector.close()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
    if proc.poll() is None:
        remaining = deadline - time.monotonic()
        try:
            proc.wait(timeout=max(0.0, remaining))
        except subprocess.TimeoutExpired:
            timed_out = True
            _killpg(proc.pid)
            proc.wait()
    returncode = proc.returncode
    return {
        "exit_code": returncode if returncode >= 0 else 128 - returncode,
        "signal": -returncode if returncode < 0 else None,
        "stdout": bytes(outputs[out_fd]),
        "stderr": bytes(outputs[err_fd]),
        "stdout_truncated": truncated[out_fd],
        "stderr_truncated": truncated[err_fd],
        "timed_out": timed_out,
        "duration_s": round(time.monotonic() - started, 3),
    }
