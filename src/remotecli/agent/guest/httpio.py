"""A minimal HTTP/1.1 server side on asyncio streams: requests in, JSON responses out.

Only what the agent protocol needs: Content-Length bodies (no chunked request bodies), keep-alive,
and ``Upgrade`` to a raw byte stream.
"""

import asyncio
import json
from urllib.parse import parse_qs, urlsplit

from .wire import MAX_BODY_BYTES

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
IDLE_TIMEOUT_S = 120.0
HEADER_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 120.0

REASONS = {
    101: "Switching Protocols",
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class HttpError(Exception):
    """An error answered as ``{"code", "message"}`` with an HTTP status."""

    def __init__(self, status, code, message, close=False):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.close = close


class Request:
    __slots__ = ("body", "headers", "method", "path", "query", "target", "version")

    def __init__(self, method, target, version, headers):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers  # lower-case name -> value (last one wins; duplicates noted below)
        parts = urlsplit(target)
        self.path = parts.path
        self.query = {
            key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()
        }
        self.body = b""

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def wants_close(self):
        connection = self.header("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" not in connection
        return "close" in connection

    def is_upgrade(self, token):
        connection = [part.strip().lower() for part in self.header("connection", "").split(",")]
        return "upgrade" in connection and self.header("upgrade", "").strip().lower() == token

    def json(self):
        if not self.body:
            raise HttpError(400, "invalid_request", "A JSON body is required.")
        try:
            doc = json.loads(self.body)
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "invalid_request", "The body is not valid JSON.") from None
        if not isinstance(doc, dict):
            raise HttpError(400, "invalid_request", "The body must be a JSON object.")
        return doc


async def read_request_head(reader):
    """Read a request line and headers. None on a clean end of the connection."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_S)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise HttpError(400, "invalid_request", "Incomplete request.", close=True) from None
    except asyncio.LimitOverrunError:
        raise HttpError(431, "headers_too_large", "The request headers are too large.", close=True) from None
    except TimeoutError:
        return None
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise HttpError(400, "invalid_request", "Bad request encoding.", close=True) from None
    lines = text.split("\r\n")
    while lines and lines[0] == "":  # tolerate stray CRLF between requests
        lines.pop(0)
    if not lines:
        return None
    request_line = lines[0].split(" ")
    if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
        raise HttpError(400, "invalid_request", "Malformed request line.", close=True)
    method, target, version = request_line
    headers = {}
    seen = set()
    count = 0
    for line in lines[1:]:
        if not line:
            continue
        count += 1
        if count > MAX_HEADERS:
            raise HttpError(431, "headers_too_large", "Too many request headers.", close=True)
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, "invalid_request", "Malformed header line.", close=True)
        key = name.lower()
        if key in seen and key in ("authorization", "content-length", "transfer-encoding", "host"):
            raise HttpError(400, "invalid_request", f"Duplicate {name} header.", close=True)
        seen.add(key)
        headers[key] = value.strip()
    return Request(method, target, version, headers)


def content_length(request):
    if "transfer-encoding" in request.headers:
        raise HttpError(411, "length_required", "Send a Content-Length body, not chunked.", close=True)
    raw = request.header("content-length")
    if raw is None:
        return 0
    if not raw.isdigit():
        raise HttpError(400, "invalid_request", "Bad Content-Length.", close=True)
    length = int(raw)
    if length > MAX_BODY_BYTES:
        raise HttpError(413, "body_too_large", "The request body is too large.", close=True)
    return length


async def read_body(reader, request):
    length = content_length(request)
    if length:
        try:
            request.body = await asyncio.wait_for(reader.readexactly(length), BODY_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError):
            raise HttpError(400, "invalid_request", "Incomplete request body.", close=True) from None


def encode_response(status, doc=None, close=False, extra_headers=()):
    body = b"" if doc is None else json.dumps(doc, separators=(",", ":")).encode("utf-8")
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
    if doc is not None:
        lines.append("Content-Type: application/json")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close" if close else "Connection: keep-alive")
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def encode_switching(token):
    return (f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {token}\r\n\r\n").encode(
        "latin-1"
    )
