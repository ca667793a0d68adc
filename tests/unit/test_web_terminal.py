"""The terminal websocket: one-time tickets, ownership, and the bridge to a PTY (a fake one here)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from remotecli.agent.protocol import PtyData, PtyExit
from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.drivers.fake import FakeAgent
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal

PASSWORD = "correct horse battery"


@dataclass
class FakePty:
    """Echoes input back as output; 'exit\\r' ends the shell with code 0."""

    opened_as: tuple[str, int, int]
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    resizes: list[tuple[int, int]] = field(default_factory=list)
    closed: bool = False

    async def read(self) -> Any:
        return await self.queue.get()

    async def write(self, data: bytes) -> None:
        if data == b"exit\r":
            await self.queue.put(PtyExit(code=0))
            return
        await self.queue.put(PtyData(b"echo:" + data))

    async def resize(self, cols: int, rows: int) -> None:
        self.resizes.append((cols, rows))

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def ptys(monkeypatch: pytest.MonkeyPatch) -> list[FakePty]:
    opened: list[FakePty] = []

    async def open_pty(self: FakeAgent, user: str, cols: int, rows: int, cmd: str | None = None) -> FakePty:
        pty = FakePty((user, cols, rows))
        opened.append(pty)
        return pty

    monkeypatch.setattr(FakeAgent, "open_pty", open_pty, raising=False)
    return opened


@pytest.fixture
def client(ctx: AppContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx, background=False)) as test_client:
        yield test_client


def _login(ctx: AppContext, client: TestClient, name: str) -> tuple[Principal, str]:
    user = users_service.create_user(ctx.db, name)
    users_service.set_password(ctx.db, name, PASSWORD)
    page = client.get("/login").text
    login_csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    client.post("/login", data={"username": name, "password": PASSWORD, "csrf_token": login_csrf})
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/dashboard").text).group(1)  # type: ignore[union-attr]
    return Principal(user.id, user.name, False), csrf


def _ticket_path(client: TestClient, vm_id: str, csrf: str) -> str:
    response = client.post(f"/api/v1/vms/{vm_id}/terminal", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 200, response.text
    url = response.json()["url"]
    assert url.startswith("ws://testserver/api/v1/vms/")
    return url.removeprefix("ws://testserver")


def test_terminal_bridges_keys_output_resize_and_exit(ctx: AppContext, client: TestClient,
                                                     ptys: list[FakePty]) -> None:
    alice, csrf = _login(ctx, client, "alice")
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    path = _ticket_path(client, vm.id, csrf)
    with client.websocket_connect(path + "&cols=120&rows=40") as ws:
        ws.send_bytes(b"ls -l\r")
        assert ws.receive_bytes() == b"echo:ls -l\r"
        ws.send_text(json.dumps({"type": "resize", "cols": 100, "rows": 30}))
        ws.send_text("not json")
        ws.send_bytes(b"exit\r")
        assert json.loads(ws.receive_text()) == {"type": "exit", "code": 0, "signal": None}
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_bytes()
        assert closed.value.code == 1000
    assert ptys[0].opened_as == ("cli", 120, 40)
    assert ptys[0].resizes == [(100, 30)] and ptys[0].closed
    # The ticket was for one use.
    with client.websocket_connect(path) as ws, pytest.raises(WebSocketDisconnect) as refused:
        ws.receive_bytes()
    assert refused.value.code == 4401


def test_terminal_needs_a_ticket_for_that_vm(ctx: AppContext, client: TestClient, ptys: list[FakePty]) -> None:
    alice, csrf = _login(ctx, client, "alice")
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    for path in (f"/api/v1/vms/{vm.id}/terminal", f"/api/v1/vms/{vm.id}/terminal?token=guess"):
        with client.websocket_connect(path) as ws, pytest.raises(WebSocketDisconnect) as refused:
            ws.receive_bytes()
        assert refused.value.code == 4401
    # A ticket for one VM does not open another.
    other = vm_manager.create_vm(ctx, alice, "browser")
    token = _ticket_path(client, vm.id, csrf).split("token=")[1]
    with client.websocket_connect(f"/api/v1/vms/{other.id}/terminal?token={token}") as ws, \
            pytest.raises(WebSocketDisconnect) as refused:
        ws.receive_bytes()
    assert refused.value.code == 4401
    assert client.post(f"/api/v1/vms/{other.id}/terminal", headers={"X-CSRF-Token": csrf}).status_code == 404
    assert client.post(f"/api/v1/vms/{vm.id}/terminal").status_code == 403  # no CSRF header
    assert ptys == []


def test_terminal_of_a_stopped_or_foreign_vm(ctx: AppContext, client: TestClient, ptys: list[FakePty]) -> None:
    alice, csrf = _login(ctx, client, "alice")
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    path = _ticket_path(client, vm.id, csrf)
    vm_manager.stop_vm(ctx, alice, vm.id)
    with client.websocket_connect(path) as ws, pytest.raises(WebSocketDisconnect) as refused:
        ws.receive_bytes()
    assert refused.value.code == 4409
    stopped = client.post(f"/api/v1/vms/{vm.id}/terminal", headers={"X-CSRF-Token": csrf})
    assert stopped.status_code == 409 and stopped.json()["code"] == "vm_not_running"
    bob = users_service.create_user(ctx.db, "bob")
    bob_vm, _ = vm_manager.ensure_cli_vm(ctx, Principal(bob.id, bob.name, False))
    assert client.post(f"/api/v1/vms/{bob_vm.id}/terminal", headers={"X-CSRF-Token": csrf}).status_code == 404
    assert ptys == []


def test_open_terminal_closes_when_the_user_is_disabled(ctx: AppContext, client: TestClient,
                                                        ptys: list[FakePty]) -> None:
    ctx.settings.websocket_access_check_s = 0.1
    alice, csrf = _login(ctx, client, "alice")
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    with client.websocket_connect(_ticket_path(client, vm.id, csrf)) as ws:
        ws.send_bytes(b"whoami\r")
        assert ws.receive_bytes() == b"echo:whoami\r"
        users_service.set_disabled(ctx.db, "alice", True)
        with pytest.raises(WebSocketDisconnect) as closed:
            while True:
                ws.receive_bytes()
        assert closed.value.code == 4401 and closed.value.reason == "user_disabled"
    assert ptys[0].closed
