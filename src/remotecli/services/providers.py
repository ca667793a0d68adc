"""Credential formats: how to write each CLI's credential files from a provider's token response.

The profiles themselves (endpoints, client id, scopes, ...) are configuration, loaded once per
context by ``remotecli.profiles`` (``AppContext.providers``); a profile names one of the formats
here (``credential_format``). Each format renders the files the real CLI reads, in the CLI's own
shape (checked against the pinned CLIs, ``docs/decisions/0010``).

Client secrets never appear in ``repr``/``str`` of a profile, in exceptions or in metadata, and the
rendered credential files' contents are not in their ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from remotecli.errors import RemotecliError
from remotecli.profiles import CREDENTIAL_FILES, ProviderProfile

__all__ = [
    "CREDENTIAL_FORMATS",
    "CredentialFile",
    "InvalidTokenResponse",
    "RenderedCredentials",
    "decode_jwt_claims",
    "merge_json_file",
    "render_credentials",
]


class InvalidTokenResponse(RemotecliError):
    """The provider's token response cannot be turned into credential files."""

    code = "token_response_invalid"
    http_status = 502
    default_message = "The provider's sign-in answer was incomplete; try signing in again."


# -- credentials --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CredentialFile:
    path: str  # relative to the CLI user's home, e.g. ".codex/auth.json"
    content: bytes = field(repr=False)
    mode: int = 0o600
    # A JSON object merged into the file the CLI already has (its own settings, projects, history
    # live there too) instead of replacing it: our top-level keys win, the others stay.
    merge_json: bool = False
    # With merge_json: merge nested objects too (our leaves win, the user's other nested keys stay),
    # for settings files such as ~/.gemini/settings.json.
    deep_merge: bool = False

    def __repr__(self) -> str:
        return f"CredentialFile(path={self.path!r}, size={len(self.content)}, mode={oct(self.mode)})"


@dataclass(frozen=True, slots=True)
class RenderedCredentials:
    files: list[CredentialFile]
    metadata: dict[str, Any]  # {provider, account, expires_at (ISO 8601 or None), scopes}; no secrets


def decode_jwt_claims(token: Any) -> dict[str, Any]:
    """The payload of a JWT, **without checking its signature**; ``{}`` if it is not a JWT.

    Only for display metadata (account email, account id): the id_token came straight from the
    provider's token endpoint over the back channel, and nothing is authorized on its strength.
    """
    if not isinstance(token, str) or token.count(".") != 2:
        return {}
    payload = token.split(".")[1]
    try:
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def render_credentials(
    profile: ProviderProfile, token_response: dict[str, Any], now: dt.datetime | float
) -> RenderedCredentials:
    """The credential file(s) the profile's CLI reads, from the token endpoint's JSON answer.

    Expiry times count from ``token_response["obtained_at"]`` (epoch seconds, recorded by the OAuth
    agent when the token endpoint answered); ``now`` is used only when it is absent.
    """
    if not isinstance(token_response, dict):
        raise InvalidTokenResponse(log_detail=f"{profile.name}: token response is not an object")
    access = token_response.get("access_token")
    if not isinstance(access, str) or not access:
        raise InvalidTokenResponse(log_detail=f"{profile.name}: token response has no access_token")
    for key in ("refresh_token", "id_token", "scope", "token_type"):
        value = token_response.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidTokenResponse(log_detail=f"{profile.name}: {key} is not a string")
    obtained_at = token_response.get("obtained_at")
    if isinstance(obtained_at, int | float) and not isinstance(obtained_at, bool) and obtained_at > 0:
        moment = _as_datetime(float(obtained_at))
    else:
        moment = _as_datetime(now)
    expires_in = token_response.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)
    expires_at = (
        moment + dt.timedelta(seconds=expires_in)
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0
        else None
    )
    scope = token_response.get("scope")
    scopes = scope.split() if isinstance(scope, str) and scope.strip() else list(profile.scopes)
    claims = decode_jwt_claims(token_response.get("id_token"))
    renderer = CREDENTIAL_FORMATS[profile.credential_format]
    files, account = renderer.render(_Context(token_response, claims, moment, expires_at, scopes))
    metadata = {
        "provider": profile.name,
        "account": account,
        "expires_at": _rfc3339(expires_at) if expires_at else None,
        "scopes": scopes,
    }
    return RenderedCredentials(files=files, metadata=metadata)


@dataclass(frozen=True, slots=True)
class _Context:
    response: dict[str, Any] = field(repr=False)
    claims: dict[str, Any] = field(repr=False)
    now: dt.datetime
    expires_at: dt.datetime | None
    scopes: list[str]

    def str_or_none(self, key: str) -> str | None:
        value = self.response.get(key)
        return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class _Format:
    paths: tuple[str, ...]
    render: Callable[[_Context], tuple[list[CredentialFile], str | None]]


def _as_datetime(now: dt.datetime | float) -> dt.datetime:
    if isinstance(now, dt.datetime):
        return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)
    return dt.datetime.fromtimestamp(float(now), dt.UTC)


def _ms(moment: dt.datetime | None) -> int | None:
    return int(moment.timestamp() * 1000) if moment is not None else None


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _json_file(path: str, doc: dict[str, Any], *, merge: bool = False, deep: bool = False) -> CredentialFile:
    content = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    return CredentialFile(path=path, content=content, mode=0o600, merge_json=merge or deep, deep_merge=deep)


def merge_json_file(existing: bytes | None, update: bytes, *, deep: bool = False) -> bytes:
    """``update`` (a JSON object) laid over ``existing``: top-level keys of ``update`` replace those
    of ``existing``, the rest of ``existing`` stays. With ``deep``, where both hold an object under
    the same key the objects are merged the same way, at every depth (so ``{"security": {"auth":
    {"selectedType": ...}}}`` keeps the user's other ``security`` and ``security.auth`` keys). A
    missing, unreadable or non-object ``existing`` yields ``update`` unchanged."""
    new = json.loads(update)
    try:
        old = json.loads(existing) if existing else None
    except (ValueError, UnicodeDecodeError):
        old = None
    if not isinstance(old, dict) or not isinstance(new, dict):
        return update
    merged = _deep_merge(old, new) if deep else {**old, **new}
    return (json.dumps(merged, indent=2) + "\n").encode("utf-8")


def _deep_merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    merged = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _email(ctx: _Context) -> str | None:
    account = ctx.response.get("account")
    if isinstance(account, dict) and isinstance(account.get("email_address"), str):
        return str(account["email_address"])  # Anthropic's token response
    email = ctx.claims.get("email")
    return email if isinstance(email, str) and email else None


# How Claude Code turns its profile's ``organization.organization_type`` into ``subscriptionType``.
_CLAUDE_SUBSCRIPTIONS = {"claude_max": "max", "claude_pro": "pro", "claude_enterprise": "enterprise",
                         "claude_team": "team"}


def _render_claude(ctx: _Context) -> tuple[list[CredentialFile], str | None]:
    """``~/.claude/.credentials.json`` as Claude Code writes it after its own sign-in, and the
    account state it keeps in ``~/.claude.json``: ``oauthAccount`` from the token response's
    ``account`` and ``organization`` objects, as Claude Code records them when it has no profile
    yet (its later profile fetch adds display name, billing type and the like).

    ``subscriptionType`` and ``rateLimitTier`` come from the organization's ``organization_type`` /
    ``rate_limit_tier`` when the token response carries them; Anthropic's answer normally does not
    (Claude Code reads them from its profile endpoint), so they stay null until Claude Code's first
    profile fetch, and ``claude auth status --text`` says "Claude API account" until then.
    """
    organization = ctx.response.get("organization")
    organization = organization if isinstance(organization, dict) else {}
    subscription = ctx.response.get("subscriptionType", ctx.response.get("subscription_type"))
    if not isinstance(subscription, str):
        subscription = _CLAUDE_SUBSCRIPTIONS.get(str(organization.get("organization_type")))
    tier = organization.get("rate_limit_tier")
    credentials = {
        "claudeAiOauth": {
            "accessToken": ctx.response["access_token"],
            "refreshToken": ctx.str_or_none("refresh_token"),
            "expiresAt": _ms(ctx.expires_at),
            "scopes": ctx.scopes,
            "subscriptionType": subscription,
            "rateLimitTier": tier if isinstance(tier, str) and tier else None,
        }
    }
    files = [_json_file(".claude/.credentials.json", credentials)]
    email = _email(ctx)
    if email:
        oauth_account: dict[str, Any] = {"emailAddress": email}
        account = ctx.response.get("account")
        if isinstance(account, dict) and isinstance(account.get("uuid"), str):
            oauth_account["accountUuid"] = account["uuid"]
        if isinstance(organization.get("uuid"), str):
            oauth_account["organizationUuid"] = organization["uuid"]
        if isinstance(organization.get("name"), str) and organization["name"]:
            oauth_account["organizationName"] = organization["name"]
        files.append(_json_file(".claude.json", {"hasCompletedOnboarding": True, "oauthAccount": oauth_account},
                                merge=True))
    return files, email


def _render_codex(ctx: _Context) -> tuple[list[CredentialFile], str | None]:
    auth = ctx.claims.get("https://api.openai.com/auth")
    account_id = auth.get("chatgpt_account_id") if isinstance(auth, dict) else None
    if not isinstance(account_id, str) or not account_id:
        sub = ctx.claims.get("sub")
        account_id = sub if isinstance(sub, str) and sub else None
    doc = {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": ctx.str_or_none("id_token"),
            "access_token": ctx.response["access_token"],
            "refresh_token": ctx.str_or_none("refresh_token"),
            "account_id": account_id,
        },
        "last_refresh": _rfc3339(ctx.now),  # when the tokens were obtained (Codex refreshes by its age)
    }
    return [_json_file(".codex/auth.json", doc)], _email(ctx)


# Without an auth type in its settings the Gemini CLI ignores oauth_creds.json and says "Please set
# an Auth method" (exit code 41); "oauth-personal" is what its own Google sign-in records.
GEMINI_AUTH_SETTINGS = {"security": {"auth": {"selectedType": "oauth-personal"}}}


def _render_gemini(ctx: _Context) -> tuple[list[CredentialFile], str | None]:
    doc = {
        "access_token": ctx.response["access_token"],
        "refresh_token": ctx.str_or_none("refresh_token"),
        "scope": " ".join(ctx.scopes),
        "token_type": ctx.str_or_none("token_type") or "Bearer",
        "id_token": ctx.str_or_none("id_token"),
        "expiry_date": _ms(ctx.expires_at),
    }
    files = [
        _json_file(".gemini/oauth_creds.json", doc),
        _json_file(".gemini/settings.json", GEMINI_AUTH_SETTINGS, deep=True),  # the user's other settings stay
    ]
    return files, _email(ctx)


CREDENTIAL_FORMATS: dict[str, _Format] = {
    "claude_code": _Format(paths=CREDENTIAL_FILES["claude_code"], render=_render_claude),
    "codex": _Format(paths=CREDENTIAL_FILES["codex"], render=_render_codex),
    "gemini": _Format(paths=CREDENTIAL_FILES["gemini"], render=_render_gemini),
}
