"""``AgentClient``: the only way the controller talks to a guest agent.

Synchronous request/response calls go through one ``httpx.Client`` (thread-safe, keep-alive, no
retries: ``exec`` is not idempotent). The streams (PTY, TCP port) are asyncio connections with a
hand-written HTTP ``Upgrade`` request, meant for the websocket proxies.

Failures become ``remotecli.errors``: nothing answers / connection reset -> ``AgentUnreachable``;
no answer in time -> ``AgentTimeout``; 401 -> ``AgentRejected``; any other error status ->
``AgentCallError`` (an ``AgentError``) with the agent's code in ``agent_code`` and ``log_detail``.
The agent secret never appears in ``repr``, exception messages, ``log_detail`` or logs; httpx
exceptions are not chained (their request object carries the Authorization header).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn, Self
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import httpcore
import httpx
from pydantic import ValidationError

from remotecli.agent.protocol import (
    AUTH_SCHEME,
    CODE_FILE_NOT_FOUND,
    CODE_PORT_UNREACHABLE,
    CODE_UNAUTHORIZED,
    FRAME_DATA,
    FRAME_EXIT,
    FRAME_HEADER_SIZE,
    HEADER_AUTHORIZATION,
    MAX_EXEC_TIMEOUT_S,
    MAX_FRAME_PAYLOAD,
    PATH_CREDENTIAL_HEALTH,
    PATH_EXEC,
    PATH_FILES,
    PATH_HEALTH,
    PATH_OAUTH_BROWSER,
    PATH_OAUTH_FLOWS,
    PATH_PTY,
    PATH_SHUTDOWN,
    PATH_TCP,
    UPGRADE_PTY,
    UPGRADE_TCP,
    AgentHealth,
    CredentialHealthReport,
    ExecResponse,
    ExecResult,
    FileContent,
    FileInfo,
    OAuthBrowser,
    OAuthFlowSpec,
    OAuthFlowState,
    PtyData,
    PtyEvent,
    PtyExit,
    decode_frame_header,
    encode_frame,
    encode_resize,
)
from remotecli.errors import AgentError, AgentRejected, AgentTimeout, AgentUnreachable

logger = logging.getLogger("remotecli.agent-client")

# Extra time the HTTP read timeout allows beyond an exec's own timeout (the agent kills the
# process group at timeout_s, then drains pipes for up to ~3 s).
EXEC_TIMEOUT_MARGIN_S = 10.0
CONNECT_TIMEOUT_S = 5.0
MAX_RESPONSE_HEAD = 64 * 1024

__all__ = [
    "AgentCallError",
    "AgentClient",
    "AgentFileNotFound",
    "AgentHealth",
    "AgentPortUnreachable",
    "ExecResult",
    "FileContent",
    "FileInfo",
    "PtyData",
    "PtyEvent",
    "PtyExit",
    "PtyStream",
]


class AgentCallError(AgentError):
    """The agent answered an error status (not 401). ``agent_code`` is the agent's ``code``."""

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int,
        agent_code: str,
        agent_message: str = "",
        log_detail: str | None = None,
    ) -> None:
        super().__init__(message, log_detail=log_detail)
        self.status = status
        self.agent_code = agent_code
        self.agent_message = agent_message


class AgentFileNotFound(AgentCallError):
    """``read_file`` of a path that does not exist in the guest (agent code ``file_not_found``)."""


class AgentPortUnreachable(AgentCallError):
    """``open_tcp`` to a guest port nothing listens on (agent code ``port_unreachable``)."""


_CALL_ERRORS: dict[str, type[AgentCallError]] = {
    CODE_FILE_NOT_FOUND: AgentFileNotFound,
    CODE_PORT_UNREACHABLE: AgentPortUnreachable,
}


@dataclass(frozen=True, slots=True)
class _Endpoint:
    text: str
    host: str | None = None
    port: int | None = None
    uds: str | None = None
    vsock_port: int | None = None  # Firecracker hybrid vsock: CONNECT <port> on the host UDS first


VSOCK_SCHEME = "unix+vsock"
_MAX_VSOCK_ACK = 64


def _parse_endpoint(endpoint: str) -> _Endpoint:
    parts = urlsplit(endpoint)
    if parts.scheme == VSOCK_SCHEME:
        path = unquote(parts.path)
        ports = parse_qs(parts.query).get("port")
        if not path.startswith("/") or not ports or not ports[0].isdigit():
            raise ValueError(f"vsock endpoint needs unix+vsock:///PATH?port=N: {endpoint!r}")
        return _Endpoint(text=endpoint, uds=path, vsock_port=int(ports[0]))
    if parts.scheme == "unix":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        if not path.startswith("/"):
            raise ValueError(f"unix endpoint needs an absolute path: {endpoint!r}")
        return _Endpoint(text=endpoint, uds=path)
    if parts.scheme in ("tcp", "http"):
        if not parts.hostname or parts.port is None:
            raise ValueError(f"agent endpoint needs a host and a port: {endpoint!r}")
        return _Endpoint(text=endpoint, host=parts.hostname, port=parts.port)
    raise ValueError(
        f"unsupported agent endpoint {endpoint!r}: use tcp://HOST:PORT, unix:///PATH or unix+vsock:///PATH?port=N"
    )


def _b64decode(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AgentError(log_detail="agent answered invalid base64") from None


class _VsockBackend(httpcore.SyncBackend):
    """Every "TCP" connection goes to Firecracker's vsock UDS, then ``CONNECT <port>``."""

    def __init__(self, uds: str, port: int) -> None:
        self._uds = uds
        self._port = port

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        stream = self.connect_unix_socket(self._uds, timeout=timeout, socket_options=socket_options)
        try:
            stream.write(f"CONNECT {self._port}\n".encode("ascii"), timeout=timeout)
            ack = b""
            while not ack.endswith(b"\n"):
                chunk = stream.read(1, timeout=timeout)
                if not chunk or len(ack) > _MAX_VSOCK_ACK:
                    break
                ack += chunk
            if not ack.startswith(b"OK "):
                raise httpcore.ConnectError(f"vsock handshake answered {ack[:_MAX_VSOCK_ACK]!r}")
        except BaseException:
            stream.close()
            raise
        return stream


async def _vsock_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
    writer.write(f"CONNECT {port}\n".encode("ascii"))
    await writer.drain()
    ack = await reader.readline()
    if not ack.startswith(b"OK "):
        raise ConnectionError(f"vsock handshake answered {ack[:_MAX_VSOCK_ACK]!r}")


class PtyStream:
    """An interactive terminal session in the guest (after the ``101`` of ``GET /v1/pty``).

    ``read`` returns ``PtyData`` chunks, then one ``PtyExit`` when the shell ends, then ``None``;
    ``None`` also means the connection ended without an exit (agent or VM gone).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, endpoint: str) -> None:
        self._reader = reader
        self._writer = writer
        self._endpoint = endpoint
        self._finished = False
        self.exit: PtyExit | None = None

    def __repr__(self) -> str:
        return f"PtyStream(endpoint={self._endpoint!r}, finished={self._finished})"

    async def read(self) -> PtyEvent | None:
        while not self._finished:
            try:
                kind, length = decode_frame_header(await self._reader.readexactly(FRAME_HEADER_SIZE))
                if length > MAX_FRAME_PAYLOAD:
                    logger.warning("agent sent an oversized PTY frame", extra={"x_endpoint": self._endpoint})
                    self._finished = True
                    return None
                payload = await self._reader.readexactly(length) if length else b""
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                self._finished = True
                return None
            if kind == FRAME_DATA:
                return PtyData(payload)
            if kind == FRAME_EXIT:
                self._finished = True
                try:
                    doc = json.loads(payload)
                    self.exit = PtyExit(code=doc.get("code"), signal=doc.get("signal"))
                except (ValueError, AttributeError):
                    self.exit = PtyExit(code=None)
                return self.exit
            # Unknown frame types are skipped (forward compatibility).
        return None

    def __aiter__(self) -> AsyncIterator[PtyEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[PtyEvent]:
        while (event := await self.read()) is not None:
            yield event

    async def _send(self, frame: bytes) -> None:
        try:
            self._writer.write(frame)
            await self._writer.drain()
        except (ConnectionError, OSError, RuntimeError):
            raise AgentUnreachable(
                "The terminal session ended.", log_detail=f"pty write failed endpoint={self._endpoint}"
            ) from None

    async def write(self, data: bytes) -> None:
        """Send keyboard input (split into frames as needed)."""
        for start in range(0, len(data), MAX_FRAME_PAYLOAD):
            await self._send(encode_frame(FRAME_DATA, data[start : start + MAX_FRAME_PAYLOAD]))

    async def resize(self, cols: int, rows: int) -> None:
        if not (1 <= cols <= 10000 and 1 <= rows <= 10000):
            raise ValueError("cols and rows must be in [1, 10000]")
        await self._send(encode_resize(cols, rows))

    async def close(self) -> None:
        """Hang up: the agent sends SIGHUP to the shell (SIGKILL 2 s later)."""
        self._finished = True
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AgentClient:
    """Client of one VM's guest agent.

    ``endpoint``: ``tcp://127.0.0.1:PORT`` (QEMU host forward), ``unix:///path`` or
    ``unix+vsock:///path?port=N`` (Firecracker's hybrid vsock socket, ``CONNECT N`` handshake).
    """

    def __init__(self, endpoint: str, secret: str, *, timeout: float = 30.0,
                 tls: ssl.SSLContext | None = None) -> None:
        """``tls``: speak TLS to a ``tcp://`` endpoint with this (pinning) context: the Incus
        driver's agents on other hosts are reached only that way."""
        if not secret:
            raise ValueError("the agent secret is empty")
        self._endpoint = _parse_endpoint(endpoint)
        self._secret = secret
        self.timeout = timeout
        self._tls = tls
        if self._endpoint.vsock_port is not None and self._endpoint.uds is not None:
            transport = httpx.HTTPTransport(retries=0)
            # httpx has no public hook for a network backend; its pool is replaced wholesale.
            transport._pool = httpcore.ConnectionPool(
                network_backend=_VsockBackend(self._endpoint.uds, self._endpoint.vsock_port), retries=0
            )
            base_url = "http://agent"
        elif self._endpoint.uds is not None:
            transport = httpx.HTTPTransport(uds=self._endpoint.uds, retries=0)
            base_url = "http://agent"
        else:
            transport = httpx.HTTPTransport(retries=0, verify=tls) if tls else httpx.HTTPTransport(retries=0)
            scheme = "https" if tls else "http"
            base_url = f"{scheme}://{self._endpoint.host}:{self._endpoint.port}"
        self._http = httpx.Client(
            base_url=base_url,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)),
            headers={HEADER_AUTHORIZATION: f"{AUTH_SCHEME} {secret}"},
            follow_redirects=False,
            trust_env=False,
        )

    @property
    def endpoint(self) -> str:
        return self._endpoint.text

    def __repr__(self) -> str:
        return f"AgentClient(endpoint={self._endpoint.text!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- request/response ---------------------------------------------------------------------

    def _detail(self, method: str, path: str, what: str) -> str:
        return f"{method} {path} endpoint={self._endpoint.text}: {what}"

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> dict[str, Any]:
        try:
            response = self._http.request(
                method,
                path,
                json=body,
                params=params,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.ConnectTimeout as exc:
            raise AgentUnreachable(log_detail=self._detail(method, path, f"connect timeout: {exc}")) from None
        except httpx.TimeoutException as exc:
            kind = type(exc).__name__
            raise AgentTimeout(log_detail=self._detail(method, path, f"{kind}: {exc}")) from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            kind = type(exc).__name__
            raise AgentUnreachable(log_detail=self._detail(method, path, f"{kind}: {exc}")) from None
        except httpx.HTTPError as exc:
            kind = type(exc).__name__
            raise AgentError(log_detail=self._detail(method, path, f"{kind}: {exc}")) from None
        return self._decode(method, path, response)

    def _decode(self, method: str, path: str, response: httpx.Response) -> dict[str, Any]:
        doc: Any
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if response.is_success:
            if not isinstance(doc, dict):
                raise AgentError(
                    log_detail=self._detail(method, path, f"status {response.status_code}, not a JSON object")
                )
            return doc
        self._raise_status(method, path, response.status_code, doc)

    def _raise_status(self, method: str, path: str, status: int, doc: Any) -> NoReturn:
        code = str(doc.get("code", "")) if isinstance(doc, dict) else ""
        agent_message = str(doc.get("message", ""))[:300] if isinstance(doc, dict) else ""
        detail = self._detail(method, path, f"status {status} code={code or '-'} message={agent_message!r}")
        if status == 401 or code == CODE_UNAUTHORIZED:
            raise AgentRejected(
                "The VM's guest agent refused the controller's credentials.", log_detail=detail
            )
        error_class = _CALL_ERRORS.get(code, AgentCallError)
        message = f"The VM's guest agent returned an error: {agent_message}" if agent_message else None
        raise error_class(
            message,
            status=status,
            agent_code=code or "unknown",
            agent_message=agent_message,
            log_detail=detail,
        )

    # -- public calls -------------------------------------------------------------------------

    def health(self, *, timeout: float | None = None) -> AgentHealth:
        """``GET /v1/health``."""
        doc = self._request(
            "GET", PATH_HEALTH, timeout=httpx.Timeout(timeout) if timeout is not None else None
        )
        try:
            return AgentHealth.model_validate(doc)
        except ValidationError as exc:
            raise AgentError(
                log_detail=self._detail("GET", PATH_HEALTH, f"bad health answer: {exc}")
            ) from None

    def wait_ready(self, deadline_s: float, poll_interval: float = 0.2) -> AgentHealth:
        """Poll ``health`` until it answers; ``AgentTimeout`` after ``deadline_s`` seconds.

        ``AgentRejected`` (wrong secret) is raised at once: waiting will not fix it.
        """
        end = time.monotonic() + deadline_s
        attempts = 0
        last = "no attempt"
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            attempts += 1
            try:
                return self.health(timeout=max(0.1, min(self.timeout, remaining, CONNECT_TIMEOUT_S)))
            except (AgentUnreachable, AgentTimeout) as exc:
                last = exc.log_detail or exc.code
            time.sleep(max(0.0, min(poll_interval, end - time.monotonic())))
        raise AgentTimeout(
            f"The VM's guest agent did not become ready within {deadline_s:g} s.",
            log_detail=f"wait_ready endpoint={self._endpoint.text} attempts={attempts} last={last}",
        )

    def exec(
        self,
        argv: list[str],
        *,
        timeout_s: float,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the guest (as ``user`` if given) and wait for it, at most ``timeout_s``.

        A timeout is not an error: the agent kills the process group and ``timed_out`` is True.
        """
        if not argv:
            raise ValueError("argv is empty")
        if not 0 < timeout_s <= MAX_EXEC_TIMEOUT_S:
            raise ValueError(f"timeout_s must be in (0, {MAX_EXEC_TIMEOUT_S}]")
        body: dict[str, Any] = {"argv": list(argv), "timeout_s": timeout_s}
        if env is not None:
            body["env"] = dict(env)
        if cwd is not None:
            body["cwd"] = cwd
        if user is not None:
            body["user"] = user
        if stdin is not None:
            body["stdin_b64"] = base64.b64encode(stdin).decode("ascii")
        http_timeout = httpx.Timeout(
            self.timeout, connect=min(self.timeout, CONNECT_TIMEOUT_S), read=timeout_s + EXEC_TIMEOUT_MARGIN_S
        )
        doc = self._request("POST", PATH_EXEC, body=body, timeout=http_timeout)
        try:
            answer = ExecResponse.model_validate(doc)
        except ValidationError as exc:
            raise AgentError(log_detail=self._detail("POST", PATH_EXEC, f"bad exec answer: {exc}")) from None
        return ExecResult(
            exit_code=answer.exit_code,
            stdout=_b64decode(answer.stdout_b64),
            stderr=_b64decode(answer.stderr_b64),
            timed_out=answer.timed_out,
            duration_s=answer.duration_s,
            signal=answer.signal,
            stdout_truncated=answer.stdout_truncated,
            stderr_truncated=answer.stderr_truncated,
        )

    def write_file(
        self, path: str, data: bytes, *, mode: int, owner: str | None = None, dir_mode: int | None = None
    ) -> FileInfo:
        """Atomically write ``path`` in the guest with ``mode`` and ``owner`` (``user[:group]``).

        Missing parent directories are created (mode ``dir_mode``, default 0755; owned by
        ``owner`` when given).
        """
        body: dict[str, Any] = {
            "path": path,
            "content_b64": base64.b64encode(data).decode("ascii"),
            "mode": mode,
        }
        if owner is not None:
            body["owner"] = owner
        if dir_mode is not None:
            body["dir_mode"] = dir_mode
        doc = self._request("PUT", PATH_FILES, body=body)
        try:
            return FileInfo.model_validate(doc)
        except ValidationError as exc:
            raise AgentError(log_detail=self._detail("PUT", PATH_FILES, f"bad answer: {exc}")) from None

    def read_file(self, path: str) -> FileContent:
        """Read a regular file in the guest; ``AgentFileNotFound`` when it does not exist."""
        doc = self._request("GET", PATH_FILES, params={"path": path})
        content = doc.get("content_b64")
        if not isinstance(content, str):
            raise AgentError(log_detail=self._detail("GET", PATH_FILES, "answer lacks content_b64"))
        try:
            info = FileInfo.model_validate(doc)
        except ValidationError as exc:
            raise AgentError(log_detail=self._detail("GET", PATH_FILES, f"bad answer: {exc}")) from None
        return FileContent(
            data=_b64decode(content), mode=info.mode, owner=info.owner, group=info.group, size=info.size
        )

    def shutdown(self, action: str = "poweroff") -> None:
        """Ask the guest to power off (or reboot) itself; the agent answers before it acts."""
        self._request("POST", PATH_SHUTDOWN, body={"action": action})

    def credential_health(self, user: str | None = None) -> CredentialHealthReport:
        """``GET /v1/credentials/health``: the CLIs' credential state in ``user``'s home (default:
        the guest's CLI user), parsed in the guest; metadata only, no token crosses the wire."""
        doc = self._request("GET", PATH_CREDENTIAL_HEALTH, params={"user": user} if user else None)
        try:
            return CredentialHealthReport.model_validate(doc)
        except ValidationError as exc:
            where = sorted({".".join(map(str, error["loc"])) + ":" + error["type"] for error in exc.errors()})
            raise AgentError(log_detail=self._detail("GET", PATH_CREDENTIAL_HEALTH, f"bad answer: {where}")) from None

    # -- OAuth flows (Browser VMs; see 0002 "OAuth agent") -------------------------------------

    def oauth_start(self, spec: OAuthFlowSpec) -> OAuthFlowState:
        """``POST /v1/oauth/flows``: start a sign-in flow; the answer has ``flow_id``, ``redirect_uri``, ``status``."""
        return self._flow_state("POST", PATH_OAUTH_FLOWS, self._request("POST", PATH_OAUTH_FLOWS, body=spec.to_wire()))

    def oauth_warm(self, browser: OAuthBrowser, timeout_s: float = 90.0) -> None:
        """``POST /v1/oauth/browser``: start Chromium on a blank page, as the next flow with the same
        ``browser`` settings would run it, and return once its page is up (the warm pool, ADR 0012).
        That flow then takes this browser over instead of starting one."""
        body: dict[str, Any] = {"browser": browser.model_dump(mode="json", exclude_unset=True),
                                "timeout_s": timeout_s}
        self._request("POST", PATH_OAUTH_BROWSER, body=body, timeout=httpx.Timeout(timeout_s + 10, connect=5.0))

    def oauth_status(self, flow_id: str) -> OAuthFlowState:
        """``GET /v1/oauth/flows/{id}``; ``result`` (the token response, a secret) once completed."""
        path = f"{PATH_OAUTH_FLOWS}/{quote(flow_id, safe='')}"
        return self._flow_state("GET", path, self._request("GET", path))

    def _flow_state(self, method: str, path: str, doc: dict[str, Any]) -> OAuthFlowState:
        try:
            return OAuthFlowState.model_validate(doc)
        except ValidationError as exc:
            # Only the error's locations and types: the document may hold tokens.
            where = sorted({".".join(map(str, error["loc"])) + ":" + error["type"] for error in exc.errors()})
            raise AgentError(log_detail=self._detail(method, path, f"bad flow answer: {where}")) from None

    def oauth_cancel(self, flow_id: str) -> None:
        """``DELETE /v1/oauth/flows/{id}``: stop its listener and browser, forget its result. Idempotent."""
        self._request("DELETE", f"{PATH_OAUTH_FLOWS}/{quote(flow_id, safe='')}")

    # -- streams ------------------------------------------------------------------------------

    async def open_pty(self, user: str, cols: int, rows: int, cmd: str | None = None) -> PtyStream:
        """Start a login shell (or ``shell -l -c cmd``) as ``user`` on a new pty in the guest."""
        params = {"user": user, "cols": str(cols), "rows": str(rows)}
        if cmd is not None:
            params["cmd"] = cmd
        reader, writer = await self._upgrade(PATH_PTY, params, UPGRADE_PTY)
        return PtyStream(reader, writer, self._endpoint.text)

    async def open_tcp(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw byte stream to ``127.0.0.1:port`` inside the guest (e.g. the VNC server)."""
        if not 1 <= port <= 65535:
            raise ValueError("port must be in [1, 65535]")
        return await self._upgrade(PATH_TCP, {"port": str(port)}, UPGRADE_TCP)

    async def _upgrade(
        self, path: str, params: dict[str, str], token: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        target = f"{path}?{urlencode(params)}"
        host = "agent" if self._endpoint.uds is not None else f"{self._endpoint.host}:{self._endpoint.port}"
        request = (
            f"GET {target} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            f"{HEADER_AUTHORIZATION}: {AUTH_SCHEME} {self._secret}\r\n"
            "Connection: Upgrade\r\n"
            f"Upgrade: {token}\r\n"
            "\r\n"
        ).encode()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                if self._endpoint.uds is not None:
                    reader, writer = await asyncio.open_unix_connection(self._endpoint.uds)
                    if self._endpoint.vsock_port is not None:
                        await _vsock_handshake(reader, writer, self._endpoint.vsock_port)
                else:
                    reader, writer = await asyncio.open_connection(
                        self._endpoint.host, self._endpoint.port, ssl=self._tls,
                        server_hostname=self._endpoint.host if self._tls else None)
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                status, headers = _parse_response_head(head)
                if status == 101:
                    if headers.get("upgrade", "").lower() != token:
                        raise AgentError(log_detail=self._detail("GET", path, "101 for a different protocol"))
                    return reader, writer
                length = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(min(length, MAX_RESPONSE_HEAD)) if length else b""
        except TimeoutError:
            await _close_quietly(writer)
            raise AgentTimeout(log_detail=self._detail("GET", path, "upgrade timed out")) from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            await _close_quietly(writer)
            kind = type(exc).__name__
            raise AgentUnreachable(log_detail=self._detail("GET", path, f"{kind}: {exc}")) from None
        except BaseException:
            await _close_quietly(writer)
            raise
        await _close_quietly(writer)
        try:
            doc: Any = json.loads(body) if body else None
        except ValueError:
            doc = None
        self._raise_status("GET", path, status, doc)


def _parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError("not an HTTP response")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _close_quietly(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
