"""A small synchronous QMP client (QEMU Machine Protocol over a unix socket).

One short connection per operation: QEMU serves one QMP client at a time, so holding a
connection open would block every other caller (inspect, pause, stop) until it closes.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any


class QmpError(Exception):
    """QEMU answered with an error (``error.class`` / ``error.desc``)."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QmpUnavailable(Exception):
    """The socket is missing, refused the connection, closed, or did not answer in time."""


class QmpClient:
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self.greeting: dict[str, Any] = {}

    def __enter__(self) -> QmpClient:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise QmpUnavailable(f"cannot connect to {self.path}: {exc}") from exc
        self._sock = sock
        self._buf = b""
        try:
            self.greeting = self._read_message(time.monotonic() + self.timeout)
            if "QMP" not in self.greeting:
                raise QmpUnavailable(f"unexpected QMP greeting: {self.greeting!r}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _read_message(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpUnavailable("QMP did not answer in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise QmpUnavailable("QMP did not answer in time") from exc
            except OSError as exc:
                raise QmpUnavailable(f"QMP connection failed: {exc}") from exc
            if not chunk:
                raise QmpUnavailable("QMP connection closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise QmpUnavailable(f"QMP sent invalid JSON: {line[:200]!r}") from exc
        if not isinstance(message, dict):
            raise QmpUnavailable(f"QMP sent a non-object: {line[:200]!r}")
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None,
                fds: list[int] | None = None) -> Any:
        """Run one command and return its ``return`` value; events in between are skipped.

        ``fds`` are passed along with the command (SCM_RIGHTS), as ``getfd`` expects."""
        if self._sock is None:
            raise QmpUnavailable("not connected")
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            data = json.dumps(request).encode() + b"\n"
            if fds:
                sent = socket.send_fds(self._sock, [data], fds)
                if sent < len(data):
                    self._sock.sendall(data[sent:])
            else:
                self._sock.sendall(data)
        except OSError as exc:
            raise QmpUnavailable(f"QMP send failed: {exc}") from exc
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            message = self._read_message(deadline)
            if "return" in message:
                return message["return"]
            if "error" in message:
                error = message["error"] if isinstance(message["error"], dict) else {}
                raise QmpError(str(error.get("class", "GenericError")), str(error.get("desc", "")))
            # {"event": ...}: asynchronous notification, not our answer.


def qmp_execute(path: Path, command: str, arguments: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """Connect, run one command, disconnect."""
    with QmpClient(path, timeout=timeout) as client:
        return client.execute(command, arguments)
