"""Secrets never reach logs, events, API responses or exception messages; logs are structured JSON."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from remotecli.api.app import create_app
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
