"""Codex's device-code sign-in, browserless, in a real QEMU guest.

The controller (uvicorn, QEMU driver) runs ``codex login --device-auth`` in the user's CLI VM as
the CLI user through the exec path, shows the one-time code and link it printed
(``GET /api/v1/device-signins/{id}``), and the real Codex writes its own file. Inside that guest
only, ``auth.openai.com`` is redirected to the test IdP (tests/support/guest_redirect.py), which
speaks Codex's device-code endpoints; the test plays the user by approving the code at the IdP.
The verdict is the real Codex's, offline: ``codex login status`` → "Logged in using ChatGPT".
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.db.models import Vm
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal
from tests.integration.conftest import close_and_clean, qemu_settings, require_images
from tests.support.cli_judge import assert_cli_signed_in
from tests.support.guest_redirect import GuestRedirect, install_redirect, make_test_ca
from tests.support.idp_server import Idp, run_idp
from tests.support.server import free_port, serve_app

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

PASSWORD = "device-test-password"
CODEX_CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"


@dataclass
class World:
    ctx: AppContext
    idp: Idp
    url: str
    headers: dict[str, str]
    vm: Vm
    guest: GuestRedirect

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", headers=self.headers, timeout=60, **kwargs)

    def wait(self, signin_id: str, statuses: set[str], timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = self.api("GET", f"/api/v1/device-signins/{signin_id}").json()
            if body["status"] in statuses:
                return body
            time.sleep(0.5)
        raise AssertionError(f"device sign-in stuck: {body}\n{self.idp.logs()[-3000:]}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("device")
    ca = make_test_ca(tmp / "ca")
    port = free_port()
    with run_idp(port=port, issuer=f"http://10.0.2.2:{port}", password=PASSWORD,
                 tls=(ca.cert_path, ca.key_path), tls_port=free_port()) as idp:
        assert idp.tls_port
        settings = qemu_settings(f"sqlite:///{tmp / 'device.db'}", guest_host_allowed_ports=[idp.port, idp.tls_port])
        require_images(settings, "cli")
        ctx = AppContext.create(settings)
        try:
            user = users_service.create_user(ctx.db, "deviceuser")
            _, token = users_service.create_token(ctx.db, user)
            # The user's CLI VM, with auth.openai.com redirected inside it (the device sign-in
            # takes this very VM: it is the user's live one).
            vm, _ = vm_manager.ensure_cli_vm(ctx, Principal(user.id, user.name, False))
            guest = install_redirect(ctx, vm, idp_tls_port=idp.tls_port, ca_pem=ca.ca_pem)
            with serve_app(create_app(ctx, background=True), free_port()) as url:
                yield World(ctx, idp, url, {"Authorization": f"Bearer {token}"}, vm, guest)
        finally:
            close_and_clean(ctx)


def _approve(world: World, user_code: str, decision: str = "allow") -> None:
    """The user, on another device: opens the link, signs in, enters the code."""
    answer = httpx.post(f"{world.idp.url}/codex/device", timeout=30,
                        data={"user_code": user_code, "username": "alice", "password": PASSWORD, "decision": decision})
    assert answer.status_code == 200, answer.text


def test_codex_device_signin_shows_the_code_and_codex_signs_itself_in(world: World) -> None:
    started = world.api("POST", "/api/v1/device-signins", json={"provider": "codex"})
    assert started.status_code == 201, started.text
    body = started.json()
    assert body["status"] == "starting" and body["provider"] == "codex"

    shown = world.wait(body["id"], {"awaiting_user", "failed", "expired"})
    assert shown["status"] == "awaiting_user", shown
    assert re.fullmatch(r"[A-Z0-9]{4}-[A-Z0-9]{4}", shown["user_code"]), shown
    assert shown["verification_uri"] == "https://auth.openai.com/codex/device"
    assert shown["user_code"] in shown["message"] and shown["verification_uri"] in shown["message"]
    assert shown["cli_vm_id"] == world.vm.id
    # Codex asked for it at the provider's host, caught in the guest and answered by the IdP.
    asked = world.idp.events("device_code")
    assert [(e["client_id"], e["host"], e["user_code"]) for e in asked] == [
        (CODEX_CLIENT_ID, "auth.openai.com", shown["user_code"])]

    _approve(world, shown["user_code"])
    done = world.wait(body["id"], {"signed_in", "failed", "expired"})
    assert done["status"] == "signed_in", done
    assert "Logged in using ChatGPT" in done["message"] and done["ended_at"]
    grants = [g for g in world.idp.events("grant") if g["grant_type"] == "authorization_code"]
    assert [(g["client_id"], g["host"], g["path"], g["tls"]) for g in grants] == [
        (CODEX_CLIENT_ID, "auth.openai.com", "/oauth/token", True)]
    # Codex wrote its own file, and says so offline.
    auth = world.guest.read_json("/home/cli/.codex/auth.json")
    assert auth["tokens"]["refresh_token"] and auth["tokens"]["id_token"]
    assert_cli_signed_in(world.ctx, world.vm.id, "codex")
    listed = world.api("GET", "/api/v1/device-signins").json()["items"]
    assert [item["id"] for item in listed] == [body["id"]]
    assert all("access_token" not in str(item) for item in listed)


def test_a_denied_code_ends_failed_with_words(world: World) -> None:
    body = world.api("POST", "/api/v1/device-signins", json={"provider": "codex"}).json()
    shown = world.wait(body["id"], {"awaiting_user", "failed", "expired"})
    assert shown["status"] == "awaiting_user", shown
    _approve(world, shown["user_code"], decision="deny")
    done = world.wait(body["id"], {"signed_in", "failed", "expired"})
    assert done["status"] == "failed" and done["error_code"] == "device_signin_failed", done
    assert done["message"].startswith("The CLI's device sign-in failed: "), done


def test_bad_requests_are_refused_with_a_code(world: World) -> None:
    unsupported = world.api("POST", "/api/v1/device-signins", json={"provider": "gemini"})
    assert (unsupported.status_code, unsupported.json()["code"]) == (422, "device_signin_unsupported")
    assert "no device-code sign-in" in unsupported.json()["message"]
    unknown = world.api("POST", "/api/v1/device-signins", json={"provider": "nope"})
    assert (unknown.status_code, unknown.json()["code"]) == (422, "unknown_provider")
    missing = world.api("GET", "/api/v1/device-signins/dev_0000000000000000")
    assert (missing.status_code, missing.json()["code"]) == (404, "device_signin_not_found")
    anonymous = httpx.get(f"{world.url}/api/v1/device-signins", timeout=30)
    assert anonymous.status_code == 401
