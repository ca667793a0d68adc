"""A small client for Firecracker's HTTP API on its Unix socket (``--api-sock``).

Only the endpoints the driver uses, with the request bodies of Firecracker's published swagger
(``src/firecracker/swagger/firecracker.yaml``): successful ``PUT``/``PATCH`` answer ``204 No
Content``; failures answer ``400`` (bad input, or "not possible in this state") or another status
with the body ``{"fault_message": "..."}``.

Errors become :class:`FirecrackerApiError` (Firecracker answered with a fault) or
:class:`FirecrackerUnreachable` (socket missing, refused, timed out). Both are ``DriverError``s.
Any string listed in ``redact`` (the VM's agent secret) is replaced in every message and log
detail, whatever Firecracker echoes back.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from remotecli.errors import DriverError

REDACTED = "[redacted]"
_MAX_DETAIL = 2000


class FirecrackerApiError(DriverError):
    """Firecracker answered a request with an error status and a ``fault_message``."""

    default_message = "Firecracker refused a request; the operator can see details in the log."

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message
        super().__init__(
            f"Firecracker refused {method} {path} (HTTP {status}); the operator can see details in the log.",
            log_detail=f"{method} {path} -> {status}: {fault_message}",
        )


class FirecrackerUnreachable(DriverError):
    """The API socket does not answer (missing, refused, or timed out)."""

    default_message = "Firecracker's API socket does not answer."

    def __init__(self, method: str, path: str, reason: str, *, timed_out: bool = False) -> None:
        self.method = method
        self.path = path
        self.timed_out = timed_out
        super().__init__(
            f"Firecracker's API socket did not answer {method} {path}.",
            log_detail=f"{method} {path}: {reason}",
        )


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text[:_MAX_DETAIL]


class FirecrackerApi:
    """Synchronous client for one Firecracker process's API socket."""

    def __init__(self, socket_path: Path, *, timeout: float = 5.0, redact: Iterable[str] = ()) -> None:
        self.socket_path = socket_path
        self._redact = tuple(s for s in redact if s)
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://localhost",
            timeout=timeout,
            headers={"Accept": "application/json"},
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FirecrackerApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------

    def accepts_connections(self, timeout: float = 0.5) -> bool:
        """Does something listen on the socket? (A plain connect, closed at once.)"""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(timeout)
            try:
                probe.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Send one request; return the decoded JSON body (None for 204). Raises on errors."""
        if not self.socket_path.exists():
            # Checked here because httpcore leaks (until GC) the socket of a failed UDS connect.
            raise FirecrackerUnreachable(method, path, f"{self.socket_path} does not exist")
        try:
            if body is None:
                response = self._client.request(method, path)
            else:
                response = self._client.request(method, path, json=body)
        except httpx.TimeoutException as exc:
            reason = _redact(f"timed out ({type(exc).__name__})", self._redact)
            raise FirecrackerUnreachable(method, path, reason, timed_out=True) from None
        except httpx.HTTPError as exc:
            reason = _redact(f"{type(exc).__name__}: {exc}", self._redact)
            raise FirecrackerUnreachable(method, path, reason) from None
        if response.status_code >= 300:
            raise FirecrackerApiError(
                method, path, response.status_code, _redact(_fault_message(response), self._redact)
            )
        if response.status_code == 204 or not response.content:
            return None
        try:
            data = response.json()
        except ValueError:
            raise FirecrackerUnreachable(method, path, "answer is not JSON") from None
        return data if isinstance(data, dict) else {"value": data}

    # -- endpoints ---------------------------------------------------------------------------

    def describe_instance(self) -> dict[str, Any]:
        """``GET /``: ``{"app_name", "id", "state": "Not started"|"Running"|"Paused", "vmm_version"}``."""
        return self.request("GET", "/") or {}

    def put_logger(self, log_path: str, level: str = "Warning") -> None:
        self.request("PUT", "/logger", {"log_path": log_path, "level": level, "show_level": True})

    def put_metrics(self, metrics_path: str) -> None:
        self.request("PUT", "/metrics", {"metrics_path": metrics_path})

    def put_boot_source(self, kernel_image_path: str, boot_args: str, initrd_path: str | None) -> None:
        body: dict[str, Any] = {"kernel_image_path": kernel_image_path, "boot_args": boot_args}
        if initrd_path is not None:
            body["initrd_path"] = initrd_path
        self.request("PUT", "/boot-source", body)

    def put_drive(self, drive_id: str, path_on_host: str, *, is_root_device: bool, is_read_only: bool) -> None:
        self.request(
            "PUT",
            f"/drives/{drive_id}",
            {
                "drive_id": drive_id,
                "path_on_host": path_on_host,
                "is_root_device": is_root_device,
                "is_read_only": is_read_only,
            },
        )

    def put_machine_config(self, vcpu_count: int, mem_size_mib: int) -> None:
        self.request("PUT", "/machine-config", {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib})

    def put_network_interface(self, iface_id: str, host_dev_name: str, guest_mac: str) -> None:
        self.request(
            "PUT",
            f"/network-interfaces/{iface_id}",
            {"iface_id": iface_id, "host_dev_name": host_dev_name, "guest_mac": guest_mac},
        )

    def put_vsock(self, guest_cid: int, uds_path: str) -> None:
        self.request("PUT", "/vsock", {"guest_cid": guest_cid, "uds_path": uds_path})

    def action(self, action_type: str) -> None:
        """``PUT /actions``: ``InstanceStart``, ``SendCtrlAltDel`` or ``FlushMetrics``."""
        self.request("PUT", "/actions", {"action_type": action_type})

    def patch_vm(self, state: str) -> None:
        """``PATCH /vm``: ``Paused`` or ``Resumed``."""
        self.request("PATCH", "/vm", {"state": state})

    def create_snapshot(self, snapshot_path: str, mem_file_path: str, snapshot_type: str = "Full") -> None:
        self.request(
            "PUT",
            "/snapshot/create",
            {"snapshot_type": snapshot_type, "snapshot_path": snapshot_path, "mem_file_path": mem_file_path},
        )


def _fault_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except (ValueError, json.JSONDecodeError):
        return response.text.strip() or response.reason_phrase
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return str(data["fault_message"])
    return json.dumps(data)[:_MAX_DETAIL]
