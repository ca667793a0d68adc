"""Dashboard: login, logout, cookie flags, CSRF, and who may see what (fake driver, both databases)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select

from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.db.models import ApiToken, AuthSession, User, utcnow
from remotecli.domain.states import AuthStatus
from remotecli.errors import AuthenticationRequired, InvalidInput
from remotecli.services import auth_flow, vm_manager
from remotecli.services import dashboard_sessions as sessions
from remotecli.services import users as users_service
from remotecli.services.transitions import set_auth_status
from remotecli.services.users import Principal
from remotecli.web import routes

PASSWORD = "correct horse battery"


@pytest.fixture
def client(ctx: AppContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx, background=False), raise_server_exceptions=False) as test_client:
        yield test_client


def _user(ctx: AppContext, name: str, admin: bool = False) -> Principal:
    user = users_service.create_user(ctx.db, name, is_admin=admin)
    users_service.set_password(ctx.db, name, PASSWORD)
    return Principal(user.id, user.name, admin)


def _login_csrf(client: TestClient) -> str:
    page = client.get("/login")
    assert page.status_code == 200
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match
    return match.group(1)


def _login(client: TestClient, name: str, password: str = PASSWORD, next_path: str = "/dashboard") -> Any:
    token = _login_csrf(client)
    return client.post("/login", data={"username": name, "password": password, "csrf_token": token,
                                       "next": next_path}, follow_redirects=False)


def _page_csrf(client: TestClient, path: str = "/dashboard") -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', client.get(path).text)
    assert match
    return match.group(1)


# ----------------------------------------------------------------------------------------------
# Passwords


def test_passwords_are_argon2id_and_verified(ctx: AppContext) -> None:
    users_service.create_user(ctx.db, "alice")
    with pytest.raises(InvalidInput):
        users_service.set_password(ctx.db, "alice", "short")
    users_service.set_password(ctx.db, "alice", PASSWORD)
    with ctx.db.read() as db:
        stored = db.scalars(select(User.password_hash).where(User.name == "alice")).one()
    assert stored is not None and stored.startswith("$argon2id$") and PASSWORD not in stored
    assert users_service.verify_password(ctx.db, "alice", PASSWORD).name == "alice"
    assert users_service.verify_password(ctx.db, " Alice ", PASSWORD).name == "alice"
    for name, password in (("alice", PASSWORD + "x"), ("nobody", PASSWORD), ("alice", "")):
        with pytest.raises(AuthenticationRequired) as info:
            users_service.verify_password(ctx.db, name, password)
        assert info.value.message == "That user name and password do not match."


def test_user_without_password_cannot_log_in(ctx: AppContext) -> None:
    users_service.create_user(ctx.db, "tokenonly")
    with pytest.raises(AuthenticationRequired):
        users_service.verify_password(ctx.db, "tokenonly", "")


def test_cli_set_password_from_stdin(ctx: AppContext, monkeypatch: pytest.MonkeyPatch) -> None:
    from remotecli.cli.main import main

    monkeypatch.setenv("REMOTECLI_DATA_DIR", str(ctx.settings.data_dir))
    monkeypatch.setenv("REMOTECLI_DATABASE_URL", ctx.settings.effective_database_url)
    users_service.create_user(ctx.db, "carol")
    result = CliRunner().invoke(main, ["users", "set-password", "carol", "--password-stdin"], input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    assert users_service.verify_password(ctx.db, "carol", PASSWORD).name == "carol"
    short = CliRunner().invoke(main, ["users", "set-password", "carol", "--password-stdin"], input="abc\n")
    assert short.exit_code == 2 and "at least" in short.output
    missing = CliRunner().invoke(main, ["users", "set-password", "nobody", "--password-stdin"], input=PASSWORD)
    assert missing.exit_code == 1


# ----------------------------------------------------------------------------------------------
# Login, logout, cookies


def test_pages_redirect_to_login_when_signed_out(client: TestClient) -> None:
    for path in ("/dashboard", "/dashboard/remote-cli/auth?session=x", "/dashboard/remote-cli/terminal", "/admin"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/login?next=%2F")
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"


def test_login_sets_a_strict_session_cookie_and_logout_revokes_it(ctx: AppContext, client: TestClient) -> None:
    _user(ctx, "alice")
    response = _login(client, "alice", next_path="/dashboard/remote-cli/terminal")
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/remote-cli/terminal"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("rcli_session="))
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in flags and "samesite=lax" in flags and "path=/" in flags
    assert "secure" not in flags  # plain http here
    token = client.cookies.get("rcli_session")
    assert token and token.startswith("rcls_")
    # The cookie is not a bearer token, and the server keeps only its hash.
    assert client.get("/api/v1/vms", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    with ctx.db.read() as db:
        row = db.scalars(select(ApiToken).where(ApiToken.name == sessions.SESSION_NAME)).one()
    assert row.token_hash != token and row.expires_at is not None

    page = client.get("/dashboard")
    assert page.status_code == 200 and "alice" in page.text
    for header, value in routes.SECURITY_HEADERS.items():
        assert page.headers[header] == value
    assert token not in page.text

    csrf = _page_csrf(client)
    refused = client.post("/logout", data={"csrf_token": "wrong"}, follow_redirects=False)
    assert refused.status_code == 403
    assert client.get("/dashboard", follow_redirects=False).status_code == 200
    out = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login?notice=signed_out"
    assert "rcli_session=" in out.headers["set-cookie"] and "max-age=0" in out.headers["set-cookie"].lower()
    # The old cookie is dead on the server, not only deleted in the browser.
    client.cookies.set("rcli_session", token)
    assert client.get("/dashboard", follow_redirects=False).status_code == 303
    assert client.get("/api/v1/vms").status_code == 401
    with ctx.db.read() as db:
        assert db.get(ApiToken, row.id).revoked_at is not None  # type: ignore[union-attr]


def test_cookie_is_secure_over_https(ctx: AppContext) -> None:
    _user(ctx, "alice")
    with TestClient(create_app(ctx, background=False), base_url="https://testserver") as secure_client:
        response = _login(secure_client, "alice")
        cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("rcli_session="))
        assert "secure" in [part.strip().lower() for part in cookie.split(";")]


def test_login_refuses_bad_passwords_forged_forms_and_open_redirects(ctx: AppContext, client: TestClient) -> None:
    _user(ctx, "alice")
    wrong = _login(client, "alice", "not the password")
    assert wrong.status_code == 401 and "do not match" in wrong.text and "rcli_session" not in client.cookies
    forged = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": "x"},
                         follow_redirects=False)
    assert forged.status_code == 403 and "rcli_session" not in client.cookies
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        response = _login(client, "alice", next_path=target)
        assert response.status_code == 303 and response.headers["location"] == "/dashboard", target
        client.cookies.delete("rcli_session")


def test_repeated_failures_are_throttled(ctx: AppContext, client: TestClient) -> None:
    _user(ctx, "alice")
    for _ in range(ctx.settings.max_login_attempts_per_15min):
        assert _login(client, "alice", "wrong password!").status_code == 401
    blocked = _login(client, "alice")  # even the right password waits
    assert blocked.status_code == 429 and 'data-code="too_many_login_attempts"' in blocked.text
    assert client.get("/dashboard", follow_redirects=False).status_code == 303  # no session was made
    # The limit lives in the database: a restarted controller (a new app) still refuses.
    with TestClient(create_app(ctx, background=False)) as restarted:
        assert _login(restarted, "alice").status_code == 429


def test_login_limit_per_address_spans_accounts(ctx: AppContext, client: TestClient) -> None:
    for name in ("bob", "carol"):
        _user(ctx, name)
    for attempt in range(ctx.settings.max_login_attempts_per_15min):
        assert _login(client, f"guess{attempt}", "wrong password!").status_code == 401
    assert _login(client, "bob").status_code == 429  # same address (the test client), any account


def test_new_password_ends_existing_sessions(ctx: AppContext, client: TestClient) -> None:
    _user(ctx, "alice")
    _login(client, "alice")
    assert client.get("/dashboard", follow_redirects=False).status_code == 200
    users_service.set_password(ctx.db, "alice", PASSWORD + " new")
    assert client.get("/dashboard", follow_redirects=False).status_code == 303


def test_expired_or_disabled_session_is_refused(ctx: AppContext, client: TestClient) -> None:
    _user(ctx, "alice")
    _login(client, "alice")
    with ctx.db.transaction() as db:
        row = db.scalars(select(ApiToken).where(ApiToken.name == sessions.SESSION_NAME)).one()
        row.expires_at = utcnow()
    assert client.get("/api/v1/vms").status_code == 401
    assert client.get("/dashboard", follow_redirects=False).status_code == 303


# ----------------------------------------------------------------------------------------------
# CSRF on the API with the cookie


def test_api_accepts_the_cookie_but_state_changes_need_the_csrf_header(ctx: AppContext, client: TestClient) -> None:
    alice = _user(ctx, "alice")
    _login(client, "alice")
    assert client.get("/api/v1/vms").json() == {"items": []}
    refused = client.post("/api/v1/vms/ensure", json={"vm_type": "cli"})
    assert refused.status_code == 403 and refused.json()["code"] == "csrf_failed"
    wrong = client.post("/api/v1/vms/ensure", json={"vm_type": "cli"}, headers={"X-CSRF-Token": "0" * 64})
    assert wrong.status_code == 403
    assert vm_manager.list_vms(ctx, alice) == []
    csrf = _page_csrf(client)
    created = client.post("/api/v1/vms/ensure", json={"vm_type": "cli"}, headers={"X-CSRF-Token": csrf})
    assert created.status_code == 201, created.text
    # A bearer token needs no CSRF header (it is not sent by browsers on their own).
    _, token = users_service.create_token(ctx.db, users_service.get_user_by_name(ctx.db, "alice"))
    bare = TestClient(client.app)
    assert bare.post("/api/v1/vms/ensure", json={"vm_type": "cli"},
                     headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # A bad bearer header is not rescued by a good cookie.
    assert client.get("/api/v1/vms", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_dashboard_forms_need_the_csrf_field(ctx: AppContext, client: TestClient) -> None:
    alice = _user(ctx, "alice")
    vm = vm_manager.create_vm(ctx, alice, "cli")
    _login(client, "alice")
    refused = client.post(f"/dashboard/vms/{vm.id}/stop", data={"csrf_token": "nope"}, follow_redirects=False)
    assert refused.status_code == 403
    assert vm_manager.get_vm(ctx, None, vm.id).status == "running"


# ----------------------------------------------------------------------------------------------
# The dashboard's VM actions


def test_stop_resume_and_destroy_with_confirmation(ctx: AppContext, client: TestClient) -> None:
    alice = _user(ctx, "alice")
    vm = vm_manager.create_vm(ctx, alice, "cli")
    _login(client, "alice")
    page = client.get("/dashboard")
    assert vm.id in page.text and "Running" in page.text and "CLI workspace" in page.text
    csrf = _page_csrf(client)

    def act(action: str, **extra: str) -> Any:
        return client.post(f"/dashboard/vms/{vm.id}/{action}", data={"csrf_token": csrf, **extra},
                           follow_redirects=False)

    stopped = act("stop")
    assert stopped.status_code == 303 and stopped.headers["location"] == "/dashboard?notice=stop"
    assert vm_manager.get_vm(ctx, None, vm.id).status == "stopped"
    assert "The VM is stopped." in client.get("/dashboard?notice=stop").text
    assert act("stop").status_code == 409
    assert act("resume").status_code == 303
    assert vm_manager.get_vm(ctx, None, vm.id).status == "running"
    ask = act("destroy")
    assert ask.status_code == 200 and "cannot be undone" in ask.text
    assert vm_manager.get_vm(ctx, None, vm.id).status == "running"
    assert act("destroy", confirm="yes").status_code == 303
    assert vm_manager.get_vm(ctx, None, vm.id).status == "destroyed"
    after = client.get("/dashboard").text
    assert "You have no VMs yet" in after and "1 removed VM not shown" in after
    assert act("reboot").status_code == 409


def test_empty_dashboard_and_provider_states(ctx: AppContext, client: TestClient) -> None:
    _user(ctx, "alice")
    _login(client, "alice")
    page = client.get("/dashboard").text
    assert "You have no VMs yet" in page
    for name in ("Claude Code", "Codex", "Gemini"):
        assert name in page
    assert page.count("Not signed in") >= 3


def test_credentials_shown_from_completed_sessions_metadata(ctx: AppContext, client: TestClient) -> None:
    alice = _user(ctx, "alice")
    cli, _ = vm_manager.ensure_cli_vm(ctx, alice)
    auth = auth_flow.start_session(ctx, alice, "claude_code")
    _finish(ctx, auth.id, cli.id, {"account": "alice@example.test", "expires_at": "2030-01-02T03:04:05Z",
                                   "scopes": ["openid"]})
    _login(client, "alice")
    page = client.get("/dashboard").text
    assert "alice@example.test" in page and "2030-01-02 03:04 UTC" in page and "Re-authenticate" in page
    # The CLI VM is destroyed: the files are in the user's home volume, which the next CLI VM gets
    # (ADR 0011), so the sign-in still holds.
    vm_manager.destroy_vm(ctx, None, cli.id)
    page = client.get("/dashboard").text
    assert "that CLI workspace was replaced" not in page and 'pill-ok">Signed in' in page
    # The home itself is purged (an operator's command): the files are gone; say so.
    from remotecli.services import workspaces

    volume = workspaces.user_volume(ctx, alice.user_id)
    assert volume is not None
    workspaces.purge(ctx, volume, reason="test: home purged")
    page = client.get("/dashboard").text
    assert "that CLI workspace was replaced" in page
    vm_manager.ensure_cli_vm(ctx, alice)  # a new, empty home: still not signed in
    assert "that CLI workspace was replaced" in client.get("/dashboard").text


def _finish(ctx: AppContext, session_id: str, cli_vm_id: str, meta: dict[str, Any]) -> None:
    for status in (AuthStatus.PROVISIONING, AuthStatus.AWAITING_USER, AuthStatus.EXCHANGING,
                   AuthStatus.TRANSFERRING, AuthStatus.COMPLETED):
        with ctx.db.transaction() as db:
            auth = db.get(AuthSession, session_id)
            assert auth is not None
            set_auth_status(db, auth, status, module="test", message="Done" if status is AuthStatus.COMPLETED
                            else None, cli_vm_id=cli_vm_id, credential_meta=meta)


# ----------------------------------------------------------------------------------------------
# Authorization: nobody sees another user's VMs or sessions


def test_users_cannot_see_or_touch_each_others_vms_and_sessions(ctx: AppContext, client: TestClient) -> None:
    _user(ctx, "alice")
    bob = _user(ctx, "bob")
    bob_vm = vm_manager.create_vm(ctx, bob, "cli")
    bob_session = auth_flow.start_session(ctx, bob, "codex")
    _login(client, "alice")
    csrf = _page_csrf(client)
    assert bob_vm.id not in client.get("/dashboard").text
    for action in ("stop", "destroy"):
        response = client.post(f"/dashboard/vms/{bob_vm.id}/{action}", data={"csrf_token": csrf, "confirm": "yes"},
                               follow_redirects=False)
        assert response.status_code == 404
    assert vm_manager.get_vm(ctx, None, bob_vm.id).status == "running"
    assert client.get(f"/dashboard/remote-cli/auth?session={bob_session.id}").status_code == 404
    state = client.get(f"/dashboard/remote-cli/auth/{bob_session.id}/state")
    assert state.status_code == 404 and state.json()["code"] == "auth_session_not_found"
    assert client.get(f"/api/v1/auth-sessions/{bob_session.id}").status_code == 404
    assert client.get("/api/v1/vms?all=true").json() == {"items": []}
    ticket = client.post(f"/api/v1/vms/{bob_vm.id}/terminal", headers={"X-CSRF-Token": csrf})
    assert ticket.status_code == 404
    assert bob_session.id not in client.get("/dashboard/remote-cli/auth").text
    admin_page = client.get("/admin", follow_redirects=False)
    assert admin_page.status_code == 403 and bob_vm.id not in admin_page.text
    assert client.get(f"/admin/sessions/{bob_session.id}").status_code == 403


def test_admin_sees_everything_with_filters_and_timelines(ctx: AppContext, client: TestClient) -> None:
    _user(ctx, "root", admin=True)
    alice = _user(ctx, "alice")
    bob = _user(ctx, "bob")
    alice_vm = vm_manager.create_vm(ctx, alice, "cli")
    bob_vm = vm_manager.create_vm(ctx, bob, "browser")
    session = auth_flow.start_session(ctx, alice, "claude_code")
    auth_flow.cancel_session(ctx, alice, session.id)
    _login(client, "root")
    page = client.get("/admin").text
    assert alice_vm.id[:11] in page and bob_vm.id[:11] in page and session.id[:8] in page
    assert "alice" in page and "bob" in page
    filtered = client.get("/admin?user=bob").text
    assert bob_vm.id[:11] in filtered and alice_vm.id[:11] not in filtered
    by_type = client.get("/admin?vm_type=cli").text
    assert alice_vm.id[:11] in by_type and bob_vm.id[:11] not in by_type
    by_status = client.get("/admin?session_status=completed").text
    assert session.id[:8] not in by_status
    timeline = client.get(f"/admin/sessions/{session.id}")
    assert timeline.status_code == 200
    assert "Time (UTC)" in timeline.text and "Sign-in to claude_code requested" in timeline.text
    assert "pending → cancelled" in timeline.text
    vm_page = client.get(f"/admin/vms/{alice_vm.id}")
    assert vm_page.status_code == 200 and "Guest agent ready" in vm_page.text
    assert client.get("/admin/sessions/nope").status_code == 404
    # An admin's dashboard acts on their own VMs only.
    csrf = _page_csrf(client)
    assert client.post(f"/dashboard/vms/{alice_vm.id}/stop", data={"csrf_token": csrf},
                       follow_redirects=False).status_code == 404


# ----------------------------------------------------------------------------------------------
# The sign-in page's state (what the page polls)


def test_auth_state_has_steps_and_no_secrets(ctx: AppContext, client: TestClient) -> None:
    alice = _user(ctx, "alice")
    cli, _ = vm_manager.ensure_cli_vm(ctx, alice)
    auth = auth_flow.start_session(ctx, alice, "claude_code")
    _login(client, "alice")
    page = client.get(f"/dashboard/remote-cli/auth?session={auth.id}")
    assert page.status_code == 200 and f'data-session="{auth.id}"' in page.text
    state = client.get(f"/dashboard/remote-cli/auth/{auth.id}/state").json()
    assert state["session"]["status"] == "pending" and state["session"]["vnc_url"] is None
    assert [s["key"] for s in state["steps"]] == ["cli", "browser", "login", "save", "done"]
    assert state["steps"][0]["state"] == "done"  # the user's CLI workspace already runs
    assert state["steps"][1]["state"] == "active" and state["terminal"] is False
    assert 0 < state["expires_in_s"] <= ctx.settings.auth_session_ttl_s
    with ctx.db.transaction() as db:
        row = db.get(AuthSession, auth.id)
        assert row is not None
        row.credential_enc = b"sealed-secret"
    _finish(ctx, auth.id, cli.id, {"account": "alice@example.test", "expires_at": "2030-01-02T03:04:05Z"})
    done = client.get(f"/dashboard/remote-cli/auth/{auth.id}/state")
    body = done.json()
    assert body["terminal"] is True and all(s["state"] == "done" for s in body["steps"])
    assert body["session"]["credential"]["account"] == "alice@example.test"
    assert body["credential_expires"] == "2030-01-02 03:04 UTC"
    assert "sealed-secret" not in done.text and "credential_enc" not in done.text


def test_auth_page_lists_providers_and_live_sessions(ctx: AppContext, client: TestClient) -> None:
    alice = _user(ctx, "alice")
    live = auth_flow.start_session(ctx, alice, "gemini")
    _login(client, "alice")
    page = client.get("/dashboard/remote-cli/auth?provider=claude_code").text
    assert 'data-provider="claude_code"' in page and 'data-preselect="claude_code"' in page
    assert f"?session={live.id}" in page and "in progress" in page
    assert "/static/auth.js" in page
