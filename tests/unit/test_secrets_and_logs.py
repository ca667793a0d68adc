"""Secrets never reach logs, events, API responses or exception messages; logs are structured JSON."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.crypto import DecryptionFailed, SecretBox, load_or_create_key
from remotecli.db.models import Event, Vm
from remotecli.logging import JsonFormatter, get_logger, log_context, redact
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal


def test_key_file_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "k" / "secret.key"
    key = load_or_create_key(path)
    assert len(key) == 32 and (path.stat().st_mode & 0o777) == 0o600
    assert load_or_create_key(path) == key


def test_aes_gcm_binds_associated_data(tmp_path: Path) -> None:
    box = SecretBox.from_key_file(tmp_path / "key")
    sealed = box.encrypt_text("s3cr3t", "agent-secret:vm-1")
    assert b"s3cr3t" not in sealed
    assert box.decrypt_text(sealed, "agent-secret:vm-1") == "s3cr3t"
    with pytest.raises(DecryptionFailed) as info:
        box.decrypt_text(sealed, "agent-secret:vm-2")
    assert "s3cr3t" not in str(info.value)


def test_redact_removes_token_shapes() -> None:
    text = ('Bearer rcli_abcdefghijklmnopqrstuvwx access_token="ya29.AAAAAAAA" password=hunter22 '
            'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl')
    cleaned = redact(text)
    for secret in ("rcli_abcdefghijklmnopqrstuvwx", "ya29.AAAAAAAA", "hunter22", "eyJhbGciOiJIUzI1NiJ9"):
        assert secret not in cleaned


def test_json_log_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = get_logger("vm-manager")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with log_context(user_id="u1", session_id="s1"):
            logger.info("Resuming VM", extra={"vm_id": "vm-1"})
    finally:
        logger.removeHandler(handler)
    record = json.loads(stream.getvalue())
    assert record["module"] == "vm-manager" and record["message"] == "Resuming VM"
    assert (record["vm_id"], record["user_id"], record["session_id"]) == ("vm-1", "u1", "s1")


def test_agent_secret_and_token_never_leak(ctx: AppContext, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    user = users_service.create_user(ctx.db, "alice")
    _, token = users_service.create_token(ctx.db, user)
    principal = Principal(user.id, user.name, False)
    with TestClient(create_app(ctx)) as client:
        headers = {"Authorization": f"Bearer {token}"}
        responses = [client.post("/api/v1/vms/ensure", json={}, headers=headers)]
        vm_id = responses[0].json()["id"]
        responses += [client.get(f"/api/v1/vms/{vm_id}", headers=headers), client.get("/api/v1/vms", headers=headers),
                      client.post(f"/api/v1/vms/{vm_id}/pause", headers=headers),
                      client.delete(f"/api/v1/vms/{vm_id}", headers=headers)]
    vm = vm_manager.get_vm(ctx, principal, vm_id)
    secret = ctx.agent_secret(vm)
    with ctx.db.read() as session:
        events = list(session.scalars(select(Event)))
        raw = session.scalars(select(Vm.agent_secret_enc)).one()
    assert secret.encode() not in raw  # encrypted at rest
    haystacks = [r.text for r in responses] + [caplog.text] + [
        f"{e.message} {e.details}" for e in events
    ]
    for haystack in haystacks:
        assert secret not in haystack
        assert token not in haystack


def test_key_ring_decrypts_with_any_key_and_reloads(tmp_path: Path) -> None:
    from remotecli.crypto import read_key_ring, write_key_ring

    path = tmp_path / "secret.key"
    box = SecretBox.from_key_file(path)
    sealed = box.encrypt(b"payload", b"aad")
    old = read_key_ring(path)
    new_key = b"\x01" * 32
    write_key_ring(path, [new_key, *old])  # mid-rotation: both keys
    assert SecretBox.from_key_file(path).decrypt(sealed, b"aad") == b"payload"
    resealed = SecretBox([new_key]).encrypt(b"payload", b"aad")
    write_key_ring(path, [new_key])  # rotation finished
    # A process still holding the old ring reloads the file when a decryption fails.
    assert box.decrypt(resealed, b"aad") == b"payload"


def test_uvicorn_websocket_lines_carry_no_ticket(ctx: AppContext, tmp_path: Path) -> None:
    """uvicorn writes '"WebSocket /path?token=..." [accepted]' (logger uvicorn.error) even with the
    access log off: served for real, through the controller's own log configuration, the ticket
    is redacted in the log file."""
    from websockets.exceptions import WebSocketException
    from websockets.sync.client import connect

    from remotecli.logging import configure_logging
    from tests.support.server import free_port, serve_app

    log_file = tmp_path / "controller.log"
    configure_logging("INFO", log_file, stderr=False)
    ticket_value = "TicketValue-9f8e7d6c5b4a3210-abcdef"
    port = free_port()
    try:
        with serve_app(create_app(ctx, background=False), port):
            for path in ("/api/v1/vms/vm-x/terminal", "/api/v1/auth-sessions/as-x/vnc"):
                url = f"ws://127.0.0.1:{port}{path}?token={ticket_value}&cols=80"
                with contextlib.suppress(WebSocketException, OSError, TimeoutError), connect(url, open_timeout=9) as ws:
                    ws.recv(timeout=5)  # the refusal (4401): the ticket is forged
    finally:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if getattr(handler, "_remotecli", False):
                root.removeHandler(handler)
                handler.close()
    text = log_file.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    websocket_lines = [line["message"] for line in lines if '"WebSocket /api/v1/' in line["message"]]
    assert len(websocket_lines) == 2, text  # the lines the finding was about are there ...
    assert all("?token=[redacted]&cols=80" in message for message in websocket_lines), websocket_lines
    assert ticket_value not in text  # ... and the ticket is in none of them
