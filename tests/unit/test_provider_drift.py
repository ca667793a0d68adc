"""Provider drift: the built-in profiles against the OAuth constants inside the pinned CLIs.

``test_builtin_profiles_match_the_pinned_clis`` is the CI check: it reads the constants of the
exact CLI versions pinned in the cli recipe, from (first found):

1. the manifest of a built cli image for the current recipe (``$REMOTECLI_TEST_DATA_DIR``, then
   ``.data/test-images``);
2. a cached extraction under ``.data/cli-packages/`` (keyed by the pins and the extractor version);
3. ``npm pack`` of the pinned packages (and their linux-x64 platform packages) from the registry
   into ``.data/cli-packages/`` (CI has network to the npm registry), extracted once and cached.

The other tests run the extractors and the comparison on small synthetic packages.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from remotecli.config import Settings
from remotecli.images import cli_constants
from remotecli.images.cli_constants import CliConstants, extract, secret_digest
from remotecli.images.recipes import CLI_VERSIONS
from remotecli.profiles import ProviderProfile, load_profiles
from remotecli.services.provider_drift import builtin_profiles, describe, differences

REPO = Path(__file__).resolve().parents[2]
GEMINI_SECRET = "GOCSPX-test-not-the-real-one"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
def builtin(settings: Settings) -> dict[str, ProviderProfile]:
    return builtin_profiles(settings)


# --- the CI check --------------------------------------------------------------------------------


def _pins() -> dict[str, str]:
    return {provider: CLI_VERSIONS[package] for provider, package in cli_constants.CLI_PACKAGES.items()}


def _from_built_image() -> dict[str, CliConstants] | None:
    from remotecli.images.builder import installed_cli_constants

    for data_dir in (os.environ.get("REMOTECLI_TEST_DATA_DIR"), str(REPO / ".data" / "test-images")):
        if not data_dir:
            continue
        found = installed_cli_constants(Settings(data_dir=Path(data_dir)))
        if found is not None and {p: c.version for p, c in found.items()} == _pins():
            return found
    return None


def _from_registry() -> dict[str, CliConstants]:
    pins = _pins()
    key = hashlib.sha256(json.dumps([pins, cli_constants.EXTRACTOR_VERSION], sort_keys=True).encode()).hexdigest()[:16]
    cache = REPO / ".data" / "cli-packages"
    result = cache / f"constants-{key}.json"
    if result.is_file():
        return {p: CliConstants.from_dict(d) for p, d in json.loads(result.read_text()).items()}
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed and no cli image or cached extraction is present")
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.is_file():
            node_modules = cli_constants.fetch_packages(pins, cache / "packages")
            found = {p: extract(p, node_modules / cli_constants.CLI_PACKAGES[p]) for p in pins}
            result.write_text(json.dumps({p: c.as_dict() for p, c in found.items()}, indent=2))
            shutil.rmtree(cache / "packages", ignore_errors=True)  # ~1 GB unpacked; the JSON is what we keep
    return {p: CliConstants.from_dict(d) for p, d in json.loads(result.read_text()).items()}


@pytest.mark.timeout(1200)
def test_builtin_profiles_match_the_pinned_clis(builtin: dict[str, ProviderProfile]) -> None:
    constants = _from_built_image() or _from_registry()
    assert {p: c.version for p, c in constants.items()} == _pins()
    found = differences(constants, builtin)
    assert found == [], "\n".join(d.message for d in found)
    for provider, cli in constants.items():  # everything the drift check compares was readable
        assert cli.authorize_url and cli.token_url and cli.client_id and cli.scopes and cli.redirect_uri, provider


# --- comparison ----------------------------------------------------------------------------------


def _constants_like(profile: ProviderProfile, **changes: object) -> CliConstants:
    """What a CLI agreeing with ``profile`` would report, with ``changes``."""
    doc: dict[str, object] = {
        "provider": profile.name,
        "package": cli_constants.CLI_PACKAGES[profile.name],
        "version": "9.9.9",
        "authorize_url": profile.authorize_url,
        "token_url": profile.token_url,
        "client_id": profile.client_id,
        "client_secret_sha256": secret_digest(profile.client_secret),
        "scopes": list(profile.scopes),
        "redirect_uri": profile.redirect_uri,
        "extra_authorize_params": dict(profile.extra_authorize_params),
    }
    doc.update(changes)
    return CliConstants.from_dict(doc)


def test_no_difference_when_the_cli_agrees(builtin: dict[str, ProviderProfile]) -> None:
    constants = {name: _constants_like(profile) for name, profile in builtin.items()}
    assert differences(constants, builtin) == []
    assert describe(constants, [])[-1] == "the built-in provider profiles match the CLIs' OAuth constants"


def test_every_field_difference_is_drift_in_words(builtin: dict[str, ProviderProfile]) -> None:
    claude = builtin["claude_code"]
    cli = _constants_like(
        claude,
        token_url="https://new.example/v1/oauth/token",
        authorize_url="https://new.example/authorize",
        client_id="other-client",
        scopes=[*claude.scopes[1:], "user:new_scope"],
        redirect_uri="http://127.0.0.1:{port}/callback",
        extra_authorize_params={"code": "false", "new_param": None},
    )
    found = differences({"claude_code": cli}, builtin)
    by_field = {d.field: d for d in found}
    assert set(by_field) == {"token_url", "authorize_url", "client_id", "scopes", "redirect_uri",
                             "extra_authorize_params"}
    assert all(d.kind == "drift" and d.message.startswith("claude_code: ") for d in found)
    assert "https://new.example/v1/oauth/token" in by_field["token_url"].message
    assert claude.token_url in by_field["token_url"].message
    assert "Claude Code 9.9.9" in by_field["token_url"].message
    assert "lacks user:new_scope" in by_field["scopes"].message
    assert f"has {claude.scopes[0]} which the CLI does not ask for" in by_field["scopes"].message
    assert "new_param" in by_field["extra_authorize_params"].message
    assert "code is 'true' (the CLI sends 'false')" in by_field["extra_authorize_params"].message


def test_profile_only_params_are_not_drift(builtin: dict[str, ProviderProfile]) -> None:
    """Gemini's prompt=consent is ours on purpose: only the CLI's parameters are checked."""
    gemini = builtin["gemini"]
    cli = _constants_like(gemini, extra_authorize_params={"access_type": "offline"})
    assert differences({"gemini": cli}, builtin) == []


def test_client_secret_differences_never_show_the_secret(settings: Settings,
                                                          builtin: dict[str, ProviderProfile]) -> None:
    gemini = builtin["gemini"]
    assert gemini.client_secret
    cli = _constants_like(gemini, client_secret_sha256=secret_digest(GEMINI_SECRET))
    (drift,) = differences({"gemini": cli}, builtin)
    assert drift.field == "client_secret" and drift.kind == "drift"
    assert "another client secret" in drift.message
    effective = load_profiles(settings, {"REMOTECLI_PROVIDER_GEMINI_CLIENT_SECRET": GEMINI_SECRET})
    found = differences({"gemini": cli}, builtin, effective)
    override = [d for d in found if d.kind == "override"]
    assert len(override) == 1 and "the same as Gemini CLI 9.9.9" in override[0].message
    for item in found:
        assert GEMINI_SECRET not in item.message and str(gemini.client_secret) not in item.message
        assert str(secret_digest(GEMINI_SECRET)) not in item.message


def test_an_operator_override_is_reported_as_override_not_drift(settings: Settings,
                                                                  builtin: dict[str, ProviderProfile]) -> None:
    effective = load_profiles(settings, {"REMOTECLI_PROVIDER_CLAUDE_CODE_TOKEN_URL": "http://127.0.0.1:9/token"})
    constants = {name: _constants_like(profile) for name, profile in builtin.items()}
    (item,) = differences(constants, builtin, effective)
    assert item.kind == "override" and item.field == "token_url" and item.provider == "claude_code"
    assert "overridden by the operator" in item.message and "http://127.0.0.1:9/token" in item.message
    assert builtin["claude_code"].token_url in item.message
    lines = describe(constants, [item])
    assert lines[-1] == "the built-in provider profiles match the CLIs' OAuth constants"  # an override is not drift
    assert any(line.startswith("override: claude_code: ") for line in lines)


def test_unreadable_constants_are_unchecked(builtin: dict[str, ProviderProfile]) -> None:
    cli = CliConstants("codex", "@openai/codex", "1.2.3", problems=("the scope string was not found",))
    found = differences({"codex": cli}, builtin)
    assert [(d.kind, d.message) for d in found] == [
        ("unchecked", "codex: in Codex 1.2.3, the scope string was not found")
    ]
    assert describe(None, [])[0].startswith("provider profiles: the cli image records no CLI constants")


def test_constants_round_trip_through_the_manifest_form(builtin: dict[str, ProviderProfile]) -> None:
    cli = _constants_like(builtin["codex"], extra_authorize_params={"originator": "codex_cli_rs", "flag": None})
    assert CliConstants.from_dict(json.loads(json.dumps(cli.as_dict()))) == cli


# --- extractors, on synthetic packages -------------------------------------------------------------


def _package(root: Path, name: str, version: str) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "package.json").write_text(json.dumps({"name": name, "version": version}))
    return directory


# Shapes of the minified code in Claude Code 2.1.197 (a scope variable) and 2.1.332 (scope functions
# gated by configuration flags).
CLAUDE_197 = (
    b'\x00junk VB="user:inference",DCe="user:profile",bEu="org:create_api_key",wys,Zae,qkr;var wc=E(()=>{'
    b'wys=[bEu,DCe],Zae=[DCe,VB,"user:sessions:claude_code","user:mcp_servers",...[]],qkr=Fo([...wys,...Zae]);'
    b'Tys={BASE_API_URL:"https://api.anthropic.com",CLAUDE_AI_AUTHORIZE_URL:"https://claude.example/authorize",'
    b'TOKEN_URL:"https://platform.example/v1/oauth/token",CLIENT_ID:"cid-197"}\x00'
    b'function z(){let d=new URL(W);d.searchParams.append("code","true"),d.searchParams.append("client_id",x),'
    b'd.searchParams.append("redirect_uri",g?M:`http://localhost:${o}/callback`);'
    b'let p=c?c.scopes:s?[VB]:qkr;if(d.searchParams.append("scope",p.join(" ")),'
    b'd.searchParams.append("code_challenge_method","S256"),q)CLAUDE_AI_AUTHORIZE_URL}'
)
CLAUDE_332 = (
    b'var tI="user:inference",e5="user:profile",_We="user:sessions:claude_code";var yWe="user:plugins",'
    b'xqo="user:privacy_consents:write";var c="org:create_api_key",Uer=[c,e5],n=[e5,tI,_We,"user:file_upload"];'
    b"function uRn(){let t=un(),E=[...n];if(t.PLUGINS_SCOPE_REGISTERED)E.push(yWe);return E}"
    b"function S5s(){let t=R([...Uer,...uRn()]);if(un().PRIVACY_CONSENTS_SCOPE_REGISTERED)t.push(xqo);"
    b"if(un().OFF_SCOPE_REGISTERED)t.push(tI);return t}"
    b'var o={BASE_API_URL:"https://api.anthropic.com",CLAUDE_AI_AUTHORIZE_URL:"https://claude.example/cai",'
    b'TOKEN_URL:"https://platform.example/v1/oauth/token",CLIENT_ID:"cid-332",PLUGINS_SCOPE_REGISTERED:!0,'
    b"PRIVACY_CONSENTS_SCOPE_REGISTERED:!0,OFF_SCOPE_REGISTERED:!1}\x00"
    b'function djs(){let W=h?un().CLAUDE_AI_AUTHORIZE_URL:un().CONSOLE_AUTHORIZE_URL,Y=new URL(W);'
    b'Y.searchParams.append("code","true"),Y.searchParams.append("response_type","code"),'
    b'Y.searchParams.append("redirect_uri",g?un().MANUAL_REDIRECT_URL:`http://localhost:${o}/callback`);'
    b'let X=D?D.scopes:y?[tI]:H?[...S5s(),H]:S5s();if(Y.searchParams.append("scope",X.join(" ")),'
    b'Y.searchParams.append("code_challenge_method","S256"),k)}'
)


@pytest.mark.parametrize(
    ("blob", "client_id", "scopes"),
    [
        (CLAUDE_197, "cid-197", ["org:create_api_key", "user:profile", "user:inference",
                                 "user:sessions:claude_code", "user:mcp_servers"]),
        (CLAUDE_332, "cid-332", ["org:create_api_key", "user:profile", "user:inference",
                                 "user:sessions:claude_code", "user:file_upload", "user:plugins",
                                 "user:privacy_consents:write"]),
    ],
)
def test_claude_code_extractor(tmp_path: Path, blob: bytes, client_id: str, scopes: list[str]) -> None:
    package = _package(tmp_path, "@anthropic-ai/claude-code", "2.1.0")
    (package / "bin").mkdir()
    (package / "bin" / "claude.exe").write_bytes(b"\x7fELF" + b"\x00" * 200_000 + blob + b"\x00" * 1000)
    found = extract("claude_code", package)
    assert found.problems == ()
    assert found.client_id == client_id
    assert found.token_url == "https://platform.example/v1/oauth/token"
    assert found.authorize_url and found.authorize_url.startswith("https://claude.example/")
    assert list(found.scopes) == scopes
    assert found.redirect_uri == "http://localhost:{port}/callback"
    assert found.extra_authorize_params == {"code": "true"}  # standard OAuth parameters are not profile data


def test_claude_code_extractor_says_what_it_cannot_find(tmp_path: Path) -> None:
    package = _package(tmp_path, "@anthropic-ai/claude-code", "3.0.0")
    (package / "bin").mkdir()
    (package / "bin" / "claude.exe").write_bytes(b"\x00" * 200_000 + CLAUDE_332.replace(b":S5s();if", b":Q9();if"))
    found = extract("claude_code", package)
    assert found.token_url and not found.scopes
    assert any("scope list could not be resolved" in p for p in found.problems)
    missing = extract("claude_code", _package(tmp_path / "x", "@anthropic-ai/claude-code", "3.0.0"))
    assert missing.problems == ("the Claude Code executable was not found",)
    assert extract("claude_code", tmp_path / "nowhere").problems == (
        "@anthropic-ai/claude-code is not installed (no package.json)",)


def test_codex_extractor(tmp_path: Path) -> None:
    package = _package(tmp_path, "@openai/codex", "0.1.0")
    binary = package / "node_modules" / "@openai" / "codex-linux-x64" / "vendor" / "x86_64-unknown-linux-musl" / "bin"
    binary.mkdir(parents=True)
    (binary / "codex").write_bytes(
        b"\x7fELFapp_accessComputerUseWindowsConf login flowapp_EMoamEEZ73f0CkXaXp7hrannturnIdphase"
        b"asdk_app_69a1d78e929881919bba0dbda1f6 https://auth.openai.com/oauth/tokenworkload /oauth/authorize\x00"
        b"https://auth.openai.comjson.lock portid_token_add_organizationscodex_cli_simplified_flowallowed_workspace_id"
        b"login_hintopenid profile email offline_access api.connectors.read api.connectors.invokeGET /cancel"
        b"/auth/callback codex_cli_rscodex-tui"
    )
    found = extract("codex", package)
    assert found.problems == ()
    assert found.client_id == "app_EMoamEEZ73f0CkXaXp7hrann"
    assert found.token_url == "https://auth.openai.com/oauth/token"
    assert found.authorize_url == "https://auth.openai.com/oauth/authorize"
    assert found.scopes == ("openid", "profile", "email", "offline_access", "api.connectors.read",
                            "api.connectors.invoke")
    assert found.extra_authorize_params == {"id_token_add_organizations": None, "codex_cli_simplified_flow": None,
                                            "originator": "codex_cli_rs"}


def test_gemini_extractor(tmp_path: Path) -> None:
    package = _package(tmp_path, "@google/gemini-cli", "0.1.0")
    (package / "bundle").mkdir()
    chunk = f'''
      oauth2AuthBaseUrl: "https://accounts.example/o/oauth2/v2/auth",
      oauth2TokenUrl: "https://oauth2.example/token",
var OAUTH_CLIENT_ID = "123-abc.apps.googleusercontent.com";
var OAUTH_CLIENT_SECRET = "{GEMINI_SECRET}";
var OAUTH_SCOPE = [
  "https://www.googleapis.com/auth/cloud-platform",
  "https://www.googleapis.com/auth/userinfo.email"
];
async function authWithWeb(client) {{
  const port = await getAvailablePort();
  const redirectUri = `http://127.0.0.1:${{port}}/oauth2callback`;
  const state = crypto6.randomBytes(32).toString("hex");
  const authUrl = client.generateAuthUrl({{
    redirect_uri: redirectUri,
    access_type: "offline",
    scope: OAUTH_SCOPE,
    state
  }});
'''
    (package / "bundle" / "chunk-A.js").write_text(chunk)
    (package / "bundle" / "chunk-B.js").write_text(chunk)  # the same module bundled twice agrees
    found = extract("gemini", package)
    assert found.problems == ()
    assert found.client_id == "123-abc.apps.googleusercontent.com"
    assert found.client_secret_sha256 == secret_digest(GEMINI_SECRET)
    assert GEMINI_SECRET not in json.dumps(found.as_dict())  # only its digest is kept
    assert found.authorize_url == "https://accounts.example/o/oauth2/v2/auth"
    assert found.token_url == "https://oauth2.example/token"
    assert found.scopes == ("https://www.googleapis.com/auth/cloud-platform",
                            "https://www.googleapis.com/auth/userinfo.email")
    assert found.redirect_uri == "http://127.0.0.1:{port}/oauth2callback"
    assert found.extra_authorize_params == {"access_type": "offline"}
    (package / "bundle" / "chunk-B.js").write_text(chunk.replace("123-abc", "456-def"))
    assert "OAUTH_CLIENT_ID was found with different values" in extract("gemini", package).problems


def test_images_outdated_lists_newer_releases_and_their_differences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from remotecli.cli.main import main

    newer = {"codex": "9.0.0"}

    def latest(package: str) -> str:
        provider = next(p for p, name in cli_constants.CLI_PACKAGES.items() if name == package)
        return newer.get(provider, CLI_VERSIONS[package])

    def fetch(versions: dict[str, str], cache_dir: Path) -> Path:
        assert versions == newer
        package = _package(cache_dir / "node_modules", "@openai/codex", "9.0.0")
        binary = package / "vendor" / "x86_64-unknown-linux-musl" / "bin"
        binary.mkdir(parents=True)
        (binary / "codex").write_bytes(
            b"flowapp_EMoamEEZ73f0CkXaXp7hrannturn https://auth.openai.com/oauth/tokenX /oauth/authorize\x00"
            b"https://auth.openai.com portid_token_add_organizationscodex_cli_simplified_flowlogin_hint"
            b"openid profile email offline_access api.connectors.read api.responses.writeGET"
            b" /auth/callback codex_cli_rs"
        )
        return cache_dir / "node_modules"

    monkeypatch.setattr(cli_constants, "npm_latest_version", latest)
    monkeypatch.setattr(cli_constants, "fetch_packages", fetch)
    monkeypatch.setenv("REMOTECLI_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["images", "outdated", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["provider"]: row for row in json.loads(result.stdout)}
    assert rows["claude_code"]["outdated"] is False and rows["gemini"]["differences"] == []
    codex = rows["codex"]
    assert (codex["pinned"], codex["latest"], codex["outdated"]) == (CLI_VERSIONS["@openai/codex"], "9.0.0", True)
    (scopes,) = codex["differences"]
    assert scopes["kind"] == "drift" and scopes["field"] == "scopes"
    assert "lacks api.responses.write" in scopes["message"] and "Codex 9.0.0" in scopes["message"]
    text = CliRunner().invoke(main, ["images", "outdated"])
    assert "@openai/codex 9.0.0 against the built-in codex profile: 1 difference(s)" in text.stdout
