"""Websockets beyond their tickets (api/ws_bridge.py): the Origin check, ticket URLs under
REMOTECLI_PUBLIC_URL, and VNC tickets issued only when asked for (fake driver, both databases)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from starlette.websockets import WebSocketDisconnect

from remotecli.agent.protocol import PtyData
from remotecli.api import ws_bridge
from remotecli.app import create_app
from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.db.models import AuthSession, WsTicket
from remotecli.domain.states import AuthStatus
from remotecli.drivers.fake import FakeAgent
from remotecli.services import auth_flow, vm_manager
from remotecli.services import users as users_service
from remotecli.services.transitions import set_auth_status
from remotecli.services.users import Principal

PUBLIC = "https://remotecli.example.com"


class _EchoPty:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[PtyData | None] = asyncio.Queue()

    async def read(self) -> PtyData | None:
        return await self.queue.get()

    async def write(self, data: bytes) -> None:
        await self.queue.put(PtyData(data))

    async def resize(self, cols: int, rows: int) -> None:
        return None

    async def close(self) -> None:
        await self.queue.put(None)


@pytest.fixture
def ptys(monkeypatch: pytest.MonkeyPatch) -> list[_EchoPty]:
    opened: list[_EchoPty] = []

    async def open_pty(self: FakeAgent, user: str, cols: int, rows: int, cmd: str | None = None) -> _EchoPty:
        opened.append(_EchoPty())
        return opened[-1]

    monkeypatch.setattr(FakeAgent, "open_pty", open_pty, raising=False)
    return opened


@pytest.fixture
def client(ctx: AppContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx, background=False)) as test_client:
        yield test_client


def _user(ctx: AppContext, name: str) -> tuple[Principal, dict[str, str]]:
    user = users_service.create_user(ctx.db, name)
    _, token = users_service.create_token(ctx.db, user)
    return Principal(user.id, user.name, False), {"Authorization": f"Bearer {token}"}


def _tickets(ctx: AppContext) -> int:
    with ctx.db.read() as db:
        return int(db.scalar(select(func.count()).select_from(WsTicket)) or 0)


def _refused(client: TestClient, url: str, headers: dict[str, str]) -> tuple[int, str]:
    with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect(url, headers=headers) as ws:
        ws.receive_bytes()
    return closed.value.code, closed.value.reason


def _awaiting_user(ctx: AppContext, owner: Principal) -> str:
    browser = vm_manager.create_vm(ctx, owner, "browser")
    auth = auth_flow.start_session(ctx, owner, "claude_code")
    for status in (AuthStatus.PROVISIONING, AuthStatus.AWAITING_USER):
        with ctx.db.transaction() as db:
            row = db.get(AuthSession, auth.id)
            assert row is not None
            set_auth_status(db, row, status, module="test", message=status.value, browser_vm_id=browser.id)
    return auth.id


# ----------------------------------------------------------------------------------------------
# Origin


def test_origin_rules() -> None:
    plain = Settings(driver="fake")
    assert ws_bridge.origin_allowed(None, "testserver", plain)  # not a browser: the ticket decides
    assert ws_bridge.origin_allowed("http://testserver", "testserver", plain)
    assert ws_bridge.origin_allowed("HTTPS://Example.com:443", "example.com", plain)
    assert ws_bridge.origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080", plain)
    for origin in ("http://evil.test", "http://testserver:81", "null", "", "file:///x", "http://testserver.evil"):
        assert not ws_bridge.origin_allowed(origin, "testserver", plain), origin
    assert not ws_bridge.origin_allowed("http://testserver", None, plain)
    public = Settings(driver="fake", public_url=PUBLIC + "/")
    assert ws_bridge.origin_allowed(PUBLIC, "127.0.0.1:8080", public)
    assert ws_bridge.origin_allowed("https://remotecli.example.com:443", "127.0.0.1:8080", public)
    # Behind the proxy the request's Host is not the users' origin: only the public URL's counts.
    for origin in ("http://remotecli.example.com", "http://127.0.0.1:8080", "https://other.example.com"):
        assert not ws_bridge.origin_allowed(origin, "127.0.0.1:8080", public), origin


def test_terminal_refuses_a_foreign_origin_before_the_ticket(ctx: AppContext, client: TestClient,
                                                            ptys: list[_EchoPty]) -> None:
    alice, auth = _user(ctx, "alice")
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    url = client.post(f"/api/v1/vms/{vm.id}/terminal", headers=auth).json()["url"].removeprefix("ws://testserver")
    for origin in ("https://evil.test", "null"):
        assert _refused(client, url, {"Origin": origin}) == (4403, "origin_not_allowed")
    assert ptys == []
    # The refused attempts did not spend the ticket: the dashboard's own page opens it.
    with client.websocket_connect(url, headers={"Origin": "http://testserver"}) as ws:
        ws.send_bytes(b"hi")
        assert ws.receive_bytes() == b"hi"
    assert len(ptys) == 1
    # A client without Origin (a script) still works with a ticket of its own.
    url = client.post(f"/api/v1/vms/{vm.id}/terminal", headers=auth).json()["url"].removeprefix("ws://testserver")
    with client.websocket_connect(url) as ws:
        ws.send_bytes(b"again")
        assert ws.receive_bytes() == b"again"


def test_vnc_refuses_a_foreign_origin(ctx: AppContext, client: TestClient) -> None:
    alice, auth = _user(ctx, "alice")
    session_id = _awaiting_user(ctx, alice)
    url = client.get(f"/api/v1/auth-sessions/{session_id}?vnc=1", headers=auth).json()["vnc_url"]
    path = url.removeprefix("ws://testserver")
    assert _refused(client, path, {"Origin": "https://evil.test"}) == (4403, "origin_not_allowed")
    with ctx.db.read() as db:
        assert db.scalars(select(WsTicket.used_at)).all() == [None]


# ----------------------------------------------------------------------------------------------
# Ticket URLs and when tickets are issued


def test_ticket_urls_follow_the_public_url(ctx: AppContext, client: TestClient) -> None:
    alice, auth = _user(ctx, "alice")
    vm, _ = vm_manager.ensure_cli_vm(ctx, alice)
    session_id = _awaiting_user(ctx, alice)
    assert client.post(f"/api/v1/vms/{vm.id}/terminal", headers=auth).json()["url"].startswith(
        f"ws://testserver/api/v1/vms/{vm.id}/terminal?token=")
    ctx.settings.public_url = PUBLIC + "/"
    terminal = client.post(f"/api/v1/vms/{vm.id}/terminal", headers=auth).json()["url"]
    assert terminal.startswith(f"wss://remotecli.example.com/api/v1/vms/{vm.id}/terminal?token=")
    vnc = client.get(f"/api/v1/auth-sessions/{session_id}?vnc=1", headers=auth).json()["vnc_url"]
    assert vnc.startswith(f"wss://remotecli.example.com/api/v1/auth-sessions/{session_id}/vnc?token=")
    ctx.settings.public_url = "http://10.0.0.5:8080"
    assert client.post(f"/api/v1/vms/{vm.id}/terminal", headers=auth).json()["url"].startswith(
        "ws://10.0.0.5:8080/api/v1/vms/")


def test_a_status_poll_issues_no_vnc_ticket(ctx: AppContext, client: TestClient) -> None:
    alice, auth = _user(ctx, "alice")
    session_id = _awaiting_user(ctx, alice)
    for _ in range(3):
        body: dict[str, Any] = client.get(f"/api/v1/auth-sessions/{session_id}", headers=auth).json()
        assert body["status"] == "awaiting_user" and body["vnc_url"] is None
    assert _tickets(ctx) == 0
    asked = client.get(f"/api/v1/auth-sessions/{session_id}?vnc=1", headers=auth).json()
    assert asked["vnc_url"] and "token=" in asked["vnc_url"]
    assert _tickets(ctx) == 1
    # Another user's or an admin's poll with ?vnc=1 issues nothing either (the screen is the owner's).
    _, other = _user(ctx, "bob")
    assert client.get(f"/api/v1/auth-sessions/{session_id}?vnc=1", headers=other).status_code == 404
    assert _tickets(ctx) == 1


# ----------------------------------------------------------------------------------------------
# The VNC view's clipboard rule (issue 13): RfbClipboardFilter


def _rfb_streams() -> tuple[bytes, bytes, bytes, bytes]:
    """(server stream, what the user must get, client stream, what the guest must get)."""
    from remotecli.api.ws_bridge import _LAST_RECT, _RAW, _ZRLE

    def s32(value: int) -> bytes:
        return value.to_bytes(4, "big", signed=True)

    def rect(encoding: int, w: int, h: int, body: bytes) -> bytes:
        return b"\0\0\0\0" + w.to_bytes(2, "big") + h.to_bytes(2, "big") + s32(encoding) + body

    pixel_format = bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])
    init = (b"\x04\x00\x03\x00" + pixel_format + (6).to_bytes(4, "big") + b"remote")
    cut = b"\x03\0\0\0" + (11).to_bytes(4, "big") + b"copied-text"
    update = (b"\x00\x00" + (3).to_bytes(2, "big") + rect(_RAW, 2, 2, b"\x03" * 16)  # raw: 2*2*4 bytes
              + rect(_ZRLE, 8, 8, (5).to_bytes(4, "big") + b"\x03\x03\x03\x03\x03")
              + rect(_LAST_RECT, 0, 0, b""))
    server_head = b"RFB 003.008\n" + b"\x01\x01" + b"\0\0\0\0" + init
    server = server_head + update + cut + b"\x02" + update
    expected_server = server_head + update + b"\x02" + update
    encodings = [7, _ZRLE, _RAW, -239, -1063131698, -312, -313, -258]
    set_encodings = b"\x02\0" + len(encodings).to_bytes(2, "big") + b"".join(s32(e) for e in encodings)
    kept = [_ZRLE, _RAW, -239]
    kept_encodings = b"\x02\0" + len(kept).to_bytes(2, "big") + b"".join(s32(e) for e in kept)
    paste = b"\x06\0\0\0" + (8).to_bytes(4, "big") + b"password"
    head = b"RFB 003.008\n" + b"\x01" + b"\x01"
    rest = b"\x03\x01\0\0\0\0\x04\x00\x03\x00" + b"\x04\x01\0\0\0\0\xff\x0d" + paste + b"\x05\0\0\x10\0\x20"
    return server, expected_server, head + set_encodings + rest, head + kept_encodings + rest


def test_rfb_filter_drops_the_guests_clipboard_and_passes_the_users_paste() -> None:
    from remotecli.api.ws_bridge import RfbClipboardFilter

    server, want_server, client, want_client = _rfb_streams()
    # The handshake in its real order (each side waits for the other), then everything else, cut
    # into frames of every size.
    steps = [("s", 0, 12), ("c", 0, 12), ("s", 12, 14), ("c", 12, 14), ("s", 14, len(server)), ("c", 14, len(client))]
    for chunk in (1, 7, 64, 100_000):
        rfb = RfbClipboardFilter()
        got_server = got_client = b""
        for side, start, end in steps:
            for i in range(start, end, chunk):
                if side == "s":
                    got_server += rfb.from_server(server[i:min(i + chunk, end)])
                else:
                    got_client += rfb.from_client(client[i:min(i + chunk, end)])
        assert got_server == want_server  # the copied text never reaches the user
        assert b"copied-text" not in got_server and rfb.dropped == 1
        assert got_client == want_client  # the paste goes in; encodings the filter cannot measure are dropped


def test_rfb_filter_fails_closed_on_what_it_cannot_follow() -> None:
    from remotecli.api.ws_bridge import RfbClipboardFilter, RfbFilterError

    rfb = RfbClipboardFilter()
    rfb.from_server(b"RFB 003.008\n")
    rfb.from_client(b"RFB 003.008\n")
    with pytest.raises(RfbFilterError):
        rfb.from_server(b"\x01\x10")  # offers only a security type it does not know...
        rfb.from_client(b"\x10")  # ...and the client takes it
        rfb.from_server(b"\0\0\0\0")
