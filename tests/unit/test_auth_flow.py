"""The sign-in flow's control logic on a real database with the fake driver and fake OAuth agent.

The real thing (QEMU guests, Chromium, a real IdP, VNC) is proven in tests/e2e; here every branch
of the state machine is exercised quickly on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from remotecli.app import create_app
from remotecli.background import signins
from remotecli.background.reconciler import Reconciler
from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Event
from remotecli.domain.states import VmStatus
from remotecli.drivers.fake import FakeDriver
from remotecli.errors import AuthSessionEnded, UnknownProvider
from remotecli.notifier import Topic
from remotecli.services import auth_flow, credentials, tickets, vm_manager
from remotecli.services import users as users_service
from remotecli.services.transitions import set_vm_status
from remotecli.services.users import Principal

TOKENS = {
    "access_token": "at-PLANTED-0123456789abcdef",
    "refresh_token": "rt-PLANTED-0123456789abcdef",
    "expires_in": 3600,
    "scope": "openid email offline_access",
    "token_type": "Bearer",
}


@pytest.fixture
def alice(ctx: AppContext) -> Principal:
    user = users_service.create_user(ctx.db, "alice")
    return Principal(user.id, user.name, False)


@pytest.fixture
def runner(ctx: AppContext) -> Iterator[signins.SigninWorker]:
    r = signins.SigninWorker(ctx, interval_s=0.05)
    r.start()
    yield r
    r.stop()


def wait_for(ctx: AppContext, session_id: str, predicate: Callable[[AuthSession], bool],
             timeout: float = 20) -> AuthSession:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        auth = auth_flow.get_session(ctx, None, session_id)
        if predicate(auth):
            return auth
        time.sleep(0.05)
    raise AssertionError(f"session stuck in {auth.status}: {auth.message}")


def status_is(*statuses: str) -> Callable[[AuthSession], bool]:
    return lambda auth: auth.status in statuses


def _cli_file(fake_driver: FakeDriver, vm_id: str, path: str) -> tuple[bytes, int, str | None]:
    return fake_driver._vms[vm_id].files[path]


def _events(ctx: AppContext, session_id: str) -> list[Event]:
    return auth_flow.session_events(ctx, None, session_id)


def test_happy_path_delivers_0600_files_and_forgets_tokens(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, runner: signins.SigninWorker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    auth = auth_flow.start_session(ctx, alice, "claude_code")
    auth = wait_for(ctx, auth.id, status_is("awaiting_user"))
    assert auth.browser_vm_id and auth.cli_vm_id and auth.message and "Log in" in auth.message
    fake_driver.login_outcome = ("complete", TOKENS)
    auth = wait_for(ctx, auth.id, status_is("completed"))
    data, mode, owner = _cli_file(fake_driver, auth.cli_vm_id or "", "/home/cli/.claude/.credentials.json")
    body = json.loads(data)
    assert body["claudeAiOauth"]["accessToken"] == TOKENS["access_token"]
    assert body["claudeAiOauth"]["refreshToken"] == TOKENS["refresh_token"]
    assert mode == 0o600 and owner == "cli"
    assert auth.credential_enc is None and auth.delivered_at is not None
    assert auth.credential_meta and "access_token" not in json.dumps(auth.credential_meta)
    browser = vm_manager.get_vm(ctx, None, auth.browser_vm_id or "")
    assert browser.status == "destroyed"
    statuses = [e.to_status for e in _events(ctx, auth.id) if e.kind == "auth.status"]
    assert statuses == ["pending", "provisioning", "awaiting_user", "exchanging", "transferring", "completed"]
    everything = caplog.text + " ".join(f"{e.message} {e.details}" for e in _events(ctx, auth.id))
    assert TOKENS["access_token"] not in everything and TOKENS["refresh_token"] not in everything


def test_claude_json_is_merged_not_replaced(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, runner: signins.SigninWorker,
) -> None:
    """~/.claude.json also holds the user's Claude Code settings and projects: delivery keeps them."""
    cli, _ = vm_manager.ensure_cli_vm(ctx, alice)
    existing = {"theme": "dark", "projects": {"/home/cli/app": {"allowedTools": ["Bash"]}},
                "oauthAccount": {"emailAddress": "old@example.test"}}
    fake_driver._vms[cli.id].files["/home/cli/.claude.json"] = (json.dumps(existing).encode(), 0o644, "cli")
    fake_driver.login_outcome = ("complete", {**TOKENS, "account": {"email_address": "alice@example.test"}})
    auth = wait_for(ctx, auth_flow.start_session(ctx, alice, "claude_code").id, status_is("completed", "failed"))
    assert auth.status == "completed" and auth.cli_vm_id == cli.id, auth.message
    data, mode, owner = _cli_file(fake_driver, cli.id, "/home/cli/.claude.json")
    merged = json.loads(data)
    assert merged["theme"] == "dark" and merged["projects"] == existing["projects"]
    assert merged["oauthAccount"] == {"emailAddress": "alice@example.test"} and merged["hasCompletedOnboarding"]
    assert mode == 0o600 and owner == "cli"


@pytest.mark.parametrize("provider,path,check", [
    ("codex", "/home/cli/.codex/auth.json",
     lambda b: b["auth_mode"] == "chatgpt" and b["tokens"]["access_token"] == TOKENS["access_token"]),
    ("gemini", "/home/cli/.gemini/oauth_creds.json",
     lambda b: b["access_token"] == TOKENS["access_token"] and isinstance(b["expiry_date"], int)),
])
def test_other_providers_file_shapes(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, runner: signins.SigninWorker,
    provider: str, path: str, check: Callable[[dict[str, object]], bool],
) -> None:
    fake_driver.login_outcome = ("complete", {**TOKENS, "id_token": "x.eyJzdWIiOiAiMTIzIn0.y"})
    auth = auth_flow.start_session(ctx, alice, provider)
    auth = wait_for(ctx, auth.id, status_is("completed"))
    data, mode, _ = _cli_file(fake_driver, auth.cli_vm_id or "", path)
    assert check(json.loads(data)) and mode == 0o600


def test_seed_replayed_failed_cli_vm_with_directory_gone(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, runner: signins.SigninWorker,
) -> None:
    stale = vm_manager.create_vm(ctx, alice, "cli")
    with ctx.db.transaction() as session:
        set_vm_status(session, stale, VmStatus.FAILED, module="test", message="died earlier", reason="test")
    fake_driver.kill(stale.id)  # as in the seed, its process is gone too (else fencing kills it: ADR 0011)
    shutil.rmtree(stale.directory)
    fake_driver.calls.clear()
    fake_driver.login_outcome = ("complete", TOKENS)
    auth = wait_for(ctx, auth_flow.start_session(ctx, alice, "claude_code").id, status_is("completed", "failed"))
    assert auth.status == "completed" and auth.cli_vm_id != stale.id
    assert all(vm_id != stale.id for _, vm_id in fake_driver.calls)  # never resumed or touched


def test_seed_replayed_running_row_with_directory_gone_is_skipped(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, runner: signins.SigninWorker,
) -> None:
    stale = vm_manager.create_vm(ctx, alice, "cli")
    shutil.rmtree(stale.directory)  # the row still says running
    fake_driver.login_outcome = ("complete", TOKENS)
    auth = wait_for(ctx, auth_flow.start_session(ctx, alice, "claude_code").id, status_is("completed", "failed"))
    assert auth.status == "completed" and auth.cli_vm_id != stale.id
    kinds = [(e.kind, e.vm_id) for e in _events(ctx, auth.id)]
    assert ("vm.skipped", stale.id) in kinds
    assert vm_manager.get_vm(ctx, alice, stale.id).status == "failed"


def test_cli_vm_killed_before_transfer_still_completes(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, runner: signins.SigninWorker,
) -> None:
    auth = wait_for(ctx, auth_flow.start_session(ctx, alice, "claude_code").id, status_is("awaiting_user"))
    first_cli = auth.cli_vm_id or ""
    fake_driver.kill(first_cli)  # dies after the user logged in, before the transfer
    fake_driver.login_outcome = ("complete", TOKENS)
    auth = wait_for(ctx, auth.id, status_is("completed", "failed"))
    assert auth.status == "completed" and auth.cli_vm_id and auth.cli_vm_id != first_cli
    assert _cli_file(fake_driver, auth.cli_vm_id, "/home/cli/.claude/.credentials.json")[1] == 0o600
    messages = [e.message for e in _events(ctx, auth.id)]
    assert any("not usable" in m and first_cli in m for m in messages), messages
    assert vm_manager.get_vm(ctx, alice, first_cli).status == "failed"


def test_denied_consent_fails_with_code_and_cleans_up(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, runner: signins.SigninWorker,
) -> None:
    auth = wait_for(ctx, auth_flow.start_session(ctx, alice, "claude_code").id, status_is("awaiting_user"))
    fake_driver.login_outcome = ("deny", None)
    auth = wait_for(ctx, auth.id, status_is("failed"))
    assert auth.error_code == "oauth_denied" and "declined" in (auth.error_message or "")
    wait_for(ctx, auth.id, lambda a: vm_manager.get_vm(ctx, None, a.browser_vm_id or "").status == "destroyed")


def test_expiry_and_cancel_end_the_session_and_its_browser(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, runner: signins.SigninWorker,
) -> None:
    ctx.settings.auth_session_ttl_s = 1.5
    auth = auth_flow.start_session(ctx, alice, "gemini")
    auth = wait_for(ctx, auth.id, status_is("expired"))
    wait_for(ctx, auth.id, lambda a: vm_manager.get_vm(ctx, None, a.browser_vm_id or "").status == "destroyed")
    ctx.settings.auth_session_ttl_s = 900
    other = wait_for(ctx, auth_flow.start_session(ctx, alice, "gemini").id, status_is("awaiting_user"))
    assert auth_flow.cancel_session(ctx, alice, other.id).status == "cancelled"
    with pytest.raises(AuthSessionEnded):
        auth_flow.cancel_session(ctx, alice, other.id)
    wait_for(ctx, other.id, lambda a: vm_manager.get_vm(ctx, None, a.browser_vm_id or "").status == "destroyed")
    assert fake_driver.running_ids() == {other.cli_vm_id}


def test_unknown_provider_changes_nothing(ctx: AppContext, alice: Principal) -> None:
    with pytest.raises(UnknownProvider):
        auth_flow.start_session(ctx, alice, "myspace")
    assert auth_flow.list_sessions(ctx, alice) == []


def test_abandoned_lease_is_taken_over(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    """A controller that died mid-flow: its lease expires and another worker finishes the session."""
    auth = auth_flow.start_session(ctx, alice, "claude_code")
    assert signins.claim_sessions(ctx, "dead-controller") == [auth.id]
    assert signins.claim_sessions(ctx, "live-controller") == []  # the lease holds
    with ctx.db.transaction() as session:
        row = session.get(AuthSession, auth.id)
        assert row is not None
        row.lease_expires_at = row.created_at  # the dead controller never renewed it
    fake_driver.login_outcome = ("complete", TOKENS)
    assert signins.claim_sessions(ctx, "live-controller") == [auth.id]
    signins.run_session(ctx, auth.id, "live-controller")
    assert auth_flow.get_session(ctx, None, auth.id).status == "completed"


def test_api_sessions_and_vnc_ticket(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver,
) -> None:
    user_b = users_service.create_user(ctx.db, "bob")
    _, token_a = users_service.create_token(ctx.db, users_service.get_user_by_name(ctx.db, "alice"))
    _, token_b = users_service.create_token(ctx.db, user_b)
    a = {"Authorization": f"Bearer {token_a}"}
    b = {"Authorization": f"Bearer {token_b}"}
    with TestClient(create_app(ctx, background=True)) as client:
        providers = client.get("/api/v1/providers", headers=a).json()["items"]
        assert {p["name"] for p in providers} >= {"claude_code", "codex", "gemini"}
        assert "client_secret" not in json.dumps(providers)
        bad = client.post("/api/v1/auth-sessions", json={"provider": "nope"}, headers=a)
        assert bad.status_code == 422 and bad.json()["code"] == "unknown_provider"
        created = client.post("/api/v1/auth-sessions", json={"provider": "claude_code"}, headers=a)
        assert created.status_code == 201
        session_id = created.json()["id"]
        assert client.get(f"/api/v1/auth-sessions/{session_id}", headers=b).status_code == 404
        assert client.get(f"/api/v1/auth-sessions/{session_id}/events", headers=b).status_code == 404
        assert client.delete(f"/api/v1/auth-sessions/{session_id}", headers=b).status_code == 404
        wait_for(ctx, session_id, status_is("awaiting_user"))
        body = client.get(f"/api/v1/auth-sessions/{session_id}?vnc=1", headers=a).json()
        assert body["vnc_url"].startswith("ws://") and "token=" in body["vnc_url"]
        ticket = body["vnc_url"].split("token=")[1]
        # A ticket is single-use, bound to its session, and useless to anyone else's session.
        assert tickets.redeem_ticket(ctx, ticket, "vnc", session_id) == alice.user_id
        with pytest.raises(Exception, match="expired or was already used"):
            tickets.redeem_ticket(ctx, ticket, "vnc", session_id)
        fake_driver.login_outcome = ("complete", TOKENS)
        wait_for(ctx, session_id, status_is("completed"))
        done = client.get(f"/api/v1/auth-sessions/{session_id}", headers=a)
        assert done.json()["vnc_url"] is None and done.json()["credential"] is not None
        timeline = client.get(f"/api/v1/auth-sessions/{session_id}/events", headers=a).json()["items"]
        assert timeline[0]["to_status"] == "pending" and timeline[-1]["to_status"] == "completed"
        for response in (created, done):
            assert TOKENS["access_token"] not in response.text
        assert TOKENS["refresh_token"] not in json.dumps(timeline)
    with ctx.db.read() as session:
        rows = list(session.scalars(select(AuthSession)))
    assert all(row.credential_enc is None for row in rows)


def test_live_sessions_per_user_are_limited(ctx: AppContext, alice: Principal) -> None:
    from remotecli.errors import TooManyAuthSessions

    ctx.settings.max_live_auth_sessions_per_user = 2
    first = auth_flow.start_session(ctx, alice, "claude_code")
    auth_flow.start_session(ctx, alice, "codex")
    with pytest.raises(TooManyAuthSessions):
        auth_flow.start_session(ctx, alice, "gemini")
    assert len(auth_flow.list_sessions(ctx, alice)) == 2
    auth_flow.cancel_session(ctx, alice, first.id)  # ending one frees a place
    assert auth_flow.start_session(ctx, alice, "gemini").status == "pending"


# ----------------------------------------------------------------------------------------------
# A CLI VM dead before the transfer: whoever finds it first, the timeline says it was skipped.


def _awaiting_with_cli(ctx: AppContext, alice: Principal, provider: str = "codex") -> tuple[str, str]:
    auth = wait_for(ctx, auth_flow.start_session(ctx, alice, provider).id, status_is("awaiting_user"))
    assert auth.cli_vm_id
    return auth.id, auth.cli_vm_id


def _completes_saying_skipped(ctx: AppContext, fake_driver: FakeDriver, session_id: str, first_cli: str) -> str:
    """Log in; the session completes on another CLI VM and its timeline says, once, that
    ``first_cli`` was skipped and why (it is dead). Returns the CLI VM it completed on."""
    fake_driver.login_outcome = ("complete", TOKENS)
    auth = wait_for(ctx, session_id, status_is("completed", "failed"))
    assert auth.status == "completed" and auth.cli_vm_id and auth.cli_vm_id != first_cli, auth.message
    replaced = [e for e in _events(ctx, session_id) if e.kind == credentials.CLI_VM_REPLACED]
    assert [e.vm_id for e in replaced] == [first_cli]
    assert first_cli in replaced[0].message and "not usable" in replaced[0].message
    assert "dead" in replaced[0].message  # the reason, whoever found it
    return auth.cli_vm_id


def test_cli_vm_failed_by_the_reconciler_before_delivery_is_on_the_timeline(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, runner: signins.SigninWorker,
) -> None:
    session_id, first_cli = _awaiting_with_cli(ctx, alice)
    fake_driver.kill(first_cli)
    Reconciler(ctx).run_once()  # the reconciler notices first and fails it
    assert vm_manager.get_vm(ctx, None, first_cli).status == "failed"
    _completes_saying_skipped(ctx, fake_driver, session_id, first_cli)


def test_cli_vm_failed_by_ensure_before_delivery_is_on_the_timeline(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, runner: signins.SigninWorker,
) -> None:
    session_id, first_cli = _awaiting_with_cli(ctx, alice)
    fake_driver.kill(first_cli)
    # Someone else asks for the user's workspace first (e.g. the terminal): ensure skips the dead VM.
    replacement, created = vm_manager.ensure_cli_vm(ctx, alice)
    assert created and vm_manager.get_vm(ctx, None, first_cli).status == "failed"
    assert _completes_saying_skipped(ctx, fake_driver, session_id, first_cli) == replacement.id


def test_cli_vm_dead_at_the_liveness_proof_is_on_the_timeline_once(
    ctx: AppContext, alice: Principal, fake_driver: FakeDriver, runner: signins.SigninWorker,
) -> None:
    session_id, first_cli = _awaiting_with_cli(ctx, alice)
    fake_driver.kill(first_cli)  # nobody notices until the delivery proves the VM alive
    assert vm_manager.get_vm(ctx, None, first_cli).status == "running"
    _completes_saying_skipped(ctx, fake_driver, session_id, first_cli)
    failed = vm_manager.get_vm(ctx, None, first_cli)
    assert failed.status == "failed" and "not usable for delivery" in (failed.status_reason or "")


# ----------------------------------------------------------------------------------------------
# The worker's machinery: woken by the notifier, its own futures on stop, the registry once


def test_start_session_wakes_the_worker_through_the_notifier(ctx: AppContext, alice: Principal) -> None:
    worker = signins.SigninWorker(ctx, interval_s=3600)  # passes only when woken
    worker.start()
    try:
        auth = auth_flow.start_session(ctx, alice, "claude_code")
        wait_for(ctx, auth.id, status_is("awaiting_user"), timeout=10)
    finally:
        worker.stop()
    assert worker.running() == set()
    with ctx.db.read() as session:
        row = session.get(AuthSession, auth.id)
        assert row is not None and row.lease_owner is None  # released on stop; the next worker goes on
    ctx.notifier.notify(Topic.AUTH_SESSIONS)  # a stopped worker has unsubscribed: nothing happens


def test_stop_waits_for_its_own_workers(ctx: AppContext, alice: Principal, fake_driver: FakeDriver) -> None:
    worker = signins.SigninWorker(ctx, interval_s=0.05)
    worker.start()
    auth = auth_flow.start_session(ctx, alice, "gemini")
    wait_for(ctx, auth.id, status_is("awaiting_user"))
    assert worker.running() == {auth.id}
    worker.stop()
    assert worker.running() == set()
    assert auth_flow.get_session(ctx, None, auth.id).status == "awaiting_user"  # left for the next worker


def test_provider_registry_is_built_once_per_context(ctx: AppContext, monkeypatch: pytest.MonkeyPatch) -> None:
    from remotecli import profiles as providers

    calls = []
    real = providers.load_profiles

    def counting(*args: object, **kwargs: object) -> dict[str, providers.ProviderProfile]:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(providers, "load_profiles", counting)
    assert {"claude_code", "codex", "gemini"} <= set(ctx.providers)
    assert ctx.providers["codex"].display_name == ctx.providers.display_name("codex")
    assert ctx.providers.display_name("gone") == "gone"
    assert len(calls) == 1
    monkeypatch.setenv("REMOTECLI_PROVIDER_CODEX_CLIENT_ID", "changed-id")
    assert ctx.providers["codex"].client_id != "changed-id"  # read once
    ctx.providers.reload()
    assert ctx.providers["codex"].client_id == "changed-id" and len(calls) == 2
