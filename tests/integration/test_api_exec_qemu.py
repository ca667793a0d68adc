"""POST /api/v1/vms/{id}/exec against a real guest (QEMU, real guest agent), through the real app."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_exec_over_the_api_in_a_real_guest(qctx: AppContext, owner: Principal) -> None:
    _, token = users_service.create_token(qctx.db, users_service.get_user_by_name(qctx.db, owner.name))
    other = users_service.create_user(qctx.db, "intruder")
    _, other_token = users_service.create_token(qctx.db, other)
    vm, _ = vm_manager.ensure_cli_vm(qctx, owner)
    with TestClient(create_app(qctx, background=False)) as client:
        url = f"/api/v1/vms/{vm.id}/exec"
        headers = {"Authorization": f"Bearer {token}"}
        body = client.post(url, headers=headers, json={"argv": ["uname", "-r"], "timeout_s": 60}).json()
        assert body["exit_code"] == 0 and "cloud-amd64" in body["stdout"], body
        as_cli = client.post(url, headers=headers, json={
            "argv": ["sh", "-c", 'id -un; pwd; echo "$GREETING"; cat'], "user": "cli",
            "env": {"GREETING": "hello"}, "cwd": "/tmp", "stdin_b64": base64.b64encode(b"from-stdin").decode(),
        }).json()
        assert as_cli["stdout"].splitlines() == ["cli", "/tmp", "hello", "from-stdin"], as_cli
        slow = client.post(url, headers=headers, json={"argv": ["sleep", "30"], "timeout_s": 1}).json()
        assert slow["timed_out"] is True and slow["duration_s"] < 20
        # The guest's own refusals are the caller's errors, in words, not a 502.
        missing = client.post(url, headers=headers, json={"argv": ["/no/such/program"]})
        assert missing.status_code == 422 and missing.json()["code"] == "invalid_input", missing.text
        nobody = client.post(url, headers=headers, json={"argv": ["true"], "user": "nosuchuser"})
        assert nobody.status_code == 422 and nobody.json()["code"] == "invalid_input", nobody.text
        foreign = client.post(url, headers={"Authorization": f"Bearer {other_token}"}, json={"argv": ["true"]})
        assert foreign.status_code == 404 and foreign.json()["code"] == "vm_not_found"
