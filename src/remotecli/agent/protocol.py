"""Host side of the guest agent wire protocol: constants, framing, request and result models.

See ``docs/decisions/0002-guest-agent-protocol.md``. The guest agent cannot import this module (it
is standard-library only and copied into images on its own), so the few wire constants it needs are
DUPLICATED in ``remotecli/agent/guest/wire.py`` (the OAuth path and flow statuses too). Keep the two
in step; ``tests/unit/test_agent_protocol.py`` checks that they match.

Also here: the config-disk contract every driver writes (``ConfigDisk``, contract 0001), and
``GuestAgent``, the typed seam through which services reach an agent (``AgentClient`` in
production, the fake driver's agent in tests; ``VmDriver.agent_client`` picks).
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from remotecli.errors import DriverError

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

PATH_OAUTH_FLOWS: Final = "/v1/oauth/flows"  # POST: start; GET/DELETE {PATH_OAUTH_FLOWS}/{flow_id}
PATH_OAUTH_BROWSER: Final = "/v1/oauth/browser"  # POST: Chromium on a blank page for the next flow (warm pool)
# The flow statuses are OAuthFlowStatus below; guest/wire.py has them as OAUTH_STATUS_* strings.
# GET ?user=NAME: the CLIs' credential files in NAME's home as metadata (CredentialHealthReport).
PATH_CREDENTIAL_HEALTH: Final = "/v1/credentials/health"
# The environment file (relative to the CLI user's home) a key sign-in writes and the shell profile sources.
CLI_ENV_FILE: Final = ".config/remotecli/cli-env.sh"
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


class _Request(BaseModel):
    """What the host builds and sends: a misspelt field is an error, not silently dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid")


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


# -- the config disk (contract 0001) -------------------------------------------------------------

CONFIG_DISK_FILE: Final = "config.img"  # in the VM directory, mode 0600 (it holds the agent secret)
CONFIG_DISK_DEVICE: Final = "/dev/vdb"  # where the guest finds it (second virtio disk)
CONFIG_DISK_SIZE: Final = 64 * 1024


class ConfigDisk(_Request):
    """The config disk's JSON document: what a guest learns about itself at boot.

    The guest reads it in ``agent/guest/config.py`` (``REQUIRED_KEYS`` are the required fields
    here). Holds the agent secret: never log it (it is left out of ``repr``).
    """

    vm_id: str
    vm_type: str
    agent_secret: str = Field(repr=False)
    agent_port: int
    hostname: str
    cli_user: str
    # Firecracker only: the host reaches the agent over vsock on this port (ADR 0004); agents
    # that do not know the key ignore it, and it is left out of the document when None.
    agent_vsock_port: int | None = None
    # The user's home volume on CLI VMs (ADR 0011): /sbin/remotecli-init finds the disk by serial
    # (else takes ``home_device``), runs e2fsck -p and mounts it at ``home_path`` before the agent
    # starts. Left out of the document when None.
    home_volume_id: str | None = None
    home_serial: str | None = None
    home_device: str | None = None
    home_path: str | None = None

    def encode(self) -> bytes:
        """The disk image's bytes (see ``encode_config_disk``)."""
        return encode_config_disk(self.model_dump(mode="json", exclude_none=True))


def hostname_for(vm_id: str) -> str:
    """The guest's hostname for a VM id (a DNS label, at most 63 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", vm_id.lower()).strip("-")[:63].strip("-")
    return name or "remotecli"


def encode_config_disk(document: Mapping[str, JsonValue]) -> bytes:
    """Compact UTF-8 JSON, one NUL, then NUL padding to exactly ``CONFIG_DISK_SIZE`` bytes."""
    data = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\x00"
    if len(data) > CONFIG_DISK_SIZE:
        raise DriverError("The VM's config document is larger than the 64 KiB config disk.")
    return data.ljust(CONFIG_DISK_SIZE, b"\x00")


# -- OAuth flows of Browser VMs (0002 "OAuth agent"; guest side: agent/guest/oauth.py) -----------


class OAuthFlowStatus(enum.StrEnum):
    """Where a flow is. ``completed``, ``denied`` and ``failed`` are final (``OAUTH_TERMINAL``)."""

    STARTING = "starting"  # listener up, browser being launched
    PAGE_LOADING = "page_loading"  # browser started, the provider's page not shown yet
    AWAITING_USER = "awaiting_user"  # the provider's sign-in page is on the screen
    EXCHANGING = "exchanging"  # the callback came; the code is being exchanged for tokens
    COMPLETED = "completed"  # ``result`` holds the token response
    DENIED = "denied"  # the user declined at the provider (error_code ``access_denied``)
    FAILED = "failed"  # error_code: browser_failed, oauth_error, token_exchange_failed, expired

    @property
    def terminal(self) -> bool:
        return self in OAUTH_TERMINAL


OAUTH_TERMINAL: Final = frozenset({OAuthFlowStatus.COMPLETED, OAuthFlowStatus.DENIED, OAuthFlowStatus.FAILED})


class OAuthRedirect(_Request):
    """The loopback redirect the guest listens on (port 0: any free port)."""

    host: str = "127.0.0.1"  # "localhost" or "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    path: str = "/callback"


class OAuthBrowser(_Request):
    """How the guest runs the browser for the flow."""

    display: str = ":0"
    user: str | None = "browser"  # None: the agent's own user
    executable: str = "chromium"
    extra_args: tuple[str, ...] = ()
    app: bool = True


class OAuthFlowSpec(_Request):
    """``POST /v1/oauth/flows`` body: one authorization-code flow (PKCE, loopback redirect).

    Defaults are the guest's. Only the fields that were set are sent (``to_wire``), so the body
    is what the caller built. Holds the client secret when the provider has one: never log it.
    """

    flow_id: str  # [A-Za-z0-9._-]{1,128}
    authorize_url: str
    token_url: str
    client_id: str
    client_secret: str | None = Field(default=None, repr=False)
    scopes: tuple[str, ...] = ()
    redirect: OAuthRedirect = OAuthRedirect()
    pkce: bool = True
    extra_authorize_params: dict[str, str] = Field(default_factory=dict)
    token_request_style: Literal["form", "json"] = "form"
    browser: OAuthBrowser = OAuthBrowser()
    expires_in_s: float = Field(default=1800.0, ge=1, le=24 * 3600)
    page_load_timeout_s: float = Field(default=120.0, ge=1, le=3600)

    def with_browser(self, **changes: str | bool | tuple[str, ...] | None) -> OAuthFlowSpec:
        """A copy whose ``browser`` has ``changes`` (e.g. ``user=...``, ``display=...``)."""
        browser = OAuthBrowser.model_validate({**self.browser.model_dump(exclude_unset=True), **changes})
        return self.model_copy(update={"browser": browser})

    def to_wire(self) -> dict[str, JsonValue]:
        """The JSON body: the fields that were set, nested models as objects."""
        return self.model_dump(mode="json", exclude_unset=True)


class OAuthTokenResponse(BaseModel):
    """The provider's token endpoint answer as the guest got it, plus ``obtained_at`` (epoch
    seconds, the guest's clock). Every other field the provider sent is kept as it came
    (``as_dict``). A secret: never log it (``OAuthFlowState`` leaves it out of ``repr``)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    access_token: str
    obtained_at: float | None = None

    def as_dict(self) -> dict[str, JsonValue]:
        """The token response as the provider sent it (with ``obtained_at``)."""
        return self.model_dump(mode="json", exclude_unset=True)


class OAuthFlowState(_Model):
    """``POST /v1/oauth/flows`` answer (``flow_id``, ``redirect_uri``, ``status``) and
    ``GET /v1/oauth/flows/{id}`` answer (all fields; ``result`` only once ``completed``)."""

    flow_id: str
    status: OAuthFlowStatus
    redirect_uri: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    page_url: str | None = None  # scheme://host/path of the page shown; never a query
    page_title: str | None = None
    refused_callbacks: int = 0
    result: OAuthTokenResponse | None = Field(default=None, repr=False)


# -- credential health (guest side: agent/guest/credhealth.py) ------------------------------------


class CredentialState(enum.StrEnum):
    """What a CLI's credential files in the guest say now."""

    SIGNED_IN = "signed_in"  # a key, or an access token that has not expired
    EXPIRED_REFRESHABLE = "expired_refreshable"  # the access token expired; a refresh token is there
    EXPIRED = "expired"  # the access token expired and there is no refresh token
    SIGNED_OUT = "signed_out"  # no file, or the CLI cleared its tokens
    UNREADABLE = "unreadable"  # a file is there but not one the CLI wrote (not JSON, a symlink, ...)


class CliCredentialHealth(_Model):
    """One provider's credential state as the guest read it. Metadata only: no token is ever here.

    ``access_expires_at`` and ``refreshed_at`` are epoch seconds (the guest's clock);
    ``refreshed_at`` is when the tokens were obtained (Codex's ``last_refresh``) or the file last
    written (its mtime); ``source`` is the file read, relative to the home."""

    provider: str
    state: CredentialState
    method: Literal["oauth", "oauth_token", "api_key"] | None = None
    account: str | None = None
    access_expires_at: float | None = None
    refreshed_at: float | None = None
    has_refresh_token: bool = False
    source: str | None = None
    detail: str | None = None


class CredentialHealthReport(_Model):
    """``GET /v1/credentials/health`` answer."""

    user: str
    home: str
    checked_at: float
    providers: list[CliCredentialHealth]


# -- the seam services use ------------------------------------------------------------------------


class GuestPty(Protocol):
    """An interactive terminal in the guest (``AgentClient.open_pty`` returns a ``PtyStream``).

    ``read`` returns ``PtyData`` chunks, then one ``PtyExit`` when the shell ends, then None.
    """

    async def read(self) -> PtyEvent | None: ...

    async def write(self, data: bytes) -> None: ...

    async def resize(self, cols: int, rows: int) -> None: ...

    async def close(self) -> None: ...


class GuestAgent(Protocol):
    """Every call services, routes and background loops make on a VM's guest agent.

    ``AppContext.agent(vm)`` returns one (through ``VmDriver.agent_client``). Failures are
    ``remotecli.errors.AgentError``s: ``AgentUnreachable``, ``AgentTimeout``, ``AgentRejected``,
    ``agent.client.AgentCallError`` (and its ``AgentFileNotFound``, ``AgentPortUnreachable``).
    """

    def health(self, *, timeout: float | None = None) -> AgentHealth: ...

    def wait_ready(self, deadline_s: float, poll_interval: float = ...) -> AgentHealth: ...

    def exec(
        self,
        argv: list[str],
        *,
        timeout_s: float,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult: ...

    def write_file(
        self, path: str, data: bytes, *, mode: int, owner: str | None = None, dir_mode: int | None = None
    ) -> FileInfo: ...

    def read_file(self, path: str) -> FileContent: ...

    def shutdown(self, action: str = "poweroff") -> None: ...

    def oauth_warm(self, browser: OAuthBrowser, timeout_s: float = 90.0) -> None: ...

    def credential_health(self, user: str | None = None) -> CredentialHealthReport: ...

    def oauth_start(self, spec: OAuthFlowSpec) -> OAuthFlowState: ...

    def oauth_status(self, flow_id: str) -> OAuthFlowState: ...

    def oauth_cancel(self, flow_id: str) -> None: ...

    async def open_pty(self, user: str, cols: int, rows: int, cmd: str | None = None) -> GuestPty: ...

    async def open_tcp(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...
