"""Host side of the guest agent wire protocol: constants, framing and result models.

See ``docs/decisions/0002-guest-agent-protocol.md``. The guest agent cannot import this module (it
is standard-library only and copied into images on its own), so the few wire constants it needs are
DUPLICATED in ``remotecli/agent/guest/wire.py``. Keep the two in step;
``tests/unit/test_agent_protocol.py`` checks that they match.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_AGENT_PORT: Final = 7000
API_PREFIX: Final = "/v1"

PATH_HEALTH: Final = "/v1/health"
PATH_EXEC: Final = "/v1/exec"
PATH_FILES: Final = "/v1/files"
PATH_PTY: Final = "/v1/pty"
PATH_TCP: Final = "/v1/tcp"
PATH_SHUTDOWN: Final = "/v1/shutdown"

HEADER_AUTHORIZATION: Final = "Authorization"
AUTH_SCHEME: Final = "Bearer"

# --- duplicated in guest/wire.py ---------------------------------------------------------------
UPGRADE_PTY: Final = "remotecli-pty"
UPGRADE_TCP: Final = "remotecli-tcp"

FRAME_HEADER_SIZE: Final = 5  # type (1 byte) + payload length (4 bytes, big endian)
FRAME_DATA: Final = 0x01  # both directions: raw terminal bytes
FRAME_RESIZE: Final = 0x02  # host -> guest: JSON {"cols": int, "rows": int}
FRAME_EXIT: Final = 0x03  # guest -> host: JSON {"code": int, "signal": int | null}; last frame
MAX_FRAME_PAYLOAD: Final = 1024 * 1024

MAX_OUTPUT_BYTES: Final = 8 * 1024 * 1024
MAX_FILE_BYTES: Final = 32 * 1024 * 1024
MAX_BODY_BYTES: Final = 48 * 1024 * 1024
MAX_EXEC_TIMEOUT_S: Final = 24 * 3600.0
# --- end of duplicated constants ---------------------------------------------------------------

# Agent error codes the host acts on (the agent answers ``{"code", "message"}``).
CODE_UNAUTHORIZED: Final = "unauthorized"
CODE_FILE_NOT_FOUND: Final = "file_not_found"
CODE_PORT_UNREACHABLE: Final = "port_unreachable"
CODE_UNKNOWN_USER: Final = "unknown_user"
CODE_SPAWN_FAILED: Final = "spawn_failed"

_FRAME_HEADER = struct.Struct(">BI")


def encode_frame(kind: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise ValueError("frame payload too large")
    return _FRAME_HEADER.pack(kind, len(payload)) + payload


def decode_frame_header(header: bytes) -> tuple[int, int]:
    kind, length = _FRAME_HEADER.unpack(header)
    return int(kind), int(length)


def encode_resize(cols: int, rows: int) -> bytes:
    return encode_frame(FRAME_RESIZE, json.dumps({"cols": cols, "rows": rows}).encode())


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class AgentHealth(_Model):
    """``GET /v1/health``."""

    vm_id: str
    vm_type: str
    hostname: str
    uptime_s: float
    agent_version: str
    boot_id: str
    agent_uptime_s: float | None = None


class ExecRequest(_Model):
    """``POST /v1/exec`` body."""

    argv: list[str] = Field(min_length=1)
    timeout_s: float = Field(gt=0, le=MAX_EXEC_TIMEOUT_S)
    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    stdin_b64: str | None = None


class ExecResponse(_Model):
    """``POST /v1/exec`` answer (outputs base64)."""

    exit_code: int
    signal: int | None = None
    stdout_b64: str
    stderr_b64: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timed_out: bool
    duration_s: float


class ExecResult(_Model):
    """What ``AgentClient.exec`` returns. ``exit_code`` is 128+N when killed by signal N."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    duration_s: float
    signal: int | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class WriteFileRequest(_Model):
    """``PUT /v1/files`` body."""

    path: str
    content_b64: str
    mode: int = Field(ge=0, le=0o7777)
    owner: str | None = None
    dir_mode: int | None = Field(default=None, ge=0, le=0o7777)


class FileInfo(_Model):
    """``PUT /v1/files`` answer and the metadata part of ``GET /v1/files``."""

    path: str
    mode: int
    owner: str
    group: str
    uid: int | None = None
    gid: int | None = None
    size: int


class FileContent(_Model):
    """What ``AgentClient.read_file`` returns."""

    data: bytes
    mode: int
    owner: str
    group: str
    size: int


@dataclass(frozen=True, slots=True)
class PtyData:
    """Terminal output from the guest."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PtyExit:
    """The shell ended; the last event of a PTY stream. ``code`` is 128+N when killed by signal N."""

    code: int | None
    signal: int | None = None


PtyEvent = PtyData | PtyExit
