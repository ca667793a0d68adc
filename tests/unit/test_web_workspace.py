"""Dashboard and the persistent workspace (ADR 0011): the home's usage and state in words, the
nearly-full message, "Rebuild workspace", and what the terminal page says while it waits
(fake driver, SQLite and PostgreSQL)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from remotecli.agent.protocol import ExecResult
from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Vm, Volume
from remotecli.domain.states import AuthStatus
from remotecli.drivers.fake import FakeAgent, FakeDriver
from remotecli.services import auth_flow, vm_manager, workspaces
from remotecli.services import users as users_service
from remotecli.services.dashboard import TerminalState, WorkspaceSummary
from remotecli.services.transitions import set_auth_status
from remotecli.services.users import Principal
from remotecli.web import views

PASSWORD = "correct horse battery"
GIB = 1024**3


@pytest.fixture
def client(ctx: AppContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx, background=False), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def df(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The fake guest answers ``df`` for the home with ``used`` of ``size`` bytes (a real one is
    checked in the integration tests)."""
    answer = {"used": int(3.1 * GIB), "size": 20 * GIB}
    original = FakeAgent.exec

    def exec_(self: FakeAgent, argv: list[str], **kwargs: Any) -> ExecResult:
        if argv[:1] == ["df"]:
            out = f"      Used  1B-blocks\n{answer['used']} {answer['size']}\n".encode()
            return ExecResult(exit_code=0, stdout=out, stderr=b"", timed_out=False, duration_s=0.0)
        return original(self, argv, **kwargs)

    monkeypatch.setattr(FakeAgent, "exec", exec_)
    return answer


def _login(ctx: AppContext, client: TestClient, name: str) -> tuple[Principal, str]:
    user = users_service.create_user(ctx.db, name)
    users_service.set_password(ctx.db, name, PASSWORD)
    client.cookies.clear()
    page = client.get("/login").text
    login_csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    client.post("/login", data={"username": name, "password": PASSWORD, "csrf_token": login_csrf})
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/dashboard").text).group(1)  # type: ignore[union-attr]
    return Principal(user.id, user.name, False), csrf


def _home_section(page: str) -> str:
    match = re.search(r'<section class="card" aria-labelledby="home-title">(.*?)</section>', page, re.S)
    assert match, page[:2000]
    return match.group(1)


def _volume(ctx: AppContext, user_id: str) -> Volume:
    with ctx.db.read() as session:
        return session.scalars(select(Volume).where(Volume.user_id == user_id)).one()


def _vm(ctx: AppContext, vm_id: str) -> Vm:
    with ctx.db.read() as session:
        vm = session.get(Vm, vm_id)
    assert vm is not None
    return vm


# ----------------------------------------------------------------------------------------------
# Usage and state


def test_dashboard_shows_the_homes_usage_and_state(ctx: AppContext, client: TestClient, df: dict[str, int]) -> None:
    alice, _ = _login(ctx, client, "alice")
    assert "You have no home yet" in _home_section(client.get("/dashboard").text)
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    home = _home_section(client.get("/dashboard").text)
    assert "3.1 GiB of 20 GiB used" in home and "Running" in home
    assert 'value="15"' in home  # the meter: 3.1 of 20 GiB, in %
    assert "nearly full" not in home and "workspace-full" not in home
    # Stopped while idle: the files are kept and the next use starts it; usage needs a running guest.
    vm_manager.stop_vm(ctx, None, vm.id, reason=f"{vm_manager.IDLE_STOP_REASON}: no terminal for 60 min")
    home = _home_section(client.get("/dashboard").text)
    assert "Stopped while idle" in home and "Your files are kept" in home
    assert "20 GiB in all" in home and "GiB used" not in home
    # Another user sees only that they have no home yet.
    _login(ctx, client, "bob")
    assert "You have no home yet" in _home_section(client.get("/dashboard").text)


def test_a_nearly_full_home_says_what_to_do(ctx: AppContext, client: TestClient, df: dict[str, int]) -> None:
    alice, _ = _login(ctx, client, "alice")
    vm_manager.ensure_cli_vm(ctx, alice)
    df["used"] = 19 * GIB  # 95 %
    home = _home_section(client.get("/dashboard").text)
    assert "19 GiB of 20 GiB used" in home
    assert "Your workspace&#39;s home is nearly full (95 %). Free some space from the terminal" in home
    assert 'role="alert"' in home
    df["used"] = df["size"]
    home = _home_section(client.get("/dashboard").text)
    assert "home is full." in home and "Free some space" in home
    df["used"] = int(17.9 * GIB)  # under 90 %: no message
    assert "Free some space" not in _home_section(client.get("/dashboard").text)


def test_workspace_panel_words() -> None:
    def summary(**kw: Any) -> WorkspaceSummary:
        base: dict[str, Any] = {"volume_status": "attached", "volume_reason": None, "used_bytes": None,
                                "total_bytes": 20 * GIB, "vm_status": "running", "idle_stopped": False}
        return WorkspaceSummary(**{**base, **kw})

    assert views.size_words(20 * GIB) == "20 GiB" and views.size_words(512 * 1024**2) == "512 MiB"
    assert views.size_words(int(3.14 * GIB)) == "3.1 GiB" and views.size_words(10) == "10 bytes"
    panel = views.workspace_panel(summary(used_bytes=18 * GIB))
    assert panel.usage_words == "18 GiB of 20 GiB used" and panel.percent == 90
    assert "nearly full (90 %)" in panel.full_message
    assert views.workspace_panel(summary(used_bytes=GIB)).full_message == ""
    failed = views.workspace_panel(summary(volume_status="failed", volume_reason="its volume file is missing",
                                           vm_status=None))
    assert failed.tone == "bad" and "its volume file is missing" in failed.state_words
    gone = views.workspace_panel(summary(volume_status="available", vm_status=None))
    assert gone.state_words.startswith("Not running. Your files are kept")
    stopped = views.workspace_panel(summary(vm_status="stopped"))
    assert stopped.state_words.startswith("Stopped. Your files are kept")
    assert views.workspace_panel(summary(vm_status="starting")).state_words == "Starting"


# ----------------------------------------------------------------------------------------------
# Rebuild workspace


def test_rebuild_workspace_keeps_the_home(ctx: AppContext, client: TestClient, fake_driver: FakeDriver) -> None:
    alice, csrf = _login(ctx, client, "alice")
    old, _ = vm_manager.ensure_cli_vm(ctx, alice)
    volume = _volume(ctx, alice.user_id)
    browser = vm_manager.create_vm(ctx, alice, "browser")
    page = client.get("/dashboard").text
    assert f'action="/dashboard/vms/{old.id}/rebuild"' in page and "Rebuild workspace" in page
    assert f'action="/dashboard/vms/{browser.id}/rebuild"' not in page  # a browser has no home

    def post(vm_id: str, token: str | None = csrf, **extra: str) -> Any:
        data = {**({"csrf_token": token} if token is not None else {}), **extra}
        return client.post(f"/dashboard/vms/{vm_id}/rebuild", data=data, follow_redirects=False)

    # CSRF first: without it, or with a wrong one, nothing happens.
    for token in (None, "forged"):
        refused = post(old.id, token, confirm="yes")
        assert refused.status_code == 403
        assert _vm(ctx, old.id).status == "running"
    # The confirmation says what happens, and that the home is kept.
    ask = post(old.id)
    assert ask.status_code == 200 and "Rebuild your workspace" in ask.text and "Your home is kept" in ask.text
    assert _vm(ctx, old.id).status == "running"
    assert post(browser.id, confirm="yes").status_code == 409
    done = post(old.id, confirm="yes")
    assert done.status_code == 303 and done.headers["location"] == "/dashboard?notice=rebuild"
    assert _vm(ctx, old.id).status == "destroyed"
    [new] = [vm for vm in vm_manager.list_vms(ctx, alice)
             if vm.vm_type == "cli" and vm.status == "running"]
    assert new.id != old.id
    after = _volume(ctx, alice.user_id)
    assert after.id == volume.id and after.attached_vm_id == new.id
    assert fake_driver.home_of(new.id) == volume.location
    notice = client.get(done.headers["location"]).text
    assert "Your workspace was rebuilt" in notice and "home kept" in notice


def _signed_in(ctx: AppContext, alice: Principal, cli_vm_id: str) -> None:
    auth = auth_flow.start_session(ctx, alice, "claude_code")
    for status in (AuthStatus.PROVISIONING, AuthStatus.AWAITING_USER, AuthStatus.EXCHANGING,
                   AuthStatus.TRANSFERRING, AuthStatus.COMPLETED):
        with ctx.db.transaction() as db:
            row = db.get(AuthSession, auth.id)
            assert row is not None
            set_auth_status(db, row, status, module="test", message=None, cli_vm_id=cli_vm_id,
                            credential_meta={"account": "alice@example.test"})


def test_sign_ins_stay_signed_in_after_a_rebuild(ctx: AppContext, client: TestClient) -> None:
    """The credential files are in the home, and a rebuild keeps the home (twice over, too)."""
    alice, csrf = _login(ctx, client, "alice")
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    _signed_in(ctx, alice, vm.id)
    for _ in range(2):
        done = client.post(f"/dashboard/vms/{vm.id}/rebuild", data={"csrf_token": csrf, "confirm": "yes"},
                           follow_redirects=False)
        assert done.status_code == 303
        [vm] = [v for v in vm_manager.list_vms(ctx, alice) if v.vm_type == "cli" and v.status == "running"]
        page = client.get("/dashboard").text
        assert "alice@example.test" in page and "that CLI workspace was replaced" not in page
        assert 'pill-ok">Signed in' in page


def test_rebuild_workspace_is_the_owners_only(ctx: AppContext, client: TestClient) -> None:
    alice, _ = _login(ctx, client, "alice")
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    volume = _volume(ctx, alice.user_id)
    _, bob_csrf = _login(ctx, client, "bob")
    for extra in ({}, {"confirm": "yes"}):
        refused = client.post(f"/dashboard/vms/{vm.id}/rebuild", data={"csrf_token": bob_csrf, **extra},
                              follow_redirects=False)
        assert refused.status_code == 404 and "There is no such VM among yours." in refused.text
        assert vm.id not in refused.text
    assert _vm(ctx, vm.id).status == "running"
    assert _volume(ctx, alice.user_id).attached_vm_id == vm.id == volume.attached_vm_id


# ----------------------------------------------------------------------------------------------
# The terminal page's words


def test_terminal_says_creating_starting_or_connecting(ctx: AppContext, client: TestClient) -> None:
    assert client.get("/dashboard/remote-cli/terminal/state").status_code == 401
    alice, _ = _login(ctx, client, "alice")

    def state() -> dict[str, Any]:
        response = client.get("/dashboard/remote-cli/terminal/state")
        assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
        body: dict[str, Any] = response.json()
        return body

    first = state()
    assert first["phase"] == "create" and first["has_home"] is False
    assert first["message"].startswith("Creating your workspace")
    assert "Creating your workspace" in client.get("/dashboard/remote-cli/terminal").text
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    running = state()
    assert running["phase"] == "connect" and running["message"] == "Connecting to your workspace…"
    assert running["has_home"] is True
    # Stopped while idle: the next connect starts it again.
    vm_manager.stop_vm(ctx, None, vm.id, reason=f"{vm_manager.IDLE_STOP_REASON}: no terminal for 60 min")
    idle = state()
    assert idle["phase"] == "start" and idle["status"] == "Starting…"
    assert idle["message"].startswith("Starting your workspace (it was stopped while idle). Your files are kept")
    page = client.get("/dashboard/remote-cli/terminal").text
    assert "Starting your workspace (it was stopped while idle)" in page and 'data-phase="start"' in page
    vm_manager.ensure_cli_vm(ctx, alice)
    assert state()["phase"] == "connect"
    # Its VM is gone but the home is kept: a new VM is made for it, with the files.
    vm_manager.destroy_vm(ctx, None, vm.id)
    assert workspaces.user_volume(ctx, alice.user_id) is not None
    again = state()
    assert again["phase"] == "create" and again["has_home"] is True
    assert again["message"].startswith("Starting your workspace on a new VM, with your files")


def test_rebuild_is_offered_for_cli_vms_that_run_pause_or_stop() -> None:
    assert views.vm_actions("running", "cli") == ["stop", "rebuild", "destroy"]
    assert views.vm_actions("stopped", "cli") == ["resume", "rebuild", "destroy"]
    assert views.vm_actions("failed", "cli") == ["destroy"] and views.vm_actions("starting", "cli") == ["destroy"]
    assert views.vm_actions("running", "browser") == ["stop", "destroy"]


def test_terminal_words() -> None:
    assert views.terminal_words(TerminalState("start", True, False)).message.startswith("Starting your workspace.")
    assert views.terminal_words(TerminalState("connect", True, False)).status == "Connecting…"
    assert views.terminal_words(TerminalState("create", False, False)).status == "Creating…"
