"""End-to-end fixtures: a real controller (uvicorn on 127.0.0.1) with the QEMU driver, real guest
images, and a real OpenID Connect provider (oidc-provider) that guests reach through QEMU's
user-mode network (10.0.2.2 is the host's loopback as seen from a guest).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.services import users as users_service
from remotecli.services.users import Principal
from tests.integration.conftest import close_and_clean, qemu_settings, require_images
from tests.support.idp_server import CLIENT_IDS, GEMINI_CLIENT_SECRET, Idp, run_idp
from tests.support.server import free_port, serve_app

IDP_PASSWORD = "correct-horse-battery"
PLANTED_ACCESS = "at-planted-e2e-7f3a9c1d2b4e6f80"
PLANTED_REFRESH = "rt-planted-e2e-1a2b3c4d5e6f7a8b"


@pytest.fixture
def idp() -> Iterator[Idp]:
    port = free_port()
    # The issuer is what a guest sees: QEMU user networking maps 10.0.2.2 to the host's loopback.
    with run_idp(port=port, issuer=f"http://10.0.2.2:{port}", password=IDP_PASSWORD,
                 planted_access_token=PLANTED_ACCESS, planted_refresh_token=PLANTED_REFRESH) as server:
        yield server


@dataclass
class Controller:
    ctx: AppContext
    url: str
    principal: Principal
    headers: dict[str, str]
    responses: list[str]

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = httpx.request(method, f"{self.url}{path}", headers=self.headers, timeout=60, **kwargs)
        self.responses.append(response.text)
        return response

    def wait_status(self, session_id: str, statuses: set[str], timeout: float = 420) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = self.api("GET", f"/api/v1/auth-sessions/{session_id}").json()
            if body["status"] in statuses:
                return body
            time.sleep(1)
        events = self.api("GET", f"/api/v1/auth-sessions/{session_id}/events").json().get("items", [])
        timeline = "\n".join(f"  {e['at']} {e['kind']:22} {e['to_status'] or '':14} {e['message']}" for e in events)
        raise AssertionError(f"session stuck: {body}\ntimeline:\n{timeline}")


@pytest.fixture
def controller(tmp_path: Path, idp: Idp, monkeypatch: pytest.MonkeyPatch) -> Iterator[Controller]:
    base = idp.issuer
    for name, client_id in CLIENT_IDS.items():
        prefix = f"REMOTECLI_PROVIDER_{name.upper()}_"
        monkeypatch.setenv(prefix + "AUTHORIZE_URL", f"{base}/auth")
        monkeypatch.setenv(prefix + "TOKEN_URL", f"{base}/token")
        monkeypatch.setenv(prefix + "CLIENT_ID", client_id)
        # user:inference + user:profile: without them Claude Code calls the login "none" (not claude.ai).
        monkeypatch.setenv(prefix + "SCOPES", "openid email offline_access user:profile user:inference")
    monkeypatch.setenv("REMOTECLI_PROVIDER_GEMINI_CLIENT_SECRET", GEMINI_CLIENT_SECRET)
    # The browser VM reaches the IdP on the host's loopback: the one host port guests may use.
    settings = qemu_settings(f"sqlite:///{tmp_path / 'e2e.db'}", guest_host_allowed_ports=[idp.port])
    require_images(settings, "cli", "browser")
    ctx = AppContext.create(settings)
    user = users_service.create_user(ctx.db, "e2e")
    _, token = users_service.create_token(ctx.db, user)
    try:
        with serve_app(create_app(ctx, background=True), free_port(), ws="websockets") as url:
            yield Controller(ctx, url, Principal(user.id, user.name, False), {"Authorization": f"Bearer {token}"}, [])
    finally:
        close_and_clean(ctx)
