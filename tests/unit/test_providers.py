"""Provider profiles: built-ins, overrides, custom profiles, and the CLIs' credential file shapes."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from remotecli.config import Settings
from remotecli.profiles import CREDENTIAL_FILES, ProviderConfigError, ProviderProfile, load_profiles
from remotecli.services.providers import (
    CREDENTIAL_FORMATS,
    CredentialFile,
    InvalidTokenResponse,
    decode_jwt_claims,
    render_credentials,
)

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
NOW_MS = int(NOW.timestamp() * 1000)

ACCESS = "at-SECRET-access-0123456789"
REFRESH = "rt-SECRET-refresh-0123456789"
CLIENT_SECRET = "cs-SECRET-client-0123456789"


def _jwt(claims: dict[str, Any]) -> str:
    def part(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'kid': 'k'})}.{part(claims)}.c2lnbmF0dXJl"


ID_TOKEN = _jwt(
    {
        "sub": "user-123",
        "email": "alice@example.test",
        "https://api.openai.com/auth": {"chatgpt_account_id": "acct-42"},
    }
)


def _token_response(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "access_token": ACCESS,
        "refresh_token": REFRESH,
        "id_token": ID_TOKEN,
        "token_type": "Bearer",
        "expires_in": 3600,
        "scope": "openid email offline_access",
        "obtained_at": NOW.timestamp(),
    }
    doc.update(extra)
    return doc


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
def profiles(settings: Settings) -> dict[str, ProviderProfile]:
    return load_profiles(settings, environ={})


def _doc(file: CredentialFile) -> Any:
    return json.loads(file.content)


# --- built-in profiles -------------------------------------------------------------------------


def test_builtin_profiles(profiles: dict[str, ProviderProfile]) -> None:
    assert sorted(profiles) == ["claude_code", "codex", "gemini"]
    claude, codex, gemini = profiles["claude_code"], profiles["codex"], profiles["gemini"]
    assert claude.redirect_uri == "http://localhost:{port}/callback"
    assert codex.redirect_uri == "http://localhost:1455/auth/callback"
    assert gemini.redirect_uri == "http://127.0.0.1:{port}/oauth2callback"
    assert claude.token_request_style == "json"
    assert codex.token_request_style == "form"
    assert all(p.pkce for p in profiles.values())
    # The Gemini CLI's own installed-app secret (published in the CLI; Google's token endpoint
    # refuses the code exchange without it).
    assert gemini.client_secret is not None and gemini.client_secret.startswith("GOCSPX-")
    assert codex.display_name and claude.display_name and gemini.display_name
    assert claude.credential_paths == [".claude/.credentials.json", ".claude.json"]
    assert codex.credential_paths == [".codex/auth.json"]
    assert gemini.credential_paths == [".gemini/oauth_creds.json", ".gemini/settings.json"]


def test_builtin_profiles_say_what_the_pinned_clis_use(profiles: dict[str, ProviderProfile]) -> None:
    """The values issue 11 found wrong (the drift test checks all of them against the packages)."""
    claude, codex = profiles["claude_code"], profiles["codex"]
    assert claude.authorize_url == "https://claude.com/cai/oauth/authorize"
    assert claude.token_url == "https://platform.claude.com/v1/oauth/token"
    assert {"org:create_api_key", "user:profile", "user:inference", "user:sessions:claude_code",
            "user:mcp_servers", "user:file_upload"} <= set(claude.scopes)
    assert {"openid", "profile", "email", "offline_access", "api.connectors.read",
            "api.connectors.invoke"} == set(codex.scopes)
    assert dict(codex.extra_authorize_params)["originator"] == "codex_cli_rs"


def test_oauth_spec_shapes(profiles: dict[str, ProviderProfile]) -> None:
    spec = profiles["claude_code"].oauth_spec("flow-1").to_wire()
    assert spec["flow_id"] == "flow-1"
    assert spec["redirect"] == {"host": "localhost", "port": 0, "path": "/callback"}
    assert spec["pkce"] is True
    assert spec["token_request_style"] == "json"
    assert spec["client_secret"] is None
    assert spec["scopes"] == list(profiles["claude_code"].scopes)
    assert "user" not in spec["browser"]  # the controller sets browser.user
    assert set(spec) == {
        "flow_id",
        "authorize_url",
        "token_url",
        "client_id",
        "client_secret",
        "scopes",
        "redirect",
        "pkce",
        "extra_authorize_params",
        "token_request_style",
        "browser",
    }
    codex = profiles["codex"].oauth_spec("flow-2").to_wire()
    assert codex["redirect"] == {"host": "localhost", "port": 1455, "path": "/auth/callback"}
    assert codex["extra_authorize_params"]["codex_cli_simplified_flow"] == "true"
    gemini = profiles["gemini"].oauth_spec("flow-3").to_wire()
    assert gemini["redirect"] == {"host": "127.0.0.1", "port": 0, "path": "/oauth2callback"}
    # The spec is the caller's to change (auth_flow sets browser.user).
    codex["browser"]["user"] = "browser"
    assert "user" not in profiles["codex"].oauth_spec("flow-2").to_wire()["browser"]


# --- overrides ---------------------------------------------------------------------------------


def test_environment_overrides(settings: Settings) -> None:
    env = {
        "REMOTECLI_PROVIDER_CODEX_AUTHORIZE_URL": "http://127.0.0.1:9999/auth",
        "REMOTECLI_PROVIDER_CODEX_TOKEN_URL": "http://127.0.0.1:9999/token",
        "REMOTECLI_PROVIDER_CODEX_CLIENT_ID": "remotecli-codex",
        "REMOTECLI_PROVIDER_GEMINI_CLIENT_SECRET": CLIENT_SECRET,
        "REMOTECLI_PROVIDER_CLAUDE_CODE_SCOPES": "openid, email offline_access",
        "REMOTECLI_PROVIDER_CLAUDE_CODE_REDIRECT_URI": "http://127.0.0.1:{port}/cb",
    }
    profiles = load_profiles(settings, environ=env)
    codex = profiles["codex"]
    assert codex.authorize_url == "http://127.0.0.1:9999/auth"
    assert codex.token_url == "http://127.0.0.1:9999/token"
    assert codex.client_id == "remotecli-codex"
    assert codex.redirect_port == 1455  # untouched
    assert profiles["gemini"].client_secret == CLIENT_SECRET
    assert profiles["gemini"].oauth_spec("f").client_secret == CLIENT_SECRET
    assert profiles["claude_code"].scopes == ("openid", "email", "offline_access")
    redirect = profiles["claude_code"].oauth_spec("f").to_wire()["redirect"]
    assert redirect == {"host": "127.0.0.1", "port": 0, "path": "/cb"}


def test_config_file_overrides_and_custom_profile(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        """
port = 8080

[providers.codex]
token_url = "http://127.0.0.1:7000/token"

[providers.corp_gemini]
display_name = "Gemini (company IdP)"
authorize_url = "https://idp.example.test/authorize"
token_url = "https://idp.example.test/token"
client_id = "gemini-cli"
client_secret = "from-config"
scopes = ["openid", "email"]
redirect_uri = "http://127.0.0.1:{port}/oauth2callback"
credential_format = "gemini"
"""
    )
    env = {"REMOTECLI_PROVIDER_CORP_GEMINI_CLIENT_ID": "from-env"}
    profiles = load_profiles(settings, environ=env)
    assert profiles["codex"].token_url == "http://127.0.0.1:7000/token"
    assert profiles["codex"].authorize_url == "https://auth.openai.com/oauth/authorize"
    corp = profiles["corp_gemini"]
    assert corp.display_name == "Gemini (company IdP)"
    assert corp.client_id == "from-env"  # the environment wins over the file
    assert corp.pkce is True and corp.token_request_style == "form"
    files = render_credentials(corp, _token_response(), NOW).files
    assert [f.path for f in files] == [".gemini/oauth_creds.json", ".gemini/settings.json"]


def test_config_file_named_by_environment(settings: Settings, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.toml"
    other.write_text('[providers.gemini]\nclient_secret = "s"\n')
    profiles = load_profiles(settings, environ={"REMOTECLI_CONFIG_FILE": str(other)})
    assert profiles["gemini"].client_secret == "s"


@pytest.mark.parametrize(
    "table",
    [
        '[providers.codex]\nredirect_uri = "http://example.com:1455/cb"\n',
        '[providers.codex]\ntoken_request_style = "xml"\n',
        '[providers.codex]\nunknown_field = "x"\n',
        '[providers.custom]\ndisplay_name = "Only a name"\n',
        '[providers.custom2]\ndisplay_name = "X"\nauthorize_url = "https://a.test/a"\ntoken_url = "https://a.test/t"\n'
        'client_id = "c"\nredirect_uri = "http://localhost:{port}/cb"\ncredential_format = "netrc"\n',
    ],
)
def test_invalid_config_is_refused_without_values(settings: Settings, tmp_path: Path, table: str) -> None:
    (tmp_path / "config.toml").write_text(table)
    with pytest.raises(ProviderConfigError) as caught:
        load_profiles(settings, environ={})
    assert "example.com" not in str(caught.value)


# --- credential files ---------------------------------------------------------------------------


def test_claude_code_credentials(profiles: dict[str, ProviderProfile]) -> None:
    rendered = render_credentials(profiles["claude_code"], _token_response(subscription_type="max"), NOW)
    assert [f.path for f in rendered.files] == [".claude/.credentials.json", ".claude.json"]
    assert all(f.mode == 0o600 for f in rendered.files)
    assert _doc(rendered.files[0]) == {
        "claudeAiOauth": {
            "accessToken": ACCESS,
            "refreshToken": REFRESH,
            "expiresAt": NOW_MS + 3600 * 1000,
            "scopes": ["openid", "email", "offline_access"],
            "subscriptionType": "max",
            "rateLimitTier": None,
        }
    }
    assert _doc(rendered.files[1]) == {
        "hasCompletedOnboarding": True,
        "oauthAccount": {"emailAddress": "alice@example.test"},
    }
    assert rendered.metadata == {
        "provider": "claude_code",
        "account": "alice@example.test",
        "expires_at": "2026-01-02T04:04:05Z",
        "scopes": ["openid", "email", "offline_access"],
    }


def test_claude_code_anthropic_shape_without_id_token(profiles: dict[str, ProviderProfile]) -> None:
    answer = {
        "access_token": ACCESS,
        "refresh_token": REFRESH,
        "expires_in": 28800,
        "scope": "user:inference user:profile",
        "account": {"uuid": "acc-uuid", "email_address": "bob@example.test"},
        "organization": {"uuid": "org-uuid", "name": "Bob's Org"},
    }
    rendered = render_credentials(profiles["claude_code"], answer, NOW.timestamp())
    creds = _doc(rendered.files[0])["claudeAiOauth"]
    assert creds["scopes"] == ["user:inference", "user:profile"]
    assert creds["subscriptionType"] is None  # not in Anthropic's token response (docs say so)
    assert creds["rateLimitTier"] is None
    assert creds["expiresAt"] == NOW_MS + 28800 * 1000
    assert _doc(rendered.files[1])["oauthAccount"] == {
        "emailAddress": "bob@example.test",
        "accountUuid": "acc-uuid",
        "organizationUuid": "org-uuid",
        "organizationName": "Bob's Org",
    }
    assert rendered.files[1].merge_json and not rendered.files[1].deep_merge  # oauthAccount replaced whole


def test_claude_code_subscription_from_the_organization_type(profiles: dict[str, ProviderProfile]) -> None:
    answer = _token_response(organization={"uuid": "o", "organization_type": "claude_max",
                                           "rate_limit_tier": "default_claude_max_20x"})
    creds = _doc(render_credentials(profiles["claude_code"], answer, NOW).files[0])["claudeAiOauth"]
    assert (creds["subscriptionType"], creds["rateLimitTier"]) == ("max", "default_claude_max_20x")
    unknown = _token_response(organization={"uuid": "o", "organization_type": "something_new"})
    assert _doc(render_credentials(profiles["claude_code"], unknown, NOW).files[0])["claudeAiOauth"][
        "subscriptionType"] is None


def test_expiry_counts_from_obtained_at_not_delivery(profiles: dict[str, ProviderProfile]) -> None:
    """The sign-in may wait (a CLI VM booting) between the token exchange and the delivery."""
    later = NOW + dt.timedelta(minutes=7)
    answer = _token_response(obtained_at=NOW.timestamp())
    claude = _doc(render_credentials(profiles["claude_code"], answer, later).files[0])["claudeAiOauth"]
    assert claude["expiresAt"] == NOW_MS + 3600 * 1000
    gemini = _doc(render_credentials(profiles["gemini"], answer, later).files[0])
    assert gemini["expiry_date"] == NOW_MS + 3600 * 1000
    codex = _doc(render_credentials(profiles["codex"], answer, later).files[0])
    assert codex["last_refresh"] == "2026-01-02T03:04:05Z"
    assert render_credentials(profiles["codex"], answer, later).metadata["expires_at"] == "2026-01-02T04:04:05Z"
    # Without obtained_at (or with a nonsense one) the delivery time is used.
    for bad in (None, "soon", True, -1):
        answer = _token_response(obtained_at=bad)
        doc = _doc(render_credentials(profiles["gemini"], answer, later).files[0])
        assert doc["expiry_date"] == int(later.timestamp() * 1000) + 3600 * 1000


def test_claude_code_without_email_writes_only_credentials(profiles: dict[str, ProviderProfile]) -> None:
    answer = {"access_token": ACCESS, "refresh_token": REFRESH, "expires_in": 60}
    rendered = render_credentials(profiles["claude_code"], answer, NOW)
    assert [f.path for f in rendered.files] == [".claude/.credentials.json"]
    assert _doc(rendered.files[0])["claudeAiOauth"]["scopes"] == list(profiles["claude_code"].scopes)
    assert rendered.metadata["account"] is None


def test_codex_credentials(profiles: dict[str, ProviderProfile]) -> None:
    rendered = render_credentials(profiles["codex"], _token_response(), NOW)
    (file,) = rendered.files
    assert file.path == ".codex/auth.json" and file.mode == 0o600
    assert _doc(file) == {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": ID_TOKEN,
            "access_token": ACCESS,
            "refresh_token": REFRESH,
            "account_id": "acct-42",
        },
        "last_refresh": "2026-01-02T03:04:05Z",
    }
    assert rendered.metadata["account"] == "alice@example.test"


def test_codex_account_id_falls_back_to_sub(profiles: dict[str, ProviderProfile]) -> None:
    answer = _token_response(id_token=_jwt({"sub": "user-9", "email": "c@example.test"}))
    doc = _doc(render_credentials(profiles["codex"], answer, NOW).files[0])
    assert doc["tokens"]["account_id"] == "user-9"


def test_gemini_credentials(profiles: dict[str, ProviderProfile]) -> None:
    rendered = render_credentials(profiles["gemini"], _token_response(), NOW)
    file, settings_file = rendered.files
    assert file.path == ".gemini/oauth_creds.json" and file.mode == 0o600
    assert settings_file.path == ".gemini/settings.json" and settings_file.mode == 0o600
    assert settings_file.merge_json and settings_file.deep_merge
    assert _doc(settings_file) == {"security": {"auth": {"selectedType": "oauth-personal"}}}
    assert _doc(file) == {
        "access_token": ACCESS,
        "refresh_token": REFRESH,
        "scope": "openid email offline_access",
        "token_type": "Bearer",
        "id_token": ID_TOKEN,
        "expiry_date": NOW_MS + 3600 * 1000,
    }


def test_naive_now_is_utc(profiles: dict[str, ProviderProfile]) -> None:
    naive = NOW.replace(tzinfo=None)
    doc = _doc(render_credentials(profiles["gemini"], _token_response(obtained_at=None), naive).files[0])
    assert doc["expiry_date"] == NOW_MS + 3600 * 1000


@pytest.mark.parametrize(
    "answer",
    [{}, {"access_token": ""}, {"access_token": 5}, {"access_token": ACCESS, "refresh_token": 7}, []],
)
def test_bad_token_responses(profiles: dict[str, ProviderProfile], answer: Any) -> None:
    with pytest.raises(InvalidTokenResponse) as caught:
        render_credentials(profiles["codex"], answer, NOW)
    assert ACCESS not in str(caught.value) and ACCESS not in (caught.value.log_detail or "")


def test_decode_jwt_claims() -> None:
    assert decode_jwt_claims(ID_TOKEN)["email"] == "alice@example.test"
    for value in (None, 5, "", "a.b", "a.!!!.c", _jwt({"x": 1}).replace(".", "", 1)):
        assert decode_jwt_claims(value) == {}


# --- no secret in repr, str or metadata ---------------------------------------------------------


def test_no_secret_in_repr_str_or_metadata(settings: Settings) -> None:
    env = {"REMOTECLI_PROVIDER_GEMINI_CLIENT_SECRET": CLIENT_SECRET}
    profiles = load_profiles(settings, environ=env)
    for profile in profiles.values():
        for text in (repr(profile), str(profile), repr(profiles)):
            assert CLIENT_SECRET not in text
        rendered = render_credentials(profile, _token_response(), NOW)
        shown = repr(rendered) + str(rendered) + json.dumps(rendered.metadata)
        for secret in (ACCESS, REFRESH, ID_TOKEN, CLIENT_SECRET):
            assert secret not in shown
        # ... but the files do carry the tokens.
        assert ACCESS.encode() in rendered.files[0].content
    assert "<set>" in repr(profiles["gemini"])


def test_merge_json_file_keeps_other_keys_and_survives_bad_input() -> None:
    from remotecli.services.providers import merge_json_file

    update = b'{"oauthAccount": {"emailAddress": "a@x.test"}, "hasCompletedOnboarding": true}'
    merged = json.loads(merge_json_file(b'{"theme": "dark", "oauthAccount": {"emailAddress": "old"}}', update))
    assert merged == {"theme": "dark", "oauthAccount": {"emailAddress": "a@x.test"}, "hasCompletedOnboarding": True}
    for existing in (None, b"", b"not json", b"[1, 2]", b"\xff\xfe"):
        assert merge_json_file(existing, update) == update


def test_merge_json_file_deep_keeps_nested_user_settings() -> None:
    from remotecli.services.providers import GEMINI_AUTH_SETTINGS, merge_json_file

    update = json.dumps(GEMINI_AUTH_SETTINGS).encode()
    existing = json.dumps({
        "theme": "GitHub",
        "security": {"folderTrust": {"enabled": True},
                     "auth": {"selectedType": "gemini-api-key", "useExternal": False}},
        "general": {"vimMode": True},
    }).encode()
    merged = json.loads(merge_json_file(existing, update, deep=True))
    assert merged == {
        "theme": "GitHub",
        "security": {"folderTrust": {"enabled": True},
                     "auth": {"selectedType": "oauth-personal", "useExternal": False}},
        "general": {"vimMode": True},
    }
    # A non-object where ours has an object is replaced; lists are values, not merged.
    merged = json.loads(merge_json_file(b'{"security": "weird", "list": [1]}', b'{"security": {"a": 1}, "list": [2]}',
                                        deep=True))
    assert merged == {"security": {"a": 1}, "list": [2]}
    # Top-level merging (the default) replaces nested objects whole.
    assert json.loads(merge_json_file(existing, update))["security"] == GEMINI_AUTH_SETTINGS["security"]
    for bad in (None, b"", b"not json", b"[1, 2]", b"\xff\xfe"):
        assert merge_json_file(bad, update, deep=True) == update


def test_every_credential_format_a_profile_may_name_is_rendered_with_the_same_files() -> None:
    assert set(CREDENTIAL_FILES) == set(CREDENTIAL_FORMATS)
    for name, paths in CREDENTIAL_FILES.items():
        assert CREDENTIAL_FORMATS[name].paths == paths
