"""Request and response bodies of the REST API (no secrets in any response model)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from remotecli.domain.states import VM_STATUS_WORDS, VmStatus
from remotecli.images.cli_constants import CliConstants
from remotecli.profiles import ProviderProfile
from remotecli.services.auth_session_view import AuthSessionOut as AuthSessionOut  # shared with the dashboard
from remotecli.services.auth_session_view import CredentialMetaOut as CredentialMetaOut
from remotecli.services.provider_drift import ProviderDifference
from remotecli.services.vm_manager import VmView


class ErrorOut(BaseModel):
    code: str = Field(description="Stable machine-readable error code")
    message: str = Field(description="What happened and what to do, in words")


class VmCreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm_type: Literal["cli", "browser"] = Field(description="'cli' or 'browser'")
    # Absolute bounds; the operator's settings (max_vm_vcpus, max_vm_memory_mib) may cap lower (422).
    vcpus: int | None = Field(default=None, ge=1, le=64, description="Virtual CPUs (default per VM type)")
    memory_mib: int | None = Field(
        default=None, ge=128, le=262144, description="Guest memory in MiB (default per VM type)"
    )


class VmEnsureIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm_type: Literal["cli"] = "cli"


NoNul = Annotated[str, Field(pattern=r"^[^\x00]*$", max_length=65536)]
EnvName = Annotated[str, Field(pattern=r"^[^=\x00]+$", max_length=256)]
BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def _env_names_schema(schema: dict[str, Any]) -> None:
    """Pydantic renders constrained dict keys as ``patternProperties``, which lets any other key
    through; say it as JSON Schema means it: every name matches, every value is a string."""
    for option in schema["properties"]["env"].get("anyOf", []):
        if option.get("type") == "object":
            option.pop("patternProperties", None)
            option["propertyNames"] = {"pattern": r"^[^=\x00]+$", "maxLength": 256}
            option["additionalProperties"] = {"type": "string", "pattern": r"^[^\x00]*$", "maxLength": 65536}


class VmExecIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_env_names_schema)

    argv: list[NoNul] = Field(min_length=1, max_length=256, description="Program and arguments (no shell)")
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="Kill the command after this many seconds")
    user: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
                             description="Guest user to run as (default: the agent's, root)")
    cwd: str | None = Field(default=None, pattern=r"^/[^\x00]*$", max_length=4096,
                            description="Absolute working directory in the guest (default: the user's home)")
    env: dict[EnvName, NoNul] | None = Field(default=None, max_length=256, description="Extra environment variables")
    stdin_b64: str | None = Field(default=None, pattern=BASE64, max_length=1_000_000,
                                  description="Standard input, base64")


class VmExecOut(BaseModel):
    exit_code: int = Field(description="128+N when killed by signal N")
    stdout: str = Field(description="Standard output as UTF-8 (undecodable bytes replaced); exact bytes in stdout_b64")
    stderr: str
    stdout_b64: str
    stderr_b64: str
    timed_out: bool
    duration_s: float
    signal: int | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False


class VmOut(BaseModel):
    id: str
    user_id: str | None  # null: a Browser VM of the warm pool that no sign-in has claimed yet
    vm_type: str
    status: str
    status_words: str
    status_reason: str | None
    driver: str
    vcpus: int
    memory_mib: int
    generation: int
    created_at: dt.datetime
    updated_at: dt.datetime
    last_seen_at: dt.datetime | None
    expires_at: dt.datetime | None

    @classmethod
    def of(cls, view: VmView) -> VmOut:
        return cls(
            id=view.id,
            user_id=view.user_id,
            vm_type=view.vm_type,
            status=view.status,
            status_words=VM_STATUS_WORDS[VmStatus(view.status)],
            status_reason=view.status_reason,
            driver=view.driver,
            vcpus=view.vcpus,
            memory_mib=view.memory_mib,
            generation=view.generation,
            created_at=view.created_at,
            updated_at=view.updated_at,
            last_seen_at=view.last_seen_at,
            expires_at=view.expires_at,
        )


class VmListOut(BaseModel):
    items: list[VmOut]


class HealthOut(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class AuthSessionCreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(description="Provider profile name, e.g. 'claude_code', 'codex', 'gemini'")


class AuthSessionListOut(BaseModel):
    items: list[AuthSessionOut]


class EventOut(BaseModel):
    id: int
    at: dt.datetime
    module: str
    kind: str
    message: str
    vm_id: str | None
    session_id: str | None
    from_status: str | None
    to_status: str | None

    @classmethod
    def of(cls, event: object) -> EventOut:
        return cls(**{name: getattr(event, name) for name in cls.model_fields})


class EventListOut(BaseModel):
    items: list[EventOut]


class ProviderCliOut(BaseModel):
    """The OAuth constants the CLI in the cli image uses (read from its package by images build)."""

    package: str
    version: str | None
    authorize_url: str | None
    token_url: str | None
    client_id: str | None
    scopes: list[str]
    redirect_uri: str | None


class ProviderDifferenceOut(BaseModel):
    kind: str  # "drift" (profile and CLI disagree), "override" (the operator's setting), "unchecked"
    field: str
    message: str


class ProviderOut(BaseModel):
    name: str
    display_name: str
    credential_files: list[str]
    cli: ProviderCliOut | None = None
    differences: list[ProviderDifferenceOut] = []

    @classmethod
    def of(cls, name: str, profile: ProviderProfile, cli: CliConstants | None = None,
           differences: Sequence[ProviderDifference] = ()) -> ProviderOut:
        return cls(
            name=name, display_name=profile.display_name, credential_files=profile.credential_paths,
            cli=ProviderCliOut(package=cli.package, version=cli.version, authorize_url=cli.authorize_url,
                               token_url=cli.token_url, client_id=cli.client_id, scopes=list(cli.scopes),
                               redirect_uri=cli.redirect_uri) if cli else None,
            differences=[ProviderDifferenceOut(kind=d.kind, field=d.field, message=d.message)
                         for d in differences if d.provider == name],
        )


class ProviderListOut(BaseModel):
    items: list[ProviderOut]


class WorkspaceOut(BaseModel):
    """The caller's home volume (ADR 0011): it outlives every CLI VM."""

    id: str
    status: str = Field(description="creating, available, attached, failed, deleting, deleted")
    status_reason: str | None = Field(description="Why it is failed, in words")
    size_bytes: int = Field(description="The volume's size (a sparse file: only what is written takes space)")
    attached_vm_id: str | None = Field(description="The CLI VM it is attached to (at most one)")
    created_at: dt.datetime
    used_bytes: int | None = Field(description="Used by files, as the guest's filesystem says (null: no running VM)")
    total_bytes: int | None = Field(description="The filesystem's size as the guest sees it (else the volume's)")
    host_allocated_bytes: int | None = Field(description="What the volume file takes on the host")
