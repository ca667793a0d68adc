"""Reaching the guest agent through Firecracker's vsock device (hybrid vsock over a host UDS).

Firecracker's virtio-vsock device is backed by a Unix socket on the host (``PUT /vsock`` with
``uds_path``). For a host-initiated connection the host connects to that socket, writes
``CONNECT <port>\\n`` and reads ``OK <host_port>\\n``; from then on the Unix stream is a byte pipe
to whatever listens on AF_VSOCK ``<port>`` inside the guest.

The driver records the agent endpoint as ``unix+vsock:///<absolute uds path>?port=<port>``.
:func:`open_stream` performs the handshake and returns a connected socket that an HTTP client
(the agent client) can speak HTTP/1.1 on, exactly as on a TCP connection.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from remotecli.errors import AgentUnreachable

SCHEME = "unix+vsock"
_MAX_ACK = 64


def make_endpoint(uds_path: Path, port: int) -> str:
    return f"{SCHEME}://{quote(str(uds_path))}?port={port}"


def parse_endpoint(endpoint: str) -> tuple[Path, int]:
    """``unix+vsock:///path/vsock.sock?port=7000`` -> (Path('/path/vsock.sock'), 7000)."""
    parts = urlsplit(endpoint)
    if parts.scheme != SCHEME or not parts.path:
        raise ValueError(f"not a {SCHEME} endpoint")
    ports = parse_qs(parts.query).get("port")
    if not ports or not ports[0].isdigit():
        raise ValueError("vsock endpoint without a port")
    return Path(unquote(parts.path)), int(ports[0])


def open_stream(uds_path: Path, port: int, timeout: float = 5.0) -> socket.socket:
    """Connect to guest vsock ``port`` through Firecracker's host socket; returns the stream."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(uds_path))
        sock.sendall(f"CONNECT {port}\n".encode("ascii"))
        ack = b""
        while not ack.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk or len(ack) > _MAX_ACK:
                break
            ack += chunk
    except OSError as exc:
        sock.close()
        raise AgentUnreachable(log_detail=f"vsock {uds_path} port {port}: {exc}") from None
    if not ack.startswith(b"OK "):
        sock.close()
        raise AgentUnreachable(log_detail=f"vsock {uds_path} port {port}: handshake answer {ack[:_MAX_ACK]!r}")
    return sock
