"""REST API on a real database with the fake driver: contract, bad input, isolation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.db.models import ApiToken, Event, Vm
from remotecli.domain.states import VmStatus
from remotecli.drivers.fake import FakeDriver
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.transitions import set_vm_status
from remotecli.services.users import Principal


@pytest.fixture
def client(ctx: AppContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), raise_server_exceptions=False) as test_client:
        yield test_client


def _token(ctx: AppContext, name: str, admin: bool = False) -> dict[str, str]:
    user = users_service.create_user(ctx.db, name, is_admin=admin)
    _, token = users_service.create_token(ctx.db, user)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def alice(ctx: AppContext) -> dict[str, str]:
    return _token(ctx, "alice")


@pytest.fixture
def bob(ctx: AppContext) -> dict[str, str]:
    return _token(ctx, "bob")


def _state(ctx: AppContext) -> tuple[int, int, list[tuple[str, str, int]]]:
    with ctx.db.transaction() as session:
        vms = [(v.id, v.status, v.generation) for v in session.scalars(select(Vm).order_by(Vm.id))]
        events = int(session.scalar(select(func.count()).select_from(Event)) or 0)
        return len(vms), events, vms


def test_health_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["migrations"] == "ok"
    spec = client.get("/openapi.json").json()
    for path in (
        "/api/v1/vms",
        "/api/v1/vms/{vm_id}",
        "/api/v1/vms/ensure",
        "/api/v1/vms/{vm_id}/stop",
        "/api/v1/vms/{vm_id}/pause",
        "/api/v1/vms/{vm_id}/resume",
    ):
        assert path in spec["paths"]


def test_vm_lifecycle_over_http(client: TestClient, alice: dict[str, str]) -> None:
    created = client.post("/api/v1/vms", json={"vm_type": "cli"}, headers=alice)
    assert created.status_code == 201, created.text
    vm = created.json()
    assert vm["status"] == "running" and vm["memory_mib"] == 2048
    assert "agent_secret" not in created.text and "secret" not in created.text
    vm_id = vm["id"]
    assert client.get(f"/api/v1/vms/{vm_id}", headers=alice).json()["id"] == vm_id
    assert [v["id"] for v in client.get("/api/v1/vms", headers=alice).json()["items"]] == [vm_id]
    assert client.post(f"/api/v1/vms/{vm_id}/pause", headers=alice).json()["status"] == "paused"
    assert client.post(f"/api/v1/vms/{vm_id}/resume", headers=alice).json()["status"] == "running"
    assert client.post(f"/api/v1/vms/{vm_id}/stop", headers=alice).json()["status"] == "stopped"
    resumed = client.post(f"/api/v1/vms/{vm_id}/resume", headers=alice)
    assert resumed.status_code == 409 and resumed.json()["code"] == "invalid_transition"
    assert client.delete(f"/api/v1/vms/{vm_id}", headers=alice).json()["status"] == "destroyed"
    again = client.post(f"/api/v1/vms/{vm_id}/resume", headers=alice)
    assert again.status_code == 409 and again.json()["code"] == "vm_terminal"


def test_ensure_200_existing_201_created(client: TestClient, alice: dict[str, str]) -> None:
    first = client.post("/api/v1/vms/ensure", json={"vm_type": "cli"}, headers=alice)
    assert first.status_code == 201
    second = client.post("/api/v1/vms/ensure", json={"vm_type": "cli"}, headers=alice)
    assert second.status_code == 200 and second.json()["id"] == first.json()["id"]
    assert client.post("/api/v1/vms/ensure", json={}, headers=alice).status_code == 200


def test_seed_case_over_http(ctx: AppContext, client: TestClient, alice: dict[str, str]) -> None:
    import shutil

    old = client.post("/api/v1/vms/ensure", json={"vm_type": "cli"}, headers=alice).json()
    with ctx.db.transaction() as session:
        row = session.get(Vm, old["id"])
        assert row is not None
        set_vm_status(session, row, VmStatus.FAILED, module="test", message="died", reason="test")
    shutil.rmtree(row.directory)
    new = client.post("/api/v1/vms/ensure", json={"vm_type": "cli"}, headers=alice)
    assert new.status_code == 201 and new.json()["id"] != old["id"]
    assert client.get(f"/api/v1/vms/{old['id']}", headers=alice).json()["status"] == "failed"


def test_running_row_dead_on_host_over_http(
    client: TestClient, alice: dict[str, str], fake_driver: FakeDriver
) -> None:
    old = client.post("/api/v1/vms/ensure", json={"vm_type": "cli"}, headers=alice).json()
    fake_driver.kill(old["id"])
    new = client.post("/api/v1/vms/ensure", json={"vm_type": "cli"}, headers=alice)
    assert new.status_code == 201 and new.json()["id"] != old["id"]
    stale = client.get(f"/api/v1/vms/{old['id']}", headers=alice).json()
    assert stale["status"] == "failed" and stale["status_reason"]


BAD_REQUESTS = [
    ("post", "/api/v1/vms", {"json": {"vm_type": "gpu"}}, 422, "unknown_vm_type"),
    ("post", "/api/v1/vms", {"json": {"vm_type": "cli", "memory_mib": -5}}, 422, "invalid_input"),
    ("post", "/api/v1/vms", {"json": {"vm_type": "cli", "vcpus": 0}}, 422, "invalid_input"),
    ("post", "/api/v1/vms", {"json": {"vm_type": "cli", "vcpus": "many"}}, 422, "invalid_input"),
    ("post", "/api/v1/vms", {"json": {"vm_type": "cli", "surprise": 1}}, 422, "invalid_input"),
    ("post", "/api/v1/vms", {"json": {}}, 422, "invalid_input"),
    ("post", "/api/v1/vms", {"json": [1, 2]}, 422, "invalid_input"),
    (
        "post",
        "/api/v1/vms",
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        "malformed_json",
    ),
    ("post", "/api/v1/vms/ensure", {"json": {"vm_type": "browser"}}, 422, "invalid_input"),
    (
        "post",
        "/api/v1/vms/ensure",
        {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}},
        400,
        "malformed_json",
    ),
    ("get", "/api/v1/vms/vm-does-not-exist", {}, 404, "vm_not_found"),
    ("delete", "/api/v1/vms/vm-does-not-exist", {}, 404, "vm_not_found"),
    ("post", "/api/v1/vms/vm-does-not-exist/stop", {}, 404, "vm_not_found"),
    ("post", "/api/v1/vms/vm-does-not-exist/pause", {}, 404, "vm_not_found"),
    ("post", "/api/v1/vms/vm-does-not-exist/resume", {}, 404, "vm_not_found"),
    ("get", "/api/v1/nothing-here", {}, 404, "not_found"),
    ("put", "/api/v1/vms", {"json": {}}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize("method,path,kwargs,status,code", BAD_REQUESTS)
def test_bad_input_is_4xx_with_code_and_changes_nothing(
    ctx: AppContext,
    client: TestClient,
    alice: dict[str, str],
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    code: str,
) -> None:
    client.post("/api/v1/vms", json={"vm_type": "cli"}, headers=alice)
    before = _state(ctx)
    kwargs = dict(kwargs)  # parametrize shares the dict between database kinds
    headers = {**alice, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    response = getattr(client, method)(path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["message"]
    assert _state(ctx) == before


ENDPOINTS = [
    ("get", "/api/v1/vms/{id}"),
    ("delete", "/api/v1/vms/{id}"),
    ("post", "/api/v1/vms/{id}/stop"),
    ("post", "/api/v1/vms/{id}/pause"),
    ("post", "/api/v1/vms/{id}/resume"),
    ("post", "/api/v1/vms/{id}/start"),
]


@pytest.mark.parametrize("method,template", ENDPOINTS)
def test_someone_elses_vm_is_404_and_unchanged(
    ctx: AppContext,
    client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    method: str,
    template: str,
) -> None:
    vm_id = client.post("/api/v1/vms", json={"vm_type": "cli"}, headers=alice).json()["id"]
    before = _state(ctx)
    response = getattr(client, method)(template.format(id=vm_id), headers=bob)
    assert response.status_code == 404 and response.json()["code"] == "vm_not_found"
    assert _state(ctx) == before
    assert client.get("/api/v1/vms", headers=bob).json()["items"] == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer rcli_wrong"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer not-even-a-token"},
    ],
)
def test_missing_or_bad_token_is_401(ctx: AppContext, client: TestClient, headers: dict[str, str]) -> None:
    before = _state(ctx)
    for method, path, kwargs in [
        ("get", "/api/v1/vms", {}),
        ("post", "/api/v1/vms", {"json": {"vm_type": "cli"}}),
        ("post", "/api/v1/vms/ensure", {"json": {}}),
    ]:
        response = getattr(client, method)(path, headers=headers, **kwargs)
        assert response.status_code == 401 and response.json()["code"] == "authentication_required"
    assert _state(ctx) == before


def test_expired_and_revoked_tokens_are_refused(
    ctx: AppContext, client: TestClient, alice: dict[str, str]
) -> None:
    import datetime as dt

    from remotecli.db.models import utcnow

    assert client.get("/api/v1/vms", headers=alice).status_code == 200
    with ctx.db.transaction() as session:
        token = session.scalars(select(ApiToken)).one()
        token.expires_at = utcnow() - dt.timedelta(seconds=1)
    assert client.get("/api/v1/vms", headers=alice).json()["code"] == "authentication_required"
    with ctx.db.transaction() as session:
        token = session.scalars(select(ApiToken)).one()
        token.expires_at = None
        token.revoked_at = utcnow()
    assert client.get("/api/v1/vms", headers=alice).status_code == 401


def test_admin_may_list_everyone(ctx: AppContext, client: TestClient, alice: dict[str, str]) -> None:
    admin = _token(ctx, "root", admin=True)
    vm_id = client.post("/api/v1/vms", json={"vm_type": "cli"}, headers=alice).json()["id"]
    assert client.get("/api/v1/vms", headers=admin).json()["items"] == []
    assert [v["id"] for v in client.get("/api/v1/vms?all=true", headers=admin).json()["items"]] == [vm_id]
    assert client.get(f"/api/v1/vms/{vm_id}", headers=admin).status_code == 200
    # all=true means nothing for a plain user.
    assert len(client.get("/api/v1/vms?all=true", headers=_token(ctx, "carol")).json()["items"]) == 0


def test_body_size_limit_is_413_with_code(ctx: AppContext, client: TestClient, alice: dict[str, str]) -> None:
    before = _state(ctx)
    big = b'{"vm_type": "cli", "pad": "' + b"x" * (ctx.settings.max_request_body_bytes + 10) + b'"}'
    response = client.post("/api/v1/vms", content=big, headers={**alice, "content-type": "application/json"})
    assert response.status_code == 413 and response.json()["code"] == "request_too_large"

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"vm_type": "cli", "pad": "'
        for _ in range(ctx.settings.max_request_body_bytes // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    streamed = client.post("/api/v1/vms", content=chunks(), headers={**alice, "content-type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["code"] == "request_too_large"
    assert _state(ctx) == before


def test_vm_creation_rate_limit(ctx: AppContext, client: TestClient, alice: dict[str, str]) -> None:
    ctx.settings.max_vm_creations_per_user_per_minute = 2
    first = client.post("/api/v1/vms", json={"vm_type": "cli"}, headers=alice)
    assert first.status_code == 201
    # A sign-in's Browser VM (created by the sign-in worker, not through this endpoint) counts too.
    owner = next(u for u in users_service.list_users(ctx.db) if u.name == "alice")
    vm_manager.create_vm(ctx, Principal(owner.id, owner.name, False), "browser")
    assert client.delete(f"/api/v1/vms/{first.json()['id']}", headers=alice).status_code == 200
    before = _state(ctx)
    third = client.post("/api/v1/vms", json={"vm_type": "cli"}, headers=alice)
    assert third.status_code == 429 and third.json()["code"] == "vm_rate_limited"
    assert _state(ctx) == before


def test_live_vm_limit_and_no_browser_vms_through_the_api(
    ctx: AppContext, client: TestClient, alice: dict[str, str]
) -> None:
    before = _state(ctx)
    browser = client.post("/api/v1/vms", json={"vm_type": "browser"}, headers=alice)
    assert browser.status_code == 403 and browser.json()["code"] == "browser_vm_not_allowed"
    assert _state(ctx) == before
    ctx.settings.max_live_vms_per_user = 1
    owner = next(u for u in users_service.list_users(ctx.db) if u.name == "alice")
    vm_manager.create_vm(ctx, Principal(owner.id, owner.name, False), "browser")  # a sign-in's
    before = _state(ctx)
    refused = client.post("/api/v1/vms", json={"vm_type": "cli"}, headers=alice)
    assert refused.status_code == 429 and refused.json()["code"] == "too_many_live_vms"
    assert _state(ctx) == before
