"""A small, typed client of the Incus REST API (``/1.0``) over httpx.

Transport: ``https://HOST:8443`` with the controller's client certificate (mutual TLS) and the
cluster's server certificate pinned (its only trust anchor), or ``unix:///PATH`` for a member's
local socket. Tests pass an ``httpx`` transport (``MockTransport``) at the same seam.

Incus answers with an envelope (``type`` sync/async/error, ``metadata``, ``operation``); async
calls are waited on through ``/1.0/operations/<id>/wait``. Everything here is scoped to one Incus
project. No method logs the bodies it sends (a file push may hold a private key).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from remotecli.drivers.incus.certs import pinned_client_context
from remotecli.errors import DriverError, DriverUnavailable
from remotecli.logging import get_logger

log = get_logger("incus")

JsonObject = dict[str, Any]


class IncusError(DriverError):
    """Incus refused a request or an operation failed (``status`` is the HTTP or operation code)."""

    code = "incus_error"

    def __init__(self, message: str | None = None, *, status: int = 0, log_detail: str | None = None) -> None:
        super().__init__(message, log_detail=log_detail)
        self.status = status


class IncusNotFound(IncusError):
    code = "incus_not_found"


class IncusUnreachable(IncusError):
    """The Incus API did not answer (network, TLS, or the member is down)."""

    code = "incus_unreachable"


@dataclass(frozen=True)
class Instance:
    """What the driver needs of one instance (``GET /1.0/instances/<name>``)."""

    name: str
    status: str  # Running, Stopped, Frozen, Error, ...
    location: str  # the cluster member it is on ("none" outside a cluster)
    type: str  # container / virtual-machine
    config: Mapping[str, str] = field(default_factory=dict)
    devices: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @classmethod
    def from_api(cls, doc: Mapping[str, Any]) -> Instance:
        config = doc.get("config") or {}
        devices = doc.get("devices") or {}
        return cls(
            name=str(doc.get("name", "")),
            status=str(doc.get("status", "")),
            location=str(doc.get("location") or "none"),
            type=str(doc.get("type", "")),
            config={str(k): str(v) for k, v in config.items()},
            devices={str(k): {str(a): str(b) for a, b in v.items()} for k, v in devices.items()
                     if isinstance(v, dict)},
        )


@dataclass(frozen=True)
class Member:
    name: str
    url: str
    status: str  # Online, Offline, Evacuated, Blocked

    @property
    def address(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def online(self) -> bool:
        return self.status.lower() == "online"


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class IncusEvent:
    """One lifecycle event from ``/1.0/events`` (``type=lifecycle``)."""

    action: str  # instance-started, instance-stopped, instance-deleted, ...
    instance: str | None  # the instance's name, when the event is about one
    project: str
    location: str

    @property
    def wakes_reconciler(self) -> bool:
        return self.instance is not None and self.action.startswith("instance-")


def parse_event(raw: str | bytes, *, project: str) -> IncusEvent | None:
    """An ``IncusEvent`` from one event-stream message, or None when it is not a lifecycle event of
    an instance in ``project`` (or not valid JSON)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("type") != "lifecycle":
        return None
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict):
        return None
    source = str(meta.get("source", ""))
    parts = urlsplit(source)
    event_project = str(doc.get("project") or "") or _query_value(parts.query, "project") or "default"
    if event_project != project:
        return None
    instance = None
    prefix = "/1.0/instances/"
    if parts.path.startswith(prefix):
        instance = parts.path[len(prefix):].split("/", 1)[0] or None
    return IncusEvent(action=str(meta.get("action", "")), instance=instance, project=event_project,
                      location=str(doc.get("location") or ""))


def _query_value(query: str, key: str) -> str | None:
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name == key:
            return value
    return None


@dataclass(frozen=True)
class Connection:
    """How to reach the Incus API: the URL and the TLS material (``https``) or a socket (``unix``)."""

    url: str
    project: str
    client_cert: Path | None = None
    client_key: Path | None = None
    server_cert_pem: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.url.startswith("unix:")

    @property
    def socket_path(self) -> str:
        parts = urlsplit(self.url)
        return (parts.netloc + parts.path) if parts.netloc else parts.path

    def ssl_context(self) -> ssl.SSLContext:
        """mTLS: our client certificate, and only the pinned server certificate is trusted."""
        if self.client_cert is None or self.client_key is None:
            raise DriverUnavailable("The Incus driver needs a client certificate and key for an https URL.")
        if not self.server_cert_pem:
            raise DriverUnavailable(
                "The Incus driver needs the cluster's server certificate (incus_server_cert) to pin for an https URL."
            )
        return pinned_client_context(self.server_cert_pem, client=(self.client_cert, self.client_key))


class IncusClient:
    """One Incus API endpoint, one project. Thread-safe (one ``httpx.Client``)."""

    def __init__(self, conn: Connection, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        """``conn.url`` may list several members (``https://A:8443,https://B:8443``): when one does
        not answer, the next is used (any member serves the whole cluster's API)."""
        self.conn = conn
        self.project = conn.project
        self.timeout = timeout
        self._clients: list[httpx.Client] = []
        self._current = 0
        for url in [u.strip() for u in conn.url.split(",") if u.strip()] or [conn.url]:
            verify: ssl.SSLContext | bool = True
            mine = transport
            if url.startswith("unix:"):
                base_url = "http://incus"
                mine = mine or httpx.HTTPTransport(uds=Connection(url, conn.project).socket_path, retries=0)
            else:
                parts = urlsplit(url)
                if parts.scheme != "https":
                    raise DriverUnavailable("incus_url must be https://HOST:PORT or unix:///PATH (never plain http).")
                base_url = f"https://{parts.netloc}"
                if mine is None:
                    verify = conn.ssl_context()
            self._clients.append(httpx.Client(base_url=base_url, transport=mine, verify=verify, trust_env=False,
                                              timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0))))
        self._lock = threading.Lock()

    @property
    def _http(self) -> httpx.Client:
        return self._clients[self._current]

    @property
    def current_url(self) -> str:
        return str(self._http.base_url).rstrip("/")

    def close(self) -> None:
        for client in self._clients:
            client.close()

    # ------------------------------------------------------------------ raw requests

    def _params(self, extra: Mapping[str, str] | None = None, *, project: bool = True) -> dict[str, str]:
        params = {"project": self.project} if project else {}
        params.update(extra or {})
        return params

    def request(self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
                project: bool = True, content: bytes | None = None, headers: Mapping[str, str] | None = None,
                timeout: float | None = None) -> JsonObject:
        """One call; returns the envelope. Raises ``IncusNotFound`` (404), ``IncusError``,
        ``IncusUnreachable``."""
        failed: list[str] = []
        for _ in range(len(self._clients)):
            client = self._http
            try:
                response = client.request(
                    method, path, params=self._params(params, project=project),
                    json=body if content is None else None, content=content, headers=headers,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing sent: the next member may answer
                failed.append(f"{client.base_url}: {type(exc).__name__}: {exc}")
                with self._lock:
                    if self._http is client:
                        self._current = (self._current + 1) % len(self._clients)
            except httpx.TransportError as exc:
                raise IncusUnreachable("The Incus API did not answer.",
                                       log_detail=f"{method} {path}: {type(exc).__name__}: {exc}") from None
        else:
            raise IncusUnreachable("The Incus API did not answer.", log_detail=f"{method} {path}: {'; '.join(failed)}")
        try:
            doc = response.json()
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        if response.status_code >= 400 or doc.get("type") == "error":
            status = int(doc.get("error_code") or response.status_code)
            detail = f"{method} {path}: {status} {doc.get('error', response.reason_phrase)}"
            if status == 404:
                raise IncusNotFound(log_detail=detail, status=status)
            raise IncusError(log_detail=detail, status=status)
        return doc

    def get(self, path: str, params: Mapping[str, str] | None = None, *, project: bool = True) -> Any:
        return self.request("GET", path, params=params, project=project).get("metadata")

    def wait_operation(self, envelope: JsonObject, *, timeout: float = 120.0) -> JsonObject:
        """Wait for an async call's operation; returns the operation's metadata. Raises on failure."""
        if envelope.get("type") != "async":
            meta = envelope.get("metadata")
            return meta if isinstance(meta, dict) else {}
        op_path = str(envelope.get("operation") or "")
        if not op_path:
            meta = envelope.get("metadata") or {}
            op_path = f"/1.0/operations/{meta.get('id', '')}"
        deadline = time.monotonic() + timeout
        while True:
            left = max(1, int(deadline - time.monotonic()))
            doc = self.request("GET", f"{op_path}/wait", params={"timeout": str(min(left, 30))},
                               timeout=min(left, 30) + 10.0)
            op = doc.get("metadata") or {}
            status = str(op.get("status", ""))
            if status == "Success":
                return op if isinstance(op, dict) else {}
            if status in ("Failure", "Cancelled"):
                raise IncusError(log_detail=f"operation {op_path}: {status}: {op.get('err', '')}",
                                 status=int(op.get("status_code") or 400))
            if time.monotonic() >= deadline:
                raise IncusError(log_detail=f"operation {op_path} still {status} after {timeout:.0f} s")

    # ------------------------------------------------------------------ cluster and project

    def server(self) -> JsonObject:
        meta = self.get("/1.0", project=False)
        return meta if isinstance(meta, dict) else {}

    def members(self) -> list[Member]:
        try:
            docs = self.get("/1.0/cluster/members", {"recursion": "1"}, project=False)
        except IncusError as exc:
            if exc.status in (400, 404, 500) and "not clustered" in (exc.log_detail or "").lower():
                return []
            raise
        return [Member(name=str(d.get("server_name", "")), url=str(d.get("url", "")), status=str(d.get("status", "")))
                for d in docs or [] if isinstance(d, dict)]

    def ensure_project(self) -> None:
        """Our project, made on first use. It shares images and profiles with ``default`` (the
        runner image and the default profile's root disk and network)."""
        try:
            self.get(f"/1.0/projects/{quote(self.project, safe='')}", project=False)
            return
        except IncusNotFound:
            pass
        try:
            self.request("POST", "/1.0/projects", project=False, body={
                "name": self.project,
                "description": "remotecli VMs (one instance per VM)",
                "config": {"features.images": "false", "features.profiles": "false",
                           "features.storage.volumes": "true", "features.networks": "false"},
            })
        except IncusError as exc:
            if exc.status != 409:
                raise

    # ------------------------------------------------------------------ instances

    def instance(self, name: str) -> Instance:
        doc = self.get(f"/1.0/instances/{quote(name, safe='')}")
        return Instance.from_api(doc or {})

    def instance_state(self, name: str) -> JsonObject:
        doc = self.get(f"/1.0/instances/{quote(name, safe='')}/state")
        return doc if isinstance(doc, dict) else {}

    def instances(self) -> list[Instance]:
        docs = self.get("/1.0/instances", {"recursion": "1"})
        return [Instance.from_api(d) for d in docs or [] if isinstance(d, dict)]

    def create_instance(self, body: JsonObject, *, target: str | None = None, timeout: float = 300.0) -> None:
        params = {"target": target} if target else None
        self.wait_operation(self.request("POST", "/1.0/instances", body=body, params=params), timeout=timeout)

    def update_instance(self, name: str, patch: JsonObject) -> None:
        self.wait_operation(self.request("PATCH", f"/1.0/instances/{quote(name, safe='')}", body=patch))

    def set_state(self, name: str, action: str, *, timeout: float = 30.0, force: bool = False) -> None:
        body = {"action": action, "timeout": int(timeout), "force": force}
        envelope = self.request("PUT", f"/1.0/instances/{quote(name, safe='')}/state", body=body)
        self.wait_operation(envelope, timeout=timeout + 60.0)

    def delete_instance(self, name: str) -> None:
        self.wait_operation(self.request("DELETE", f"/1.0/instances/{quote(name, safe='')}"))

    def migrate_instance(self, name: str, target: str) -> None:
        """Move a stopped instance to member ``target`` (cold migration)."""
        envelope = self.request("POST", f"/1.0/instances/{quote(name, safe='')}", params={"target": target},
                                body={"name": name, "migration": True, "live": False})
        self.wait_operation(envelope, timeout=600.0)

    def push_file(self, name: str, path: str, data: bytes, *, mode: int = 0o600, uid: int = 0, gid: int = 0) -> None:
        self.request("POST", f"/1.0/instances/{quote(name, safe='')}/files", params={"path": path}, content=data,
                     headers={"X-Incus-type": "file", "X-Incus-mode": f"{mode:04o}", "X-Incus-uid": str(uid),
                              "X-Incus-gid": str(gid), "X-Incus-write": "overwrite",
                              "Content-Type": "application/octet-stream"},
                     timeout=max(self.timeout, 600.0))

    def make_dirs(self, name: str, path: str, *, mode: int = 0o755) -> None:
        """``mkdir -p`` inside the instance (each level pushed as a directory; existing ones are kept)."""
        parts = [p for p in path.split("/") if p]
        for depth in range(1, len(parts) + 1):
            level = "/" + "/".join(parts[:depth])
            try:
                self.request("POST", f"/1.0/instances/{quote(name, safe='')}/files", params={"path": level},
                             content=b"", headers={"X-Incus-type": "directory", "X-Incus-mode": f"{mode:04o}",
                                                   "X-Incus-uid": "0", "X-Incus-gid": "0"})
            except IncusError as exc:
                if exc.status not in (400, 409, 500):  # "already exists" comes as a 4xx/500 with that text
                    raise

    def read_file(self, name: str, path: str) -> bytes:
        try:
            response = self._http.get(f"/1.0/instances/{quote(name, safe='')}/files",
                                      params=self._params({"path": path}))
        except httpx.TransportError as exc:
            raise IncusUnreachable(log_detail=f"read {path} of {name}: {type(exc).__name__}") from None
        if response.status_code == 404:
            raise IncusNotFound(log_detail=f"read {path} of {name}: 404", status=404)
        if response.status_code >= 400:
            raise IncusError(log_detail=f"read {path} of {name}: {response.status_code}", status=response.status_code)
        return response.content

    def exec(self, name: str, command: list[str], *, timeout: float = 60.0) -> ExecResult:
        """Run ``command`` in the instance (no terminal, output recorded) and wait for it."""
        envelope = self.request("POST", f"/1.0/instances/{quote(name, safe='')}/exec", body={
            "command": command, "wait-for-websocket": False, "interactive": False, "record-output": True,
            "environment": {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        })
        op = self.wait_operation(envelope, timeout=timeout)
        meta = op.get("metadata") or {}
        outputs = meta.get("output") or {}
        texts: dict[str, str] = {}
        for fd in ("1", "2"):
            path = outputs.get(fd)
            if path:
                try:
                    response = self._http.get(str(path), params=self._params())
                    texts[fd] = response.text
                    self._http.delete(str(path), params=self._params())
                except httpx.TransportError:
                    texts[fd] = ""
        return ExecResult(exit_code=int(meta.get("return", -1)), stdout=texts.get("1", ""), stderr=texts.get("2", ""))

    # ------------------------------------------------------------------ storage volumes

    def create_volume(self, pool: str, name: str, *, size_bytes: int, target: str | None = None,
                      config: Mapping[str, str] | None = None) -> None:
        params = {"target": target} if target else None
        body = {"name": name, "type": "custom", "content_type": "filesystem",
                "config": {"size": str(size_bytes), **(config or {})}}
        self.wait_operation(self.request("POST", f"/1.0/storage-pools/{quote(pool, safe='')}/volumes/custom",
                                         body=body, params=params))

    def volume(self, pool: str, name: str) -> JsonObject:
        doc = self.get(f"/1.0/storage-pools/{quote(pool, safe='')}/volumes/custom/{quote(name, safe='')}")
        return doc if isinstance(doc, dict) else {}

    def delete_volume(self, pool: str, name: str) -> None:
        self.wait_operation(self.request(
            "DELETE", f"/1.0/storage-pools/{quote(pool, safe='')}/volumes/custom/{quote(name, safe='')}"))

    # ------------------------------------------------------------------ events

    def events_url(self) -> str:
        query = f"type=lifecycle&project={quote(self.project, safe='')}"
        if self.conn.is_unix:
            return f"ws://incus/1.0/events?{query}"
        parts = urlsplit(self.current_url)
        return f"wss://{parts.netloc}/1.0/events?{query}"


class EventWatcher:
    """Follows ``/1.0/events`` (a websocket) and calls ``on_event`` for each lifecycle event of the
    project; reconnects with a short back-off. A daemon thread; ``stop`` ends it."""

    def __init__(self, client: IncusClient, on_event: Callable[[IncusEvent], None]) -> None:
        self._client = client
        self._on_event = on_event
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="incus-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _connect(self) -> Any:
        from websockets.sync.client import connect, unix_connect

        conn = self._client.conn
        url = self._client.events_url()
        if conn.is_unix:
            return unix_connect(conn.socket_path, url, open_timeout=5.0)
        return connect(url, ssl=conn.ssl_context(), open_timeout=5.0)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with self._connect() as ws:
                    self.connected.set()
                    backoff = 0.5
                    while not self._stop.is_set():
                        try:
                            message = ws.recv(timeout=1.0)
                        except TimeoutError:
                            continue
                        event = parse_event(message, project=self._client.project)
                        if event is not None:
                            self._on_event(event)
            except Exception as exc:  # network, TLS, closed: reconnect
                self.connected.clear()
                log.info("Incus event stream lost; reconnecting: %s", type(exc).__name__)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 10.0)
