"""Provider profiles: how to sign in to each CLI's provider (configuration, read once per context).

Profiles are data (``provider_profiles.toml`` beside this module): endpoints, client id, scopes,
the loopback redirect form, PKCE, extra authorize parameters, the token request style and the name
of a credential format (one of ``CREDENTIAL_FILES``; the formats themselves, the CLIs' own file
shapes, are code in ``services/providers.py``).

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

This module sits beside ``config.py`` (below ``services/``) because a profile is configuration:
``AppContext`` builds the registry, and services, routes and the image checks read it.
"""

from __future__ import annotations

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
from remotecli.errors import InvalidInput

__all__ = ["CREDENTIAL_FILES", "ProviderConfigError", "ProviderProfile", "ProviderRegistry", "load_profiles"]

#: The credential formats a profile may name, and the files (relative to the CLI user's home) each
#: writes; ``services.providers.CREDENTIAL_FORMATS`` renders them (a unit test keeps the two in step).
CREDENTIAL_FILES: dict[str, tuple[str, ...]] = {
    "claude_code": (".claude/.credentials.json", ".claude.json"),
    "codex": (".codex/auth.json",),
    "gemini": (".gemini/oauth_creds.json", ".gemini/settings.json"),
}

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
        return list(CREDENTIAL_FILES[self.credential_format])

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
    text = resources.files("remotecli").joinpath(PROFILES_RESOURCE).read_text("utf-8")
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
    if table["credential_format"] not in CREDENTIAL_FILES:
        raise fail(f"credential_format must be one of {sorted(CREDENTIAL_FILES)}")
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
