"""POST /api/v1/vms/{id}/exec with the fake driver: contract, limits, errors, no leaks.

The same endpoint against a real guest: tests/integration/test_api_exec_qemu.py.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.drivers.fake import FakeAgent, FakeDriver
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal


@pytest.fixture
def api(ctx: AppContext) -> Iterator[tuple[TestClient, dict[str, str], Principal]]:
    user = users_service.create_user(ctx.db, "alice")
    _, token = users_service.create_token(ctx.db, user)
    with TestClient(create_app(ctx, background=False)) as client:
        yield client, {"Authorization": f"Bearer {token}"}, Principal(user.id, user.name, False)


def test_exec_runs_and_returns_text_and_bytes(ctx: AppContext, api: tuple[TestClient, dict[str, str], Principal],
                                              fake_driver: FakeDriver, caplog: pytest.LogCaptureFixture) -> None:
    client, headers, alice = api
    caplog.set_level(logging.DEBUG)
    vm = vm_manager.create_vm(ctx, alice, "cli")
    fake_driver._vms[vm.id].files["/home/cli/note"] = (b"secret-note-\xff\n", 0o600, "cli")
    response = client.post(f"/api/v1/vms/{vm.id}/exec", headers=headers,
                           json={"argv": ["cat", "/home/cli/note"], "timeout_s": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["exit_code"] == 0 and not body["timed_out"]
    assert base64.b64decode(body["stdout_b64"]) == b"secret-note-\xff\n"  # exact bytes
    assert body["stdout"] == "secret-note-\ufffd\n"  # text with the undecodable byte replaced
    failing = client.post(f"/api/v1/vms/{vm.id}/exec", headers=headers, json={"argv": ["no-such-program"]}).json()
    assert failing["exit_code"] == 127 and "command not found" in failing["stderr"]
    stdin = client.post(f"/api/v1/vms/{vm.id}/exec", headers=headers,
                        json={"argv": ["cat"], "stdin_b64": base64.b64encode(b"from stdin").decode()}).json()
    assert stdin["stdout"] == "from stdin"
    # Neither the arguments nor the output reach the log.
    assert "secret-note" not in caplog.text and "/home/cli/note" not in caplog.text


@pytest.mark.parametrize("body,code", [
    ({"argv": []}, "invalid_input"),
    ({"argv": ["true"], "timeout_s": 0}, "invalid_input"),
    ({"argv": ["true"], "timeout_s": 100000}, "invalid_input"),
    ({"argv": ["true"], "timeout_s": 3601}, "invalid_input"),
    ({"argv": ["true"], "cwd": "relative/dir"}, "invalid_input"),
    ({"argv": ["true"], "env": {"A=B": "x"}}, "invalid_input"),
    ({"argv": ["true"], "stdin_b64": "***"}, "invalid_input"),
    ({"argv": ["true"], "user": "Root; rm -rf /"}, "invalid_input"),
    ({"argv": ["a\x00b"]}, "invalid_input"),
    ({"argv": ["true"], "shell": True}, "invalid_input"),
])
def test_bad_requests_are_refused_with_a_code(ctx: AppContext, api: tuple[TestClient, dict[str, str], Principal],
                                              body: dict[str, object], code: str) -> None:
    client, headers, alice = api
    vm = vm_manager.create_vm(ctx, alice, "cli")
    response = client.post(f"/api/v1/vms/{vm.id}/exec", headers=headers, json=body)
    assert response.status_code == 422 and response.json()["code"] == code, response.text


def test_exec_needs_a_running_vm(ctx: AppContext, api: tuple[TestClient, dict[str, str], Principal]) -> None:
    client, headers, alice = api
    vm = vm_manager.create_vm(ctx, alice, "cli")
    vm_manager.stop_vm(ctx, alice, vm.id)
    response = client.post(f"/api/v1/vms/{vm.id}/exec", headers=headers, json={"argv": ["true"]})
    assert response.status_code == 409 and response.json()["code"] == "vm_not_running"
    missing = client.post("/api/v1/vms/vm-nope/exec", headers=headers, json={"argv": ["true"]})
    assert missing.status_code == 404 and missing.json()["code"] == "vm_not_found"


def test_concurrent_execs_per_user_are_limited(ctx: AppContext, api: tuple[TestClient, dict[str, str], Principal],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    client, headers, alice = api
    vm = vm_manager.create_vm(ctx, alice, "cli")
    release, entered = threading.Event(), threading.Semaphore(0)
    original = FakeAgent.exec

    def slow_exec(self: FakeAgent, argv: list[str], **kwargs: object) -> object:
        entered.release()
        release.wait(10)
        return original(self, argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(FakeAgent, "exec", slow_exec)
    limit = ctx.settings.max_concurrent_execs_per_user
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(client.post(
        f"/api/v1/vms/{vm.id}/exec", headers=headers, json={"argv": ["true"]}).status_code)) for _ in range(limit)]
    for thread in threads:
        thread.start()
    for _ in range(limit):
        assert entered.acquire(timeout=10)
    refused = client.post(f"/api/v1/vms/{vm.id}/exec", headers=headers, json={"argv": ["true"]})
    assert refused.status_code == 429 and refused.json()["code"] == "too_many_execs"
    release.set()
    for thread in threads:
        thread.join(10)
    assert results == [200] * limit
    # The slots are given back: the next command runs.
    again = client.post(f"/api/v1/vms/{vm.id}/exec", headers=headers, json={"argv": ["true"]})
    assert again.status_code == 200
