"""Credential health and key sign-in (issue 11): the guest's parser of the CLIs' credential files,
GET /api/v1/credentials (read from the CLI VM now; a stopped workspace is not started unless
?refresh=1), POST /api/v1/credentials/keys (shape validation with stable 4xx codes, nothing
delivered, logged or changed on bad input; delivery the way each CLI takes it), and secret
hygiene: no key or token in responses, logs or events. Fake driver, SQLite and PostgreSQL; the
real CLIs judge the same deliveries in tests/e2e/test_key_signin.py."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from remotecli.agent.guest import credhealth
from remotecli.agent.protocol import CLI_ENV_FILE
from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.db.models import Event, Vm
from remotecli.drivers.fake import FakeDriver
from remotecli.services import key_signin, vm_manager
from remotecli.services import users as users_service
from remotecli.services.providers import render_credentials

HOME = "/home/cli"
ANTHROPIC_KEY = "sk-ant-api03-" + "Ab3_-" * 19 + "xyzAA"
CLAUDE_TOKEN = "sk-ant-oat01-" + "Zq9-_" * 16 + "tokEN"
OPENAI_KEY = "sk-proj-" + "K7m_P" * 30
GEMINI_KEY = "AIzaSy" + "G3m1n" * 6 + "ABC"
KEYS = {("claude_code", "api_key"): ANTHROPIC_KEY, ("claude_code", "oauth_token"): CLAUDE_TOKEN,
        ("codex", "api_key"): OPENAI_KEY, ("gemini", "api_key"): GEMINI_KEY}


@pytest.fixture
def client(ctx: AppContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx, background=False), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def alice(ctx: AppContext) -> dict[str, str]:
    user = users_service.create_user(ctx.db, "alice")
    _, token = users_service.create_token(ctx.db, user)
    return {"Authorization": f"Bearer {token}"}


def _files(fake_driver: FakeDriver, ctx: AppContext) -> dict[str, tuple[bytes, int, str | None]]:
    with ctx.db.read() as session:
        vm = session.scalars(select(Vm).where(Vm.vm_type == "cli", Vm.status == "running")).one()
    return fake_driver._vms[vm.id].files  # type: ignore[return-value]


def _events_text(ctx: AppContext) -> str:
    with ctx.db.read() as session:
        return "\n".join(f"{e.kind} {e.message} {json.dumps(e.details)}" for e in session.scalars(select(Event)))


# -- the guest's parser ----------------------------------------------------------------------------


def _reader(files: dict[str, bytes], mtime: float = 1_700_000_000.0):  # type: ignore[no-untyped-def]
    return lambda rel: (files[rel], mtime) if rel in files else None


def _render(ctx: AppContext, provider: str, expires_in: int = 3600) -> dict[str, bytes]:
    claims = {"email": "alice@example.com", "https://api.openai.com/auth": {"chatgpt_account_id": "acct-1"}}
    import base64

    def jwt(doc: dict[str, object]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")
        return f"eyJhbGciOiJub25lIn0.{body}.c2ln"

    response = {"access_token": jwt({"exp": time.time() + expires_in}) if provider == "codex" else "at-SECRET-1",
                "refresh_token": "rt-SECRET-2", "expires_in": expires_in, "id_token": jwt(claims),
                "obtained_at": time.time(), "account": {"email_address": "alice@example.com"}}
    rendered = render_credentials(ctx.providers[provider], response, time.time())
    return {f.path: f.content for f in rendered.files}


@pytest.mark.parametrize("provider", ["claude_code", "codex", "gemini"])
def test_guest_reads_files_rendered_by_the_project_as_signed_in(ctx: AppContext, provider: str) -> None:
    entries = {e["provider"]: e for e in credhealth.inspect_home(_reader(_render(ctx, provider)))}
    entry = entries[provider]
    assert entry["state"] == "signed_in" and entry["method"] == "oauth" and entry["has_refresh_token"]
    assert entry["account"] == "alice@example.com"
    assert entry["access_expires_at"] > time.time() + 3000
    assert entry["refreshed_at"] is not None
    assert "SECRET" not in json.dumps(entries)
    others = [e["state"] for name, e in entries.items() if name != provider]
    assert others == ["signed_out", "signed_out"]


@pytest.mark.parametrize("provider", ["claude_code", "codex", "gemini"])
def test_guest_says_expired_refreshable_then_signed_out_when_tokens_are_cleared(ctx: AppContext,
                                                                                provider: str) -> None:
    files = _render(ctx, provider, expires_in=1)
    later = time.time() + 120
    entry = {e["provider"]: e for e in credhealth.inspect_home(_reader(files), now=later)}[provider]
    assert entry["state"] == "expired_refreshable"
    main = {"claude_code": ".claude/.credentials.json", "codex": ".codex/auth.json",
            "gemini": ".gemini/oauth_creds.json"}[provider]
    for cleared in (b"", b"{}", None):
        changed = dict(files)
        if cleared is None:
            del changed[main]
        else:
            changed[main] = cleared
        entry = {e["provider"]: e for e in credhealth.inspect_home(_reader(changed))}[provider]
        assert entry["state"] == "signed_out", (cleared, entry)
    broken = {**files, main: b"not json"}
    assert {e["provider"]: e for e in credhealth.inspect_home(_reader(broken))}[provider]["state"] == "unreadable"


def test_guest_disk_reader_refuses_symlinks_and_other_owners(tmp_path: Path) -> None:
    (tmp_path / ".codex").mkdir()
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"auth_mode": "apikey", "OPENAI_API_KEY": "sk-x"}))
    os.symlink(target, tmp_path / ".codex" / "auth.json")
    entries = {e["provider"]: e for e in credhealth.inspect_home(credhealth.disk_reader(str(tmp_path), os.getuid()))}
    assert entries["codex"]["state"] == "unreadable"
    (tmp_path / ".codex" / "auth.json").unlink()
    target.rename(tmp_path / ".codex" / "auth.json")
    entries = {e["provider"]: e for e in credhealth.inspect_home(credhealth.disk_reader(str(tmp_path), os.getuid()))}
    assert entries["codex"]["state"] == "signed_in" and entries["codex"]["method"] == "api_key"
    if os.getuid() == 0:
        entries = {e["provider"]: e for e in credhealth.inspect_home(credhealth.disk_reader(str(tmp_path), 4242))}
        assert entries["codex"]["state"] == "signed_in"  # root-owned files are accepted
        os.chown(tmp_path / ".codex" / "auth.json", 4343, 4343)
        entries = {e["provider"]: e for e in credhealth.inspect_home(credhealth.disk_reader(str(tmp_path), 4242))}
        assert entries["codex"]["state"] == "unreadable"


def test_env_file_keeps_other_lines_and_replaces_claude_vars() -> None:
    first = key_signin.render_env_file(None, "GEMINI_API_KEY", GEMINI_KEY, ("GEMINI_API_KEY",))
    second = key_signin.render_env_file(first + b"export FOO='bar'\n", "ANTHROPIC_API_KEY", ANTHROPIC_KEY,
                                        key_signin.CLAUDE_ENV_VARS)
    third = key_signin.render_env_file(second, "CLAUDE_CODE_OAUTH_TOKEN", CLAUDE_TOKEN, key_signin.CLAUDE_ENV_VARS)
    parsed = credhealth.parse_env_file(third)
    assert parsed == {"GEMINI_API_KEY": GEMINI_KEY, "FOO": "bar", "CLAUDE_CODE_OAUTH_TOKEN": CLAUDE_TOKEN}


# -- GET /api/v1/credentials -----------------------------------------------------------------------


def test_health_without_a_workspace_and_with_a_stopped_one_does_not_boot(
        ctx: AppContext, client: TestClient, alice: dict[str, str], fake_driver: FakeDriver) -> None:
    answer = client.get("/api/v1/credentials", headers=alice)
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["workspace"] == "none" and {p["state"] for p in doc["providers"]} == {"no_workspace"}
    assert fake_driver.running_ids() == set()
    vm = client.post("/api/v1/vms/ensure", json={"vm_type": "cli"}, headers=alice).json()
    assert client.post(f"/api/v1/vms/{vm['id']}/stop", headers=alice).json()["status"] == "stopped"
    doc = client.get("/api/v1/credentials", headers=alice).json()
    assert doc["workspace"] == "stopped" and "stopped" in doc["message"].lower()
    assert {p["state"] for p in doc["providers"]} == {"workspace_stopped"}
    assert fake_driver.running_ids() == set()
    doc = client.get("/api/v1/credentials?refresh=1", headers=alice).json()
    assert doc["workspace"] == "running" and fake_driver.running_ids() == {vm["id"]}
    assert {p["state"] for p in doc["providers"]} == {"signed_out"}
    assert all(p["reauthenticate"] for p in doc["providers"])


def test_health_follows_the_guest_files_not_the_stored_metadata(
        ctx: AppContext, client: TestClient, alice: dict[str, str], fake_driver: FakeDriver) -> None:
    client.post("/api/v1/vms/ensure", json={"vm_type": "cli"}, headers=alice)
    files = _files(fake_driver, ctx)
    for path, content in _render(ctx, "claude_code").items():
        files[f"{HOME}/{path}"] = (content, 0o600, "cli")
    doc = client.get("/api/v1/credentials", headers=alice).json()
    claude = next(p for p in doc["providers"] if p["provider"] == "claude_code")
    assert claude["state"] == "signed_in" and claude["account"] == "alice@example.com"
    assert claude["access_expires_at"] and claude["refreshed_at"] is None and not claude["reauthenticate"]
    # The CLI cleared its tokens (as on invalid_grant): signed out, Re-authenticate offered.
    files[f"{HOME}/.claude/.credentials.json"] = (b"{}", 0o600, "cli")
    claude = next(p for p in client.get("/api/v1/credentials", headers=alice).json()["providers"]
                  if p["provider"] == "claude_code")
    assert claude["state"] == "signed_out" and claude["reauthenticate"]


def test_a_hung_or_old_agent_says_so_and_the_dashboard_still_renders(
        ctx: AppContext, client: TestClient, alice: dict[str, str], fake_driver: FakeDriver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from remotecli.agent.client import AgentCallError
    from remotecli.drivers.fake import FakeAgent

    vm = client.post("/api/v1/vms/ensure", json={"vm_type": "cli"}, headers=alice).json()
    fake_driver.hang_agent(vm["id"])
    doc = client.get("/api/v1/credentials", headers=alice).json()
    assert doc["workspace"] == "unreachable" and {p["state"] for p in doc["providers"]} == {"unknown"}
    fake_driver.hang_agent(vm["id"], False)

    def old_agent(self: FakeAgent, user: str | None = None) -> None:
        raise AgentCallError(status=404, agent_code="not_found", agent_message="No endpoint")

    monkeypatch.setattr(FakeAgent, "credential_health", old_agent)
    doc = client.get("/api/v1/credentials", headers=alice).json()
    assert doc["workspace"] == "unreachable" and "Rebuild workspace" in doc["message"]


# -- POST /api/v1/credentials/keys: bad input ------------------------------------------------------

BAD = [
    ({"provider": "nosuch", "kind": "api_key", "key": OPENAI_KEY}, "unknown_provider"),
    ({"provider": "codex", "kind": "oauth_token", "key": OPENAI_KEY}, "unknown_key_kind"),
    ({"provider": "codex", "kind": "api_key", "key": "sk-short"}, "malformed_key"),
    ({"provider": "gemini", "kind": "api_key", "key": GEMINI_KEY + "x"}, "malformed_key"),
    ({"provider": "gemini", "kind": "api_key", "key": "AIza" + "x" * 30 + "'; rm -rf ~ #"}, "malformed_key"),
    ({"provider": "claude_code", "kind": "api_key", "key": ""}, "malformed_key"),
    ({"provider": "claude_code", "kind": "api_key", "key": "sk-ant-api03-" + "a" * 600}, "malformed_key"),
    ({"provider": "codex", "kind": "api_key", "key": ANTHROPIC_KEY}, "key_provider_mismatch"),
    ({"provider": "claude_code", "kind": "api_key", "key": OPENAI_KEY}, "key_provider_mismatch"),
    ({"provider": "claude_code", "kind": "api_key", "key": CLAUDE_TOKEN}, "key_provider_mismatch"),
    ({"provider": "claude_code", "kind": "oauth_token", "key": GEMINI_KEY}, "key_provider_mismatch"),
    ({"provider": "gemini", "kind": "api_key", "key": OPENAI_KEY}, "key_provider_mismatch"),
]


@pytest.mark.parametrize(("body", "code"), BAD, ids=[f"{b['provider']}-{c}-{i}" for i, (b, c) in enumerate(BAD)])
def test_bad_keys_are_refused_with_a_code_and_nothing_happens(
        ctx: AppContext, client: TestClient, alice: dict[str, str], fake_driver: FakeDriver,
        caplog: pytest.LogCaptureFixture, body: dict[str, str], code: str) -> None:
    caplog.set_level(logging.DEBUG)
    with ctx.db.read() as session:
        events_before = session.scalar(select(func.count()).select_from(Event))
    answer = client.post("/api/v1/credentials/keys", json=body, headers=alice)
    assert answer.status_code == 422 and answer.json()["code"] == code, answer.text
    with ctx.db.read() as session:
        assert session.scalar(select(func.count()).select_from(Event)) == events_before
        assert session.scalar(select(func.count()).select_from(Vm)) == 0  # nothing booted, nothing delivered
    assert fake_driver.running_ids() == set()
    secret_part = body["key"][-12:]
    if secret_part:
        assert secret_part not in answer.text and secret_part not in caplog.text


def test_keys_need_a_signed_in_caller(client: TestClient) -> None:
    answer = client.post("/api/v1/credentials/keys", json={"provider": "codex", "kind": "api_key", "key": OPENAI_KEY})
    assert answer.status_code == 401
    assert client.get("/api/v1/credentials").status_code == 401


# -- POST /api/v1/credentials/keys: delivery ------------------------------------------------------


def test_each_key_is_delivered_the_way_its_cli_takes_it_and_never_leaks(
        ctx: AppContext, client: TestClient, alice: dict[str, str], fake_driver: FakeDriver,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    responses = []
    client.post("/api/v1/vms/ensure", json={"vm_type": "cli"}, headers=alice)
    files = _files(fake_driver, ctx)
    files[f"{HOME}/.gemini/settings.json"] = (b'{"ui": {"theme": "dark"}, "security": {"x": 1}}', 0o600, "cli")
    files[f"{HOME}/.profile"] = (b"# the user's profile\nexport EDITOR=vi\n", 0o644, "cli")
    for (provider, kind), key in KEYS.items():
        answer = client.post("/api/v1/credentials/keys", json={"provider": provider, "kind": kind, "key": key},
                             headers=alice)
        assert answer.status_code == 201, answer.text
        assert answer.json()["state"] == "signed_in" and answer.json()["method"] == kind
        responses.append(answer.text)
    env_data, env_mode, env_owner = files[f"{HOME}/{CLI_ENV_FILE}"]
    assert env_mode == 0o600 and env_owner == "cli"
    env = credhealth.parse_env_file(env_data)
    # The setup-token came after the API key: Claude has only the token now; Gemini's key stays.
    assert env == {"CLAUDE_CODE_OAUTH_TOKEN": CLAUDE_TOKEN, "GEMINI_API_KEY": GEMINI_KEY}
    profile = files[f"{HOME}/.profile"][0].decode()
    assert profile.startswith("# the user's profile\nexport EDITOR=vi\n") and profile.count(CLI_ENV_FILE) == 2
    assert json.loads(files[f"{HOME}/.codex/auth.json"][0]) == {"auth_mode": "apikey", "OPENAI_API_KEY": OPENAI_KEY}
    settings = json.loads(files[f"{HOME}/.gemini/settings.json"][0])
    assert settings == {"ui": {"theme": "dark"}, "security": {"x": 1, "auth": {"selectedType": "gemini-api-key"}}}
    approved = json.loads(files[f"{HOME}/.claude.json"][0])["customApiKeyResponses"]["approved"]
    assert approved == [ANTHROPIC_KEY[-20:]]
    health = client.get("/api/v1/credentials", headers=alice)
    states = {p["provider"]: (p["state"], p["method"]) for p in health.json()["providers"]}
    assert states == {"claude_code": ("signed_in", "oauth_token"), "codex": ("signed_in", "api_key"),
                      "gemini": ("signed_in", "api_key")}
    assert "credentials.key_delivered" in _events_text(ctx)
    haystack = "\n".join([*responses, health.text, caplog.text, _events_text(ctx)])
    for key in KEYS.values():
        assert key not in haystack and key[-20:] not in haystack and key[8:28] not in haystack


def test_a_failed_codex_login_is_a_502_with_a_code_and_says_nothing_of_the_key(
        ctx: AppContext, client: TestClient, alice: dict[str, str], fake_driver: FakeDriver,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from remotecli.agent.protocol import ExecResult
    from remotecli.drivers.fake import FakeAgent

    def refuse(self: FakeAgent, argv: list[str], **kwargs: object) -> ExecResult:
        return ExecResult(exit_code=1, stdout=b"", stderr=b"Error: " + OPENAI_KEY.encode(), timed_out=False,
                          duration_s=0.0)

    monkeypatch.setattr(FakeAgent, "exec", refuse)
    caplog.set_level(logging.DEBUG)
    answer = client.post("/api/v1/credentials/keys", json={"provider": "codex", "kind": "api_key", "key": OPENAI_KEY},
                         headers=alice)
    assert answer.status_code == 502 and answer.json()["code"] == "key_delivery_failed"
    assert "credentials.key_delivery_failed" in _events_text(ctx)
    assert OPENAI_KEY not in answer.text + caplog.text + _events_text(ctx)


def test_sealed_key_repr_and_vm_manager_untouched_on_validation(ctx: AppContext) -> None:
    principal = users_service.Principal(user_id="u1", name="alice", is_admin=False)
    sealed = key_signin.seal(ctx, principal, "gemini", "api_key", GEMINI_KEY)
    assert GEMINI_KEY not in repr(sealed) and GEMINI_KEY.encode() not in sealed.ciphertext
    assert vm_manager.live_cli_vm(ctx, "u1") is None


# -- the dashboard ---------------------------------------------------------------------------------


def _dashboard_login(ctx: AppContext, client: TestClient, name: str) -> str:
    import re

    user = users_service.create_user(ctx.db, name)
    users_service.set_password(ctx.db, name, "correct horse battery")
    client.cookies.clear()
    login_csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
    assert login_csrf
    client.post("/login", data={"username": name, "password": "correct horse battery",
                                "csrf_token": login_csrf.group(1)})
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/dashboard").text)
    assert csrf and user
    return csrf.group(1)


def test_dashboard_health_card_check_now_and_key_form(
        ctx: AppContext, client: TestClient, fake_driver: FakeDriver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    csrf = _dashboard_login(ctx, client, "dora")
    page = client.get("/dashboard").text
    assert 'id="credential-health" data-workspace="none"' in page and "Check now (starts your workspace)" in page
    assert fake_driver.running_ids() == set()
    checked = client.post("/dashboard/credentials/health", data={"csrf_token": csrf})
    assert checked.status_code == 200 and 'data-workspace="running"' in checked.text
    assert checked.text.count('class="btn btn-primary btn-small reauthenticate"') == 3
    bad = client.post("/dashboard/credentials/keys",
                      data={"csrf_token": csrf, "provider_kind": "gemini:api_key", "key": OPENAI_KEY})
    assert bad.status_code == 422 and "looks like an OpenAI API key" in bad.text and OPENAI_KEY not in bad.text
    no_csrf = client.post("/dashboard/credentials/keys", data={"provider_kind": "gemini:api_key", "key": GEMINI_KEY})
    assert no_csrf.status_code == 403
    done = client.post("/dashboard/credentials/keys", follow_redirects=False,
                       data={"csrf_token": csrf, "provider_kind": "gemini:api_key", "key": GEMINI_KEY})
    assert done.status_code == 303 and done.headers["location"] == "/dashboard?notice=key"
    page = client.get("/dashboard?notice=key").text
    assert 'data-provider="gemini" data-state="signed_in"' in page and "Signed in with an API key" in page
    assert GEMINI_KEY not in page + caplog.text and OPENAI_KEY not in caplog.text
