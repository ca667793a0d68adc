"""Capacity admission with real QEMU guests, a real controller and the test IdP, on a host whose
``host_memory_mib`` holds one sign-in (a CLI VM and a Browser VM) and no more.

One test, three boots: another user's VM takes most of the room; a creation beyond capacity is
refused (503 ``host_at_capacity``, ``Retry-After``) and leaves no row, home, directory or QEMU
process; a sign-in then waits, saying so, and once the other VM is destroyed it boots its two VMs,
the user logs in over VNC, and the credentials land in the CLI VM.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from remotecli.db.models import Vm, Volume
from remotecli.services import users as users_service
from remotecli.services.signin_state import WAITING_FOR_CAPACITY
from tests.e2e.conftest import Controller
from tests.e2e.test_auth_real_vms import _log_in_over_vnc, _read_in_cli_vm
from tests.support.net import qemu_pids_naming

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

CLI_MIB = 1024  # tests/integration/conftest.qemu_settings
BROWSER_MIB = 1536
OTHER_MIB = 2048  # the other user's VM: with it, neither a CLI VM nor a sign-in fits


@pytest.fixture(autouse=True)
def _small_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Room for exactly one sign-in (set before the controller fixture builds its settings)."""
    monkeypatch.setenv("REMOTECLI_HOST_MEMORY_MIB", str(CLI_MIB + BROWSER_MIB))
    monkeypatch.setenv("REMOTECLI_HOST_CAPACITY_RETRY_AFTER_S", "20")


def _host_state(controller: Controller) -> tuple[list[tuple[str, str]], int, list[str], list[int]]:
    ctx = controller.ctx
    with ctx.db.read() as db:
        vms = sorted((v.id, v.status) for v in db.scalars(select(Vm)))
        volumes = int(db.scalar(select(func.count()).select_from(Volume)) or 0)
    dirs = sorted(p.name for p in ctx.settings.vms_dir.iterdir()) if ctx.settings.vms_dir.is_dir() else []
    return vms, volumes, dirs, sorted(qemu_pids_naming(f"{ctx.settings.data_dir}/"))


def _wait_message(controller: Controller, session_id: str, text: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = controller.api("GET", f"/api/v1/auth-sessions/{session_id}").json()
        if text.lower() in (body.get("message") or "").lower():
            return body
        time.sleep(0.5)
    raise AssertionError(f"the session never said {text!r}: {body}")


def test_beyond_capacity_is_refused_and_a_signin_waits_for_room(controller: Controller) -> None:
    ctx = controller.ctx
    assert ctx.settings.cli_vm_memory_mib == CLI_MIB and ctx.settings.browser_vm_memory_mib == BROWSER_MIB
    other = users_service.create_user(ctx.db, "other")
    _, token = users_service.create_token(ctx.db, other)
    other_headers = {"Authorization": f"Bearer {token}"}
    created = httpx.post(f"{controller.url}/api/v1/vms", json={"vm_type": "cli", "memory_mib": OTHER_MIB},
                         headers=other_headers, timeout=300)
    assert created.status_code == 201, created.text
    other_vm = created.json()["id"]

    # Beyond capacity: refused before any row, home volume, directory or QEMU process exists.
    before = _host_state(controller)
    assert len(before[3]) == 1  # the other user's QEMU
    refused = controller.api("POST", "/api/v1/vms", json={"vm_type": "cli"})
    assert refused.status_code == 503 and refused.json()["code"] == "host_at_capacity", refused.text
    assert refused.headers["Retry-After"] == "20"
    assert _host_state(controller) == before
    metrics = httpx.get(f"{controller.url}/metrics", timeout=30).text
    assert f'remotecli_capacity_memory_mib{{state="used"}} {OTHER_MIB}' in metrics

    # A sign-in waits for room, saying so, and goes on once the other VM is destroyed.
    started = controller.api("POST", "/api/v1/auth-sessions", json={"provider": "claude_code"})
    assert started.status_code == 201, started.text
    session_id = started.json()["id"]
    waiting = _wait_message(controller, session_id, "waiting for capacity")
    assert waiting["status"] == "provisioning" and waiting["message"] == WAITING_FOR_CAPACITY
    assert _host_state(controller)[3] == before[3]  # nothing of the sign-in boots while it waits
    gone = httpx.delete(f"{controller.url}/api/v1/vms/{other_vm}", headers=other_headers, timeout=120)
    assert gone.status_code == 200, gone.text
    body = controller.wait_status(session_id, {"awaiting_user", "failed", "expired"})
    assert body["status"] == "awaiting_user", body
    body = controller.api("GET", f"/api/v1/auth-sessions/{session_id}?vnc=1").json()
    _log_in_over_vnc(controller, body)
    done = controller.wait_status(session_id, {"completed", "failed"})
    assert done["status"] == "completed", done
    creds, mode, _owner = _read_in_cli_vm(controller, done["cli_vm_id"], "/home/cli/.claude/.credentials.json")
    assert creds["claudeAiOauth"]["accessToken"] and mode == 0o600
    kinds = [e["kind"] for e in controller.api("GET", f"/api/v1/auth-sessions/{session_id}/events").json()["items"]]
    assert "auth.waiting_for_capacity" in kinds and "auth.capacity_found" in kinds
