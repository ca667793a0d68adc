"""The main flow with real parts: QEMU guests, Chromium on Xvfb in the Browser VM, a real IdP,
the controller's VNC websocket proxy driven like noVNC (keyboard events over RFB), and the
credential files checked inside the CLI VM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Event, utcnow
from remotecli.domain.states import VmStatus
from remotecli.services import vm_manager
from remotecli.services.transitions import set_vm_status
from tests.e2e.conftest import IDP_PASSWORD, PLANTED_ACCESS, PLANTED_REFRESH, Controller
from tests.support.cli_judge import assert_cli_signed_in
from tests.support.rfb import RfbClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]


def _oauth_state(ctx: AppContext, session_id: str) -> dict[str, Any]:
    """What the OAuth agent in the Browser VM reports (the test's view of the screen's title)."""
    with ctx.db.read() as db:
        auth = db.get(AuthSession, session_id)
        assert auth is not None and auth.browser_vm_id and auth.oauth_flow_id
    vm = vm_manager.get_vm(ctx, None, auth.browser_vm_id)
    agent = ctx.agent(vm)
    try:
        return agent.oauth_status(auth.oauth_flow_id).model_dump(mode="json")
    finally:
        agent.close()


def _wait_title(ctx: AppContext, session_id: str, text: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = _oauth_state(ctx, session_id)
        if text in (state.get("page_title") or ""):
            return state
        time.sleep(0.5)
    raise AssertionError(f"page '{text}' never appeared: {state.get('page_title')!r} {state.get('status')}")


def _start(controller: Controller, provider: str) -> dict[str, Any]:
    response = controller.api("POST", "/api/v1/auth-sessions", json={"provider": provider})
    assert response.status_code == 201, response.text
    body = controller.wait_status(response.json()["id"], {"awaiting_user", "failed"})
    assert body["status"] == "awaiting_user", body
    body = controller.api("GET", f"/api/v1/auth-sessions/{body['id']}?vnc=1").json()  # a status poll has none
    assert body["vnc_url"]
    return body


def _log_in_over_vnc(controller: Controller, body: dict[str, Any], user: str = "alice",
                     before_consent: Any = None, consent: str = "allow") -> None:
    """Type the login like a person at the embedded view: username, Tab, password, Enter; if the
    page is still the login form a while later (keys typed before the form had focus), type again."""
    _wait_title(controller.ctx, body["id"], "Sign in")
    time.sleep(2)  # let the freshly drawn page settle, as a person would look before typing
    with RfbClient(body["vnc_url"]) as rfb:
        assert rfb.width >= 800 and rfb.height >= 600
        for attempt in range(3):
            rfb.type_text(user)
            rfb.press("Tab")
            rfb.type_text(IDP_PASSWORD)
            rfb.press("Return")
            try:
                _wait_title(controller.ctx, body["id"], "Authorize", timeout=60 if attempt < 2 else 180)
                break
            except AssertionError:
                if attempt == 2:
                    raise
        time.sleep(1)
        if before_consent:
            before_consent()
        if consent == "deny":
            rfb.press("Tab")  # from the autofocused "Allow" to "Deny"
        rfb.press("Return")
        time.sleep(1)
        assert rfb.bytes_received > 1000  # the screen really streamed


def _read_in_cli_vm(controller: Controller, vm_id: str, path: str) -> tuple[dict[str, Any], int, str]:
    vm = vm_manager.get_vm(controller.ctx, None, vm_id)
    agent = controller.ctx.agent(vm)
    try:
        content = agent.read_file(path)
    finally:
        agent.close()
    return json.loads(content.data), content.mode & 0o777, content.owner


def _assert_browser_gone(controller: Controller, session_id: str) -> None:
    events = controller.ctx.db
    with events.read() as db:
        auth = db.get(AuthSession, session_id)
        assert auth is not None
    browser = vm_manager.get_vm(controller.ctx, None, auth.browser_vm_id or "")
    deadline = time.monotonic() + 60
    while browser.status != "destroyed" and time.monotonic() < deadline:
        time.sleep(0.5)
        browser = vm_manager.get_vm(controller.ctx, None, browser.id)
    assert browser.status == "destroyed"
    assert not Path(browser.directory).exists()


def _assert_no_tokens_anywhere(controller: Controller, session_id: str) -> None:
    with controller.ctx.db.read() as db:
        events = [f"{e.message} {e.details}" for e in db.query(Event).all()]
        auth = db.get(AuthSession, session_id)
        assert auth is not None and auth.credential_enc is None
    # Every column of every table, as stored (the encrypted columns hold only ciphertext).
    from sqlalchemy import text

    from remotecli.db.models import Base

    dump: list[str] = []
    with controller.ctx.db.engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            for row in connection.execute(text(f"SELECT * FROM {table.name}")):
                dump.extend(repr(value) for value in row)
    database = "\n".join(dump)
    log_file = controller.ctx.settings.logs_dir / "controller.log"
    logs = log_file.read_text() if log_file.exists() else ""
    for secret in (PLANTED_ACCESS, PLANTED_REFRESH):
        assert all(secret not in text for text in controller.responses)
        assert all(secret not in text for text in events)
        assert secret not in logs
        assert secret not in database


def test_claude_code_login_over_vnc_from_the_seeds_state(controller: Controller, caplog: Any) -> None:
    """The seed replayed: the user's only CLI VM row is `failed` and its directory is gone."""
    ctx = controller.ctx
    stale = vm_manager.create_vm(ctx, controller.principal, "cli")
    ctx.driver.stop(vm_manager.spec_of(ctx, stale), 1)
    with ctx.db.transaction() as db:
        set_vm_status(db, stale, VmStatus.FAILED, module="test", message="failed earlier", reason="test")
    shutil.rmtree(stale.directory)
    started = utcnow()

    body = _start(controller, "claude_code")
    assert body["cli_vm_id"] != stale.id
    _log_in_over_vnc(controller, body)
    done = controller.wait_status(body["id"], {"completed", "failed"})
    assert done["status"] == "completed", done
    assert done["credential"]["account"] == "alice@example.test"

    creds, mode, owner = _read_in_cli_vm(controller, done["cli_vm_id"], "/home/cli/.claude/.credentials.json")
    oauth = creds["claudeAiOauth"]
    assert (oauth["accessToken"], oauth["refreshToken"]) == (PLANTED_ACCESS, PLANTED_REFRESH)
    assert isinstance(oauth["expiresAt"], int) and oauth["expiresAt"] > time.time() * 1000
    assert mode == 0o600 and owner == "cli"
    state, mode, owner = _read_in_cli_vm(controller, done["cli_vm_id"], "/home/cli/.claude.json")
    assert state["oauthAccount"]["emailAddress"] == "alice@example.test" and state["hasCompletedOnboarding"]
    # Account state from the token answer's account/organization objects; 8 h access like Anthropic's.
    assert state["oauthAccount"]["organizationUuid"] == "org-alice"
    assert state["oauthAccount"]["accountUuid"] == "account-alice"
    assert oauth["expiresAt"] > (time.time() + 28000) * 1000
    assert mode == 0o600 and owner == "cli"
    # The stale VM was never resumed or touched after the session began.
    assert vm_manager.get_vm(ctx, None, stale.id).status == "failed"
    with ctx.db.read() as db:
        touched = db.query(Event).filter(Event.vm_id == stale.id, Event.at >= started).count()
    assert touched == 0
    _assert_browser_gone(controller, body["id"])
    _assert_no_tokens_anywhere(controller, body["id"])
    assert PLANTED_ACCESS not in caplog.text
    # The real Claude Code in the CLI VM, offline, takes the delivered files as a claude.ai login.
    assert_cli_signed_in(ctx, done["cli_vm_id"], "claude_code")


def test_codex_cli_vm_killed_after_login_before_transfer(controller: Controller) -> None:
    body = _start(controller, "codex")
    first_cli = body["cli_vm_id"]
    assert first_cli, body  # the CLI VM was prepared while the Browser VM booted

    def kill_cli_vm() -> None:
        pid = int((Path(vm_manager.get_vm(controller.ctx, None, first_cli).directory) / "qemu.pid").read_text())
        os.kill(pid, signal.SIGKILL)

    _log_in_over_vnc(controller, body, before_consent=kill_cli_vm)
    done = controller.wait_status(body["id"], {"completed", "failed"})
    assert done["status"] == "completed", done
    assert done["cli_vm_id"] != first_cli
    auth_json, mode, _ = _read_in_cli_vm(controller, done["cli_vm_id"], "/home/cli/.codex/auth.json")
    assert auth_json["auth_mode"] == "chatgpt" and auth_json["OPENAI_API_KEY"] is None
    assert auth_json["tokens"]["access_token"] == PLANTED_ACCESS
    assert auth_json["tokens"]["refresh_token"] == PLANTED_REFRESH
    assert auth_json["tokens"]["id_token"] and auth_json["last_refresh"]
    assert mode == 0o600
    timeline = controller.api("GET", f"/api/v1/auth-sessions/{body['id']}/events").json()["items"]
    assert any(first_cli in e["message"] and "not usable" in e["message"] for e in timeline), timeline
    assert vm_manager.get_vm(controller.ctx, None, first_cli).status == "failed"
    _assert_browser_gone(controller, body["id"])
    _assert_no_tokens_anywhere(controller, body["id"])
    assert_cli_signed_in(controller.ctx, done["cli_vm_id"], "codex")  # the real Codex, offline


def test_gemini_wrong_state_is_refused_then_login_completes(controller: Controller) -> None:
    body = _start(controller, "gemini")
    state = _wait_title(controller.ctx, body["id"], "Sign in")
    redirect = state["redirect_uri"]
    browser = vm_manager.get_vm(controller.ctx, None, _browser_id(controller, body["id"]))
    agent = controller.ctx.agent(browser)
    try:
        probe = agent.exec(["python3", "-c", (
            "import urllib.request,urllib.error,sys\n"
            f"try: urllib.request.urlopen('{redirect}?code=forged&state=wrong'); print(200)\n"
            "except urllib.error.HTTPError as e: print(e.code)")], timeout_s=60)
    finally:
        agent.close()
    assert probe.stdout.strip() == b"400"
    assert _oauth_state(controller.ctx, body["id"])["refused_callbacks"] == 1
    assert controller.api("GET", f"/api/v1/auth-sessions/{body['id']}").json()["status"] == "awaiting_user"
    _log_in_over_vnc(controller, controller.api("GET", f"/api/v1/auth-sessions/{body['id']}?vnc=1").json())
    done = controller.wait_status(body["id"], {"completed", "failed"})
    assert done["status"] == "completed", done
    creds, mode, _ = _read_in_cli_vm(controller, done["cli_vm_id"], "/home/cli/.gemini/oauth_creds.json")
    assert creds["access_token"] == PLANTED_ACCESS and creds["refresh_token"] == PLANTED_REFRESH
    assert isinstance(creds["expiry_date"], int) and creds["token_type"] and mode == 0o600
    settings, _, _ = _read_in_cli_vm(controller, done["cli_vm_id"], "/home/cli/.gemini/settings.json")
    assert settings["security"]["auth"]["selectedType"] == "oauth-personal"
    _assert_browser_gone(controller, body["id"])
    assert_cli_signed_in(controller.ctx, done["cli_vm_id"], "gemini")  # the real Gemini CLI, offline


def _browser_id(controller: Controller, session_id: str) -> str:
    with controller.ctx.db.read() as db:
        auth = db.get(AuthSession, session_id)
        assert auth is not None and auth.browser_vm_id
        return auth.browser_vm_id


def test_denied_consent_fails_with_oauth_denied(controller: Controller) -> None:
    body = _start(controller, "claude_code")
    _log_in_over_vnc(controller, body, consent="deny")
    done = controller.wait_status(body["id"], {"completed", "failed"})
    assert done["status"] == "failed" and done["error_code"] == "oauth_denied"
    assert "declined" in done["message"]
    _assert_browser_gone(controller, body["id"])


def test_expired_session_ends_expired_without_browser(controller: Controller) -> None:
    body = _start(controller, "claude_code")
    with controller.ctx.db.transaction() as db:
        auth = db.get(AuthSession, body["id"])
        assert auth is not None
        auth.expires_at = utcnow()  # the clock ran out while the user looked away
    done = controller.wait_status(body["id"], {"expired", "failed", "completed"}, timeout=60)
    assert done["status"] == "expired" and done["vnc_url"] is None
    _assert_browser_gone(controller, body["id"])
