"""Structured JSON logs.

Every record is one JSON object per line with ``ts``, ``level``, ``module``, ``message`` and the
context fields ``vm_id``, ``user_id``, ``session_id`` (from ``log_context`` or ``extra=``), as in
the seed's log excerpts. A redaction filter strips anything shaped like a token or secret as a
second line of defence; the first is never passing secrets to a logger at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONTEXT_FIELDS = ("vm_id", "user_id", "session_id")
_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("remotecli_log_context", default=None)

_SECRET_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?i)((?:access|refresh|id)_?token|secret|password|api_?key|authorization)(\"?\s*[:=]\s*\"?)[^\s\",}]{4,}"),
    re.compile(r"\brcli_[A-Za-z0-9_-]{16,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),  # JWTs
    # OAuth values in a URL's query (an access log line of the single sign-on callback, say), and
    # websocket tickets (uvicorn's own '"WebSocket /api/v1/vms/<id>/terminal?token=..." [accepted]'
    # line, written even with the access log off).
    re.compile(r"([?&](?:code|state|nonce|code_verifier|client_secret|token|ticket|(?:access|refresh|id)_token)=)"
               r"[^&\s\"'#]+"),
]


def redact(text: str) -> str:
    """Replace token-, password- and key-shaped substrings with ``[redacted]``."""
    for pattern in _SECRET_PATTERNS:
        if pattern.groups >= 2:
            text = pattern.sub(lambda m: m.group(1) + m.group(2) + "[redacted]", text)
        elif pattern.groups == 1:
            text = pattern.sub(lambda m: m.group(1) + "[redacted]", text)
        else:
            text = pattern.sub("[redacted]", text)
    return text


def get_logger(module: str) -> logging.Logger:
    """A logger whose records carry ``module`` (e.g. ``vm-manager``), taken from its name."""
    return logging.getLogger(f"remotecli.{module}")


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Attach ``vm_id``/``user_id``/``session_id`` to every record logged inside the block."""
    current = dict(_context.get() or {})
    current.update({key: value for key, value in fields.items() if value is not None})
    token = _context.set(current)
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "module": _module_of(record),
            "message": redact(record.getMessage()),
        }
        context = _context.get() or {}
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name) or context.get(name)
            if value:
                payload[name] = value
        for key, value in record.__dict__.items():
            if key.startswith("x_"):
                payload[key[2:]] = value if isinstance(value, int | float | bool) else redact(str(value))
        if record.exc_info:
            payload["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(payload, default=str)


def _module_of(record: logging.LogRecord) -> str:
    # LogRecord.module is the Python file name; ours is the component, from the logger name.
    name = record.name
    return name.split(".", 1)[1] if name.startswith("remotecli.") else name


def configure_logging(level: str = "INFO", log_file: Path | None = None, stderr: bool = True) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_remotecli", False):
            root.removeHandler(handler)
    formatter = JsonFormatter()
    handlers: list[logging.Handler] = []
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._remotecli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
