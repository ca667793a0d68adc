"""A sign-in session as users see it, through the REST API and the dashboard alike (no secrets).

This is the one shape both front doors show, so it lives below them: ``api`` re-exports the models
for its schema, the dashboard's sign-in page polls the same fields. Credentials never appear: only
``credential_meta`` (account, expiry, scopes).
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, Field

from remotecli.context import AppContext
from remotecli.db.models import AuthSession


class CredentialMetaOut(BaseModel):
    """What the dashboard may know about delivered credentials: never a token."""

    account: str | None = None
    expires_at: str | None = None
    scopes: list[str] = Field(default_factory=list)


class AuthSessionOut(BaseModel):
    id: str
    provider: str
    provider_name: str
    status: str
    message: str | None
    error_code: str | None
    error_message: str | None
    cli_vm_id: str | None
    vnc_url: str | None = Field(description="Websocket URL of the login screen (only while awaiting the user, "
                                            "and only when asked for with ?vnc=1)")
    credential: CredentialMetaOut | None
    created_at: dt.datetime
    updated_at: dt.datetime
    expires_at: dt.datetime | None

    @classmethod
    def of(cls, auth: AuthSession, provider_name: str, vnc_url: str | None) -> AuthSessionOut:
        meta = auth.credential_meta or None
        credential = None
        if meta:
            scopes = meta.get("scopes") or []
            credential = CredentialMetaOut(
                account=meta.get("account"),
                expires_at=str(meta["expires_at"]) if meta.get("expires_at") is not None else None,
                scopes=[str(s) for s in (scopes.split() if isinstance(scopes, str) else scopes)],
            )
        return cls(
            id=auth.id,
            provider=auth.provider,
            provider_name=provider_name,
            status=auth.status,
            message=auth.message,
            error_code=auth.error_code,
            error_message=auth.error_message,
            cli_vm_id=auth.cli_vm_id,
            vnc_url=vnc_url,
            credential=credential,
            created_at=auth.created_at,
            updated_at=auth.updated_at,
            expires_at=auth.expires_at,
        )


def session_out(ctx: AppContext, auth: AuthSession, vnc_url: str | None = None) -> AuthSessionOut:
    """``auth`` as users see it, with its provider's display name."""
    return AuthSessionOut.of(auth, ctx.providers.display_name(auth.provider), vnc_url)
