"""Provider profiles: how to sign in to each CLI's provider and how to write its credential files.

Profiles are data (``provider_profiles.toml`` beside this module): endpoints, client id, scopes,
the loopback redirect form, PKCE, extra authorize parameters, the token request style and the name
of a credential format. Only the three credential formats (the CLIs' own file shapes) are code.

Overrides, later ones winning:

1. the built-in ``provider_profiles.toml``;
2. the config file (``$REMOTECLI_CONFIG_FILE``, default ``<data_dir>/config.toml``): a table
   ``[providers.<name>]`` with any profile field; a name that is not built in defines a new
   profile (it then needs every field, ``credential_format`` one of ``claude_code``, ``codex``,
   ``gemini``)::

       [providers.codex]
       token_url = "http://127.0.0.1:9000/token"

       [providers.my_gemini_proxy]
       display_name = "Gemini (company IdP)"
       authorize_url = "https://idp.example/authorize"
       token_url = "https://idp.example/token"
       client_id = "gemini-cli"
       scopes = ["openid", "email"]
       redirect_uri = "http://127.0.0.1:{port}/oauth2callback"
       credential_format = "gemini"

3. environment variables ``REMOTECLI_PROVIDER_<NAME>_AUTHORIZE_URL``, ``..._TOKEN_URL``,
   ``..._CLIENT_ID``, ``..._CLIENT_SECRET``, ``..._SCOPES`` (space- or comma-separated) and
   ``..._REDIRECT_URI``, with ``<NAME>`` the profile name in upper case (``CLAUDE_CODE``). This is
   how tests point a profile at a local identity provider.

Client secrets never appear in ``repr``/``str`` of a profile, in exceptions or in metadata, and the
rendered credential files' contents are not in their ``repr``.

A controller reads the profiles once, through ``ProviderRegistry`` (``AppContext.providers``).

Why this module is over 400 lines: it is two halves of one contract, kept together on purpose —
loading and validating profiles (a profile names its ``credential_format``) and the three
credential formats that name checks against. Splitting them would put each format's name and its
file shapes in two places.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
import re
import threading
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from remotecli.agent.protocol import OAuthBrowser, OAuthFlowSpec, OAuthRedirect
from remotecli.config import Settings
from remotecli.errors import InvalidInput, RemotecliError

__all__ = [
    "CREDENTIAL_FORMATS",
    "CredentialFile",
    "InvalidTokenResponse",
    "ProviderConfigError",
    "ProviderProfile",
    "ProviderRegistry",
    "RenderedCredentials",
    "decode_jwt_claims",
    "load_profiles",
    "render_credentials",
]

PROFILES_RESOURCE = "provider_profiles.toml"
ENV_PREFIX = "REMOTECLI_PROVIDER_"
ENV_FIELDS = {
    "AUTHORIZE_URL": "authorize_url",
    "TOKEN_URL": "token_url",
    "CLIENT_ID": "client_id",
    "CLIENT_SECRET": "client_secret",
    "SCOPES": "scopes",
    "REDIRECT_URI": "redirect_uri",
}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_FIELDS = frozenset(
    {
        "display_name",
        "authorize_url",
        "token_url",
        "client_id",
        "client_secret",
        "scopes",
        "redirect_uri",
        "pkce",
        "extra_authorize_params",
        "token_request_style",
        "credential_format",
    }
)
_REQUIRED = ("display_name", "authorize_url", "token_url", "client_id", "redirect_uri", "credential_format")

TokenRequestStyle = Literal["form", "json"]


class ProviderConfigError(InvalidInput):
    """A provider profile (built-in, config file or environment) is not valid. Names no values."""

    code = "provider_config_invalid"
    default_message = "A sign-in provider is configured wrongly; the operator can see which in the log."


class InvalidTokenResponse(RemotecliError):
    """The provider's token response cannot be turned into credential files."""

    code = "token_response_invalid"
    http_status = 502
    default_message = "The provider's sign-in answer was incomplete; try signing in again."


# -- profiles ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderProfile:
    name: str
    display_name: str
    authorize_url: str
    token_url: str
    client_id: str
    client_secret: str | None = field(repr=False)
    scopes: tuple[str, ...]
    redirect_host: str  # "localhost" or "127.0.0.1"
    redirect_port: int  # 0: any free port in the Browser VM
    redirect_path: str
    pkce: bool
    extra_authorize_params: tuple[tuple[str, str], ...]
    token_request_style: TokenRequestStyle
    credential_format: str

    def __repr__(self) -> str:
        return (
            f"ProviderProfile(name={self.name!r}, authorize_url={self.authorize_url!r}, "
            f"token_url={self.token_url!r}, client_id={self.client_id!r}, "
            f"client_secret={'<set>' if self.client_secret else None}, redirect_uri={self.redirect_uri!r})"
        )

    __str__ = __repr__

    @property
    def redirect_uri(self) -> str:
        """The redirect form, ``{port}`` standing for a port chosen in the Browser VM."""
        port = "{port}" if self.redirect_port == 0 else str(self.redirect_port)
        return f"http://{self.redirect_host}:{port}{self.redirect_path}"

    @property
    def credential_paths(self) -> list[str]:
        """Files (relative to the CLI user's home) this profile writes; ``~/.claude.json`` only with an email."""
        return list(CREDENTIAL_FORMATS[self.credential_format].paths)

    def oauth_spec(self, flow_id: str) -> OAuthFlowSpec:
        """The request of ``GuestAgent.oauth_start`` (``POST /v1/oauth/flows``) for this provider.

        ``browser.user`` is left to the caller (the controller's ``browser_guest_user``, through
        ``with_browser``). The spec carries the client secret when the profile has one: do not log it.
        """
        return OAuthFlowSpec(
            flow_id=flow_id,
            authorize_url=self.authorize_url,
            token_url=self.token_url,
            client_id=self.client_id,
            client_secret=self.client_secret or None,
            scopes=self.scopes,
            redirect=OAuthRedirect(host=self.redirect_host, port=self.redirect_port, path=self.redirect_path),
            pkce=self.pkce,
            extra_authorize_params=dict(self.extra_authorize_params),
            token_request_style=self.token_request_style,
            browser=OAuthBrowser(display=":0", executable="chromium", extra_args=()),
        )


def load_profiles(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, ProviderProfile]:
    """Built-in profiles, then ``[providers.<name>]`` of the config file, then the environment."""
    env = os.environ if environ is None else environ
    raw: dict[str, dict[str, Any]] = {name: dict(table) for name, table in _builtin_tables().items()}
    for name, table in _config_file_tables(settings, env).items():
        raw.setdefault(name, {}).update(table)
    for name in list(raw):
        raw[name].update(_env_overrides(name, env))
    return {name: _build(name, table) for name, table in sorted(raw.items())}


class ProviderRegistry(Mapping[str, ProviderProfile]):
    """The provider profiles of one controller (``AppContext.providers``): loaded once, on first
    use, by ``load_profiles`` from the built-in file, the config file and the environment.

    A configuration error (``ProviderConfigError``) is raised where a profile is first needed
    (e.g. starting a sign-in), and again on each later use until the configuration is fixed and
    ``reload`` is called; a good load is kept for the context's life.
    """

    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None) -> None:
        self._settings = settings
        self._environ = environ
        self._lock = threading.Lock()
        self._profiles: dict[str, ProviderProfile] | None = None

    def _loaded(self) -> dict[str, ProviderProfile]:
        profiles = self._profiles
        if profiles is None:
            with self._lock:
                if self._profiles is None:
                    self._profiles = load_profiles(self._settings, self._environ)
                profiles = self._profiles
        return profiles

    def reload(self) -> None:
        """Read the profiles again at next use (after the config file or the environment changed)."""
        with self._lock:
            self._profiles = None

    def display_name(self, name: str) -> str:
        """The provider's name for people (``name`` itself when no profile has it any more)."""
        profile = self._loaded().get(name)
        return profile.display_name if profile is not None else name

    def __getitem__(self, name: str) -> ProviderProfile:
        return self._loaded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    def __repr__(self) -> str:
        return f"ProviderRegistry({sorted(self._profiles) if self._profiles is not None else 'not loaded'})"


def _builtin_tables() -> dict[str, dict[str, Any]]:
    text = resources.files("remotecli.services").joinpath(PROFILES_RESOURCE).read_text("utf-8")
    return _tables(tomllib.loads(text), "built-in profiles")


def _config_file_tables(settings: Settings, env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    path = Path(env["REMOTECLI_CONFIG_FILE"]) if env.get("REMOTECLI_CONFIG_FILE") else settings.data_dir / "config.toml"
    if not path.is_file():
        return {}
    try:
        with path.open("rb") as handle:
            doc = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProviderConfigError(log_detail=f"cannot read {path}: {type(exc).__name__}") from None
    providers = doc.get("providers", {})
    if not isinstance(providers, dict):
        raise ProviderConfigError(log_detail=f"{path}: [providers] must be a table")
    return _tables(providers, str(path))


def _tables(doc: dict[str, Any], origin: str) -> dict[str, dict[str, Any]]:
    tables: dict[str, dict[str, Any]] = {}
    for name, table in doc.items():
        if not _NAME.match(name) or not isinstance(table, dict):
            raise ProviderConfigError(log_detail=f"{origin}: provider {name!r} must be a table named [a-z0-9_]")
        unknown = sorted(set(table) - _FIELDS)
        if unknown:
            raise ProviderConfigError(log_detail=f"{origin}: provider {name!r} has unknown fields {unknown}")
        tables[name] = dict(table)
    return tables


def _env_overrides(name: str, env: Mapping[str, str]) -> dict[str, Any]:
    prefix = f"{ENV_PREFIX}{name.upper()}_"
    found: dict[str, Any] = {}
    for suffix, key in ENV_FIELDS.items():
        value = env.get(prefix + suffix)
        if value is None:
            continue
        found[key] = [s for s in re.split(r"[\s,]+", value) if s] if key == "scopes" else value
    return found


def _build(name: str, table: dict[str, Any]) -> ProviderProfile:
    def fail(what: str) -> ProviderConfigError:
        return ProviderConfigError(log_detail=f"provider {name!r}: {what}")

    missing = [key for key in _REQUIRED if not table.get(key)]
    if missing:
        raise fail(f"missing {missing}")
    strings = ("display_name", "authorize_url", "token_url", "client_id", "redirect_uri", "credential_format")
    for key in strings:
        if not isinstance(table[key], str):
            raise fail(f"{key} must be a string")
    for key in ("authorize_url", "token_url"):
        parts = urlsplit(table[key])
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise fail(f"{key} must be an http(s) URL")
    secret = table.get("client_secret") or None
    if secret is not None and not isinstance(secret, str):
        raise fail("client_secret must be a string")
    scopes = table.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) and s and " " not in s for s in scopes):
        raise fail("scopes must be a list of scope strings")
    host, port, path = _parse_redirect(table["redirect_uri"], fail)
    pkce = table.get("pkce", True)
    if not isinstance(pkce, bool):
        raise fail("pkce must be true or false")
    extra = table.get("extra_authorize_params", {})
    if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise fail("extra_authorize_params must map names to strings")
    style = table.get("token_request_style", "form")
    if style not in ("form", "json"):
        raise fail("token_request_style must be 'form' or 'json'")
    if table["credential_format"] not in CREDENTIAL_FORMATS:
        raise fail(f"credential_format must be one of {sorted(CREDENTIAL_FORMATS)}")
    return ProviderProfile(
        name=name,
        display_name=table["display_name"],
        authorize_url=table["authorize_url"],
        token_url=table["token_url"],
        client_id=table["client_id"],
        client_secret=secret,
        scopes=tuple(scopes),
        redirect_host=host,
        redirect_port=port,
        redirect_path=path,
        pkce=pkce,
        extra_authorize_params=tuple(sorted(extra.items())),
        token_request_style=style,
        credential_format=table["credential_format"],
    )


def _parse_redirect(value: str, fail: Callable[[str], ProviderConfigError]) -> tuple[str, int, str]:
    match = re.fullmatch(r"http://(localhost|127\.0\.0\.1):(\{port\}|\d{1,5})(/[^?#\s]*)", value)
    if match is None:
        raise fail("redirect_uri must be http://localhost|127.0.0.1:{port}|PORT/path (RFC 8252 loopback)")
    host, port_text, path = match.groups()
    port = 0 if port_text == "{port}" else int(port_text)
    if not 0 <= port <= 65535:
        raise fail("redirect_uri port out of range")
    return host, port, path


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
    "claude_code": _Format(paths=(".claude/.credentials.json", ".claude.json"), render=_render_claude),
    "codex": _Format(paths=(".codex/auth.json",), render=_render_codex),
    "gemini": _Format(paths=(".gemini/oauth_creds.json", ".gemini/settings.json"), render=_render_gemini),
}
