"""/api/v1/credentials: credential health read from the CLI VM now, and key sign-in (thin routes over
``services.credential_health`` and ``services.key_signin``). Metadata only: no token or key is ever
in an answer."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, ConfigDict, Field

from remotecli.api.deps import Ctx, CurrentPrincipal
from remotecli.api.schemas import ErrorOut
from remotecli.services import credential_health, key_signin

router = APIRouter(prefix="/api/v1/credentials", tags=["credentials"])

ERRORS: dict[int | str, dict[str, object]] = {code: {"model": ErrorOut} for code in (400, 401, 422, 429, 502, 503, 504)}


class ProviderHealthOut(BaseModel):
    provider: str
    display_name: str
    state: str = Field(description="signed_in, expired_refreshable, expired, signed_out, unreadable, "
                                   "workspace_stopped, no_workspace or unknown")
    words: str
    method: str | None = Field(None, description="oauth, oauth_token (claude setup-token) or api_key")
    account: str | None = None
    access_expires_at: dt.datetime | None = None
    refreshed_at: dt.datetime | None = Field(None, description="when the tokens were obtained or the file "
                                                               "last written")
    has_refresh_token: bool = False
    detail: str | None = None
    reauthenticate: bool = Field(description="true when the user must sign in again")


class CredentialHealthOut(BaseModel):
    workspace: str = Field(description="running, stopped, starting, none or unreachable")
    vm_id: str | None
    checked_at: dt.datetime | None = Field(description="when the workspace read the files (null: not read)")
    message: str
    providers: list[ProviderHealthOut]


class KeySignInIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(max_length=64, description="claude_code, codex or gemini")
    kind: str = Field(max_length=32, description="api_key, or oauth_token for a Claude 'claude setup-token' token")
    key: str = Field(repr=False, description="the key as the provider shows it (validated by shape: 422 malformed_key)")


class KeySignInOut(BaseModel):
    provider: str
    kind: str
    vm_id: str
    state: str
    method: str | None
    written: list[str]


@router.get("", response_model=CredentialHealthOut, responses=ERRORS)
def get_credentials(ctx: Ctx, principal: CurrentPrincipal,
                    refresh: Annotated[bool, Query(description="start (or create) the workspace to read "
                                                               "it when it is stopped")] = False,
                    ) -> CredentialHealthOut:
    """Each provider's sign-in as the CLI VM's files say now (metadata only). A stopped workspace is
    not started unless ``?refresh=1``."""
    health = credential_health.read_health(ctx, principal, refresh=refresh)
    return CredentialHealthOut(
        workspace=health.workspace, vm_id=health.vm_id, checked_at=health.checked_at, message=health.message,
        providers=[ProviderHealthOut(
            provider=p.provider, display_name=p.display_name, state=p.state, words=p.words, method=p.method,
            account=p.account, access_expires_at=p.access_expires_at, refreshed_at=p.refreshed_at,
            has_refresh_token=p.has_refresh_token, detail=p.detail, reauthenticate=p.reauthenticate,
        ) for p in health.providers],
    )


@router.post("/keys", response_model=KeySignInOut, status_code=status.HTTP_201_CREATED, responses=ERRORS)
def post_key(body: KeySignInIn, ctx: Ctx, principal: CurrentPrincipal) -> KeySignInOut:
    """Sign a CLI in with a pasted key: validated by shape (422 ``unknown_provider``,
    ``unknown_key_kind``, ``malformed_key``, ``key_provider_mismatch``), then written into the CLI VM
    the way the CLI takes it and read back. The key is never stored, logged or returned."""
    done = key_signin.sign_in_with_key(ctx, principal, body.provider, body.kind, body.key)
    return KeySignInOut(provider=done.provider, kind=done.kind, vm_id=done.vm_id, state=done.state,
                        method=done.method, written=done.written)
