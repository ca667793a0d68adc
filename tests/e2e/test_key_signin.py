"""Key sign-in and credential health with one real CLI VM (QEMU), judged by the real CLIs offline.

One CLI VM for the module. Through the controller's API (uvicorn on loopback): a pasted key for
each provider (Anthropic API key, Claude long-lived token, OpenAI API key, Gemini API key) is
delivered the way its CLI takes it, and the real CLI in the guest, in a network namespace of its
own (tests/support/cli_judge.py, key modes), says it is signed in. GET /api/v1/credentials reads the
state from the guest now: signed in, then signed out when the files are cleared in the guest
(a Codex OAuth file rendered by the project's credential writer, then cleared; the key file
removed). A bad key is refused with nothing delivered; no key or token appears in any response,
the controller's log or the events. A stopped workspace is reported as stopped, not booted.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from remotecli.agent.protocol import CLI_ENV_FILE
from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.db.models import Event
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.providers import render_credentials
from tests.integration.conftest import close_and_clean, qemu_settings, require_images
from tests.support.cli_judge import assert_cli_signed_in
from tests.support.server import free_port, serve_app

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

# Shaped like the providers' keys; never valid anywhere (and the guest is offline when judged).
KEYS = {
    ("claude_code", "api_key"): "sk-ant-api03-" + "E2eKey_" * 13 + "tail-AA",
    ("claude_code", "oauth_token"): "sk-ant-oat01-" + "E2eTok-" * 12 + "tail_BB",
    ("codex", "api_key"): "sk-proj-" + "E2eOpenAI_" * 12,
    ("gemini", "api_key"): "AIzaSy" + "E2eGem" * 5 + "XYZ",
}
CODEX_ACCESS = "codex-access-e2e-9b8a7c6d"
CODEX_REFRESH = "codex-refresh-e2e-1f2e3d4c"


@dataclass
class Api:
    ctx: AppContext
    url: str
    headers: dict[str, str]
    responses: list[str]

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = httpx.request(method, f"{self.url}{path}", headers=self.headers, timeout=600, **kwargs)
        self.responses.append(response.text)
        return response

    def health(self, **params: str) -> dict[str, Any]:
        answer = self.call("GET", "/api/v1/credentials", params=params)
        assert answer.status_code == 200, answer.text
        doc: dict[str, Any] = answer.json()
        return doc

    def state(self, provider: str) -> dict[str, Any]:
        return next(p for p in self.health()["providers"] if p["provider"] == provider)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("keys")
    settings = qemu_settings(f"sqlite:///{tmp / 'keys.db'}")
    require_images(settings, "cli")
    ctx = AppContext.create(settings)
    user = users_service.create_user(ctx.db, "keys")
    _, token = users_service.create_token(ctx.db, user)
    try:
        with serve_app(create_app(ctx, background=False), free_port()) as url:
            yield Api(ctx, url, {"Authorization": f"Bearer {token}"}, [])
    finally:
        close_and_clean(ctx)


@pytest.fixture(scope="module")
def log_capture() -> Iterator[list[str]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record) + " " + json.dumps({k: str(v) for k, v in record.__dict__.items()
                                                                 if k.startswith("x_")}))

    handler = Keep(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(handler)
    root.setLevel(old_level)


def _vm_id(api: Api) -> str:
    doc = api.health()
    assert doc["vm_id"], doc
    return str(doc["vm_id"])


def _guest(api: Api, vm_id: str, script: str) -> None:
    vm = vm_manager.get_vm(api.ctx, None, vm_id)
    agent = api.ctx.agent(vm)
    try:
        result = agent.exec(["sh", "-c", script], timeout_s=60, user=api.ctx.settings.cli_guest_user)
    finally:
        agent.close()
    assert result.ok, result.stderr.decode(errors="replace")


def test_bad_key_is_refused_before_anything_boots(api: Api, log_capture: list[str]) -> None:
    answer = api.call("POST", "/api/v1/credentials/keys",
                      json={"provider": "gemini", "kind": "api_key", "key": KEYS[("codex", "api_key")]})
    assert answer.status_code == 422 and answer.json()["code"] == "key_provider_mismatch"
    assert vm_manager.list_vms(api.ctx, None) == []


@pytest.mark.parametrize(("provider", "kind"), list(KEYS), ids=[f"{p}-{k}" for p, k in KEYS])
def test_key_sign_in_judged_by_the_real_cli(api: Api, log_capture: list[str], provider: str, kind: str) -> None:
    answer = api.call("POST", "/api/v1/credentials/keys",
                      json={"provider": provider, "kind": kind, "key": KEYS[(provider, kind)]})
    assert answer.status_code == 201, answer.text
    done = answer.json()
    assert done["state"] == "signed_in" and done["method"] == kind
    verdict = assert_cli_signed_in(api.ctx, done["vm_id"], provider, mode=kind)
    print(f"{provider}/{kind}: {verdict}")
    health = api.state(provider)
    assert health["state"] == "signed_in" and health["method"] == kind and not health["reauthenticate"]


def test_health_goes_from_signed_in_to_signed_out_when_the_files_are_cleared(api: Api,
                                                                             log_capture: list[str]) -> None:
    vm_id = _vm_id(api)
    # A Codex ChatGPT sign-in's file as the project's credential writer renders it.
    claims = base64.urlsafe_b64encode(json.dumps(
        {"email": "keys@example.com", "https://api.openai.com/auth": {"chatgpt_account_id": "acct-e2e"}}
    ).encode()).decode().rstrip("=")
    access = "eyJhbGciOiJub25lIn0." + base64.urlsafe_b64encode(json.dumps(
        {"exp": int(time.time()) + 3600, "jti": CODEX_ACCESS}).encode()).decode().rstrip("=") + ".c2ln"
    rendered = render_credentials(api.ctx.providers["codex"], {
        "access_token": access, "refresh_token": CODEX_REFRESH, "id_token": f"eyJhbGciOiJub25lIn0.{claims}.c2ln",
        "expires_in": 3600, "obtained_at": time.time()}, time.time())
    vm = vm_manager.get_vm(api.ctx, None, vm_id)
    agent = api.ctx.agent(vm)
    try:
        for item in rendered.files:
            agent.write_file(f"{api.ctx.settings.cli_guest_home}/{item.path}", item.content, mode=item.mode,
                             owner=api.ctx.settings.cli_guest_user)
    finally:
        agent.close()
    codex = api.state("codex")
    assert codex["state"] == "signed_in" and codex["method"] == "oauth" and codex["has_refresh_token"]
    assert codex["account"] == "keys@example.com" and codex["access_expires_at"] and codex["refreshed_at"]
    assert_cli_signed_in(api.ctx, vm_id, "codex")  # the real Codex agrees: Logged in using ChatGPT
    # The CLI cleared its tokens (as Codex does when its refresh is refused): signed out.
    _guest(api, vm_id, ': > "$HOME/.codex/auth.json"')
    codex = api.state("codex")
    assert codex["state"] == "signed_out" and codex["reauthenticate"]
    # The key sign-ins' environment file removed: Claude Code and Gemini CLI are signed out too.
    assert {api.state(p)["state"] for p in ("claude_code", "gemini")} == {"signed_in"}
    _guest(api, vm_id, f'rm -f "$HOME/{CLI_ENV_FILE}"')
    doc = api.health()
    assert {p["provider"]: p["state"] for p in doc["providers"]} == {
        "claude_code": "signed_out", "codex": "signed_out", "gemini": "signed_out"}
    assert all(p["reauthenticate"] for p in doc["providers"])


def test_a_stopped_workspace_is_not_booted_to_read_health(api: Api, log_capture: list[str]) -> None:
    vm_id = _vm_id(api)
    assert api.call("POST", f"/api/v1/vms/{vm_id}/stop").json()["status"] == "stopped"
    doc = api.health()
    assert doc["workspace"] == "stopped" and {p["state"] for p in doc["providers"]} == {"workspace_stopped"}
    assert vm_manager.get_vm(api.ctx, None, vm_id).status == "stopped"


def test_no_key_or_token_in_responses_logs_or_events(api: Api, log_capture: list[str]) -> None:
    with api.ctx.db.read() as session:
        events = [f"{e.kind} {e.message} {json.dumps(e.details)}" for e in session.scalars(select(Event))]
    assert any("credentials.key_delivered" in e for e in events)
    haystack = "\n".join([*api.responses, *log_capture, *events])
    for secret in [*KEYS.values(), CODEX_ACCESS, CODEX_REFRESH]:
        assert secret not in haystack and secret[-20:] not in haystack
