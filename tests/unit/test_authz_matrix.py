"""Authorization matrix: every endpoint and websocket as owner, other user, admin, anonymous, and with
an expired or revoked token. Another user's object answers 404 (not 403) so ids do not leak.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.websockets import WebSocketDisconnect

from remotecli.api.app import create_app
from remotecli.context import AppContext
from remotecli.db.models import ApiToken, utcnow
from remotecli.services import auth_flow, vm_manager
from remotecli.services import users as users_service
from remotecli.services.users import Principal

ROLES = ["owner", "other", "admin", "anonymous", "expired", "revoked"]


@pytest.fixture
def world(ctx: AppContext) -> Iterator[dict[str, Any]]:
    tokens: dict[str, str | None] = {"anonymous": None}
    principals: dict[str, Principal] = {}
    for role, admin in (("owner", False), ("other", False), ("admin", True), ("expired", False),
                        ("revoked", False)):
        user = users_service.create_user(ctx.db, role, is_admin=admin)
        _, tokens[role] = users_service.create_token(ctx.db, user)
        principals[role] = Principal(user.id, user.name, admin)
    with ctx.db.transaction() as session:
        for row in session.scalars(select(ApiToken)):
            if row.user_id == principals["expired"].user_id:
                row.expires_at = utcnow() - dt.timedelta(minutes=1)
            if row.user_id == principals["revoked"].user_id:
                row.revoked_at = utcnow()
    owner = principals["owner"]
    cli = vm_manager.create_vm(ctx, owner, "cli")
    browser = vm_manager.create_vm(ctx, owner, "browser")
    session = auth_flow.start_session(ctx, owner, "claude_code")
    with TestClient(create_app(ctx, background=False)) as client:
        yield {"client": client, "tokens": tokens, "principals": principals, "cli": cli.id,
               "browser": browser.id, "session": session.id}


ENDPOINTS: list[tuple[str, str, dict[str, Any] | None, bool]] = [
    # method, path template, json body, is it about one object (404 for others)?
    ("GET", "/api/v1/vms", None, False),
    ("POST", "/api/v1/vms/ensure", {"vm_type": "cli"}, False),
    ("GET", "/api/v1/vms/{browser}", None, True),
    ("POST", "/api/v1/vms/{browser}/pause", None, True),
    ("POST", "/api/v1/vms/{browser}/resume", None, True),
    ("POST", "/api/v1/vms/{browser}/stop", None, True),
    ("POST", "/api/v1/vms/{browser}/start", None, True),
    ("DELETE", "/api/v1/vms/{browser}", None, True),
    ("POST", "/api/v1/vms/{cli}/terminal", None, True),
    ("GET", "/api/v1/providers", None, False),
    ("GET", "/api/v1/auth-sessions", None, False),
    ("GET", "/api/v1/auth-sessions/{session}", None, True),
    ("GET", "/api/v1/auth-sessions/{session}/events", None, True),
    ("DELETE", "/api/v1/auth-sessions/{session}", None, True),
]


def _call(world: dict[str, Any], role: str, method: str, template: str, body: dict[str, Any] | None) -> Any:
    token = world["tokens"][role]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    path = template.format(**world)
    return world["client"].request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("method,template,body,per_object", ENDPOINTS)
def test_matrix(world: dict[str, Any], method: str, template: str, body: dict[str, Any] | None,
                per_object: bool) -> None:
    for role in ("anonymous", "expired", "revoked"):
        response = _call(world, role, method, template, body)
        assert response.status_code == 401, (role, response.text)
        assert response.json()["code"] == "authentication_required"
    other = _call(world, "other", method, template, body)
    if per_object:
        assert other.status_code == 404, other.text
        assert other.json()["code"].endswith("not_found")
    else:
        assert other.status_code in (200, 201), other.text
        if method == "GET" and "items" in other.json() and template != "/api/v1/providers":
            assert all(item.get("user_id", world["principals"]["other"].user_id)
                       == world["principals"]["other"].user_id for item in other.json()["items"])
            assert world["cli"] not in other.text and world["session"] not in other.text
    owner = _call(world, "owner", method, template, body)
    assert owner.status_code < 400 or owner.json()["code"] in ("invalid_transition", "vm_not_running",
                                                                  "auth_session_ended", "vm_terminal"), owner.text
    if per_object and method == "GET":
        assert _call(world, "admin", method, template, body).status_code == 200  # admins see everything


def test_lists_are_scoped_and_admin_can_ask_for_all(world: dict[str, Any]) -> None:
    other = _call(world, "other", "GET", "/api/v1/vms?all=true", None).json()["items"]
    assert other == []
    admin = _call(world, "admin", "GET", "/api/v1/vms?all=true", None).json()["items"]
    assert {world["cli"], world["browser"]} <= {vm["id"] for vm in admin}


@pytest.mark.parametrize("path", ["/api/v1/auth-sessions/{session}/vnc", "/api/v1/vms/{cli}/terminal"])
def test_websockets_refuse_missing_forged_and_foreign_tickets(world: dict[str, Any], path: str) -> None:
    client: TestClient = world["client"]
    url = path.format(**world)
    for query in ("", "?token=", "?token=forged-ticket-value"):
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect(url + query) as ws:
            ws.receive_bytes()
        assert closed.value.code == 4401
    # A ticket issued to another user for their own object does not open this one.
    ctx: AppContext = client.app.state.ctx  # type: ignore[attr-defined]
    kind = "vnc" if path.endswith("vnc") else "terminal"
    foreign = auth_flow.issue_ticket(ctx, world["principals"]["other"], kind, "something-else")
    with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect(f"{url}?token={foreign}") as ws:
        ws.receive_bytes()
    assert closed.value.code == 4401
