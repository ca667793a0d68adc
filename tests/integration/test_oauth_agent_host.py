"""The guest agent's OAuth flows on the host, with real parts: Chromium on Xvfb, a real OpenID
Connect provider (``tests/support/idp``, oidc-provider), the real guest agent as a subprocess, and
the sign-in driven through the browser with keyboard events only (xdotool).

Needs the Debian packages chromium, xvfb and xdotool (installed here with apt when missing and
root), and node + npm for the IdP. Profiles come from ``remotecli.profiles``, pointed at the IdP
through their ``REMOTECLI_PROVIDER_*`` environment overrides.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import remotecli.agent.guest as guest_package
from remotecli.agent.client import AgentCallError, AgentClient
from remotecli.agent.protocol import OAuthFlowSpec, OAuthFlowState
from remotecli.config import Settings
from remotecli.profiles import ProviderProfile, load_profiles
from remotecli.services.providers import render_credentials
from tests.support.idp_server import Idp, IdpUnavailable, run_idp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SECRET = "browser-vm-secret-" + "z" * 32
PASSWORD = "idp-password-for-tests"
APT_PACKAGES = {"chromium": "chromium", "Xvfb": "xvfb", "xdotool": "xdotool"}
TERMINAL = ("completed", "denied", "failed")


def _ensure_tools() -> None:
    missing = sorted({pkg for tool, pkg in APT_PACKAGES.items() if shutil.which(tool) is None})
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            env=env,
            check=False,
            capture_output=True,
            timeout=600,
        )
    still = [tool for tool in APT_PACKAGES if shutil.which(tool) is None]
    if still:
        pytest.skip(f"needs {', '.join(still)} (Debian packages {', '.join(APT_PACKAGES[t] for t in still)})")
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("needs node and npm for the test identity provider")


# --- fixtures: Xvfb, the IdP, the agent ------------------------------------------------------


@dataclass
class Display:
    name: str
    process: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DISPLAY": self.name}

    def xdotool(self, *args: str) -> None:
        subprocess.run(["xdotool", *args], env=self.env(), check=True, timeout=20, capture_output=True)

    def type_text(self, text: str) -> None:
        self.xdotool("type", "--delay", "15", text)

    def key(self, *keys: str) -> None:
        self.xdotool("key", *keys)


@pytest.fixture(scope="module")
def display() -> Iterator[Display]:
    _ensure_tools()
    number = next(n for n in range(87, 200) if not Path(f"/tmp/.X11-unix/X{n}").exists())
    process = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    socket_path = Path(f"/tmp/.X11-unix/X{number}")
    end = time.monotonic() + 10
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > end:
            process.kill()
            pytest.fail(f"Xvfb :{number} did not start")
        time.sleep(0.05)
    yield Display(f":{number}", process)
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@pytest.fixture(scope="module")
def idp(display: Display) -> Iterator[Idp]:
    try:
        with run_idp(password=PASSWORD) as running:
            yield running
    except IdpUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def profiles(idp: Idp, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ProviderProfile]:
    env: dict[str, str] = {}
    scopes = {"claude_code": "openid email offline_access", "codex": "openid profile email offline_access"}
    for name, client_id in idp.clients.items():
        prefix = f"REMOTECLI_PROVIDER_{name.upper()}_"
        env[prefix + "AUTHORIZE_URL"] = idp.authorize_url
        env[prefix + "TOKEN_URL"] = idp.token_url
        env[prefix + "CLIENT_ID"] = client_id
        if name in scopes:
            env[prefix + "SCOPES"] = scopes[name]
    env["REMOTECLI_PROVIDER_GEMINI_CLIENT_SECRET"] = idp.gemini_client_secret
    env["REMOTECLI_PROVIDER_GEMINI_SCOPES"] = "openid email https://www.googleapis.com/auth/cloud-platform"
    return load_profiles(Settings(data_dir=tmp_path_factory.mktemp("data")), environ=env)


@dataclass
class RunningAgent:
    process: subprocess.Popen[bytes]
    port: int
    log_lines: list[str] = field(default_factory=list)

    def client(self) -> AgentClient:
        return AgentClient(f"tcp://127.0.0.1:{self.port}", SECRET, timeout=20)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, display: Display) -> Iterator[RunningAgent]:
    workdir = tmp_path_factory.mktemp("browser-agent")
    shutil.copytree(
        Path(guest_package.__file__).parent,
        workdir / "remotecli_guest",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    config = {
        "vm_id": "vm-browser",
        "vm_type": "browser",
        "agent_secret": SECRET,
        "agent_port": 7000,
        "hostname": "browser.guest",
        "cli_user": "root",
    }
    (workdir / "config.img").write_bytes(json.dumps(config).encode().ljust(4096, b"\0"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(workdir)}
    argv = [sys.executable, "-S", "-m", "remotecli_guest", "--config", str(workdir / "config.img")]
    process = subprocess.Popen(
        [*argv, "--listen-host", "127.0.0.1", "--port", "0"],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    found: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            lines.append(line)
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "listening":
                    found.append(int(record["port"]))
                    ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(15):
        process.kill()
        pytest.fail("agent did not start:\n" + "\n".join(lines))
    running = RunningAgent(process, found[0], lines)
    yield running
    process.terminate()
    assert process.wait(10) == 0
    # Logs never carry the agent secret, the state, codes or tokens.
    logs = "\n".join(lines)
    assert SECRET not in logs
    for marker in ("access_token\":\"", "code=", "state=", "code_verifier"):
        assert marker not in logs


@pytest.fixture
def client(agent: RunningAgent) -> Iterator[AgentClient]:
    with agent.client() as c:
        yield c


# --- helpers --------------------------------------------------------------------------------------


def _browser_user() -> str | None:
    """``nobody`` runs Chromium with its sandbox when we can switch users; else the current user."""
    return "nobody" if os.geteuid() == 0 else None


def _start(client: AgentClient, profile: ProviderProfile, display: Display, flow_id: str) -> OAuthFlowState:
    spec = profile.oauth_spec(flow_id).with_browser(display=display.name, user=_browser_user())
    answer = client.oauth_start(spec)
    assert answer.flow_id == flow_id
    assert answer.status in ("starting", "page_loading")
    return answer


def _wait(client: AgentClient, flow_id: str, until: Any, timeout: float = 30.0) -> OAuthFlowState:
    end = time.monotonic() + timeout
    state = client.oauth_status(flow_id)
    while not until(state):
        if time.monotonic() > end:
            raise AssertionError(f"flow {flow_id} stuck: {_public(state)}")
        if state.status in TERMINAL and not until(state):
            raise AssertionError(f"flow {flow_id} ended unexpectedly: {_public(state)}")
        time.sleep(0.05)
        state = client.oauth_status(flow_id)
    return state


def _public(state: OAuthFlowState) -> dict[str, Any]:
    return state.model_dump(exclude={"result"})


def _title_has(text: str) -> Any:
    return lambda state: text in (state.page_title or "") or state.status in TERMINAL


def _focus(display: Display) -> None:
    # No window manager on Xvfb: keyboard focus follows the pointer; put it over the window.
    display.xdotool("mousemove", "640", "400")


def _log_in(client: AgentClient, display: Display, flow_id: str, user: str = "alice") -> None:
    _wait(client, flow_id, lambda s: s.status == "awaiting_user")
    _wait(client, flow_id, _title_has("Sign in"))
    _focus(display)
    display.type_text(user)
    display.key("Tab")
    display.type_text(PASSWORD)
    display.key("Return")
    _wait(client, flow_id, _title_has("Authorize"))


def _chromium_alive() -> list[int]:
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        state = stat[stat.rindex(")") + 2]
        if state not in ("Z", "X") and b"remotecli-oauth-" in cmdline:
            alive.append(int(entry))
    return alive


def _get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# --- tests ---------------------------------------------------------------------------------------


def test_sign_in_through_the_browser_completes(
    client: AgentClient, display: Display, profiles: dict[str, ProviderProfile], idp: Idp
) -> None:
    profile = profiles["claude_code"]  # localhost, any port, JSON token request
    started = time.monotonic()
    answer = _start(client, profile, display, "flow-complete")
    assert answer.redirect_uri.startswith("http://localhost:")
    assert answer.redirect_uri.endswith("/callback")
    state = _wait(client, "flow-complete", lambda s: s.status == "awaiting_user")
    to_awaiting = time.monotonic() - started
    assert state.page_url.startswith(idp.url + "/")
    assert "?" not in state.page_url  # no query (state, code) is ever shown
    assert state.result is None
    _log_in(client, display, "flow-complete")
    display.key("Return")  # "Allow" has the focus
    state = _wait(client, "flow-complete", lambda s: s.status in TERMINAL)
    to_completed = time.monotonic() - started
    assert state.status == "completed", _public(state)
    result = state.result.as_dict()
    for key in ("access_token", "refresh_token", "id_token", "obtained_at"):
        assert result[key], key
    assert result["token_type"] == "Bearer"
    assert state.error_code is None and state.refused_callbacks == 0
    # The tokens are real: the IdP's userinfo endpoint accepts the access token.
    request = urllib.request.Request(
        idp.discovery["userinfo_endpoint"], headers={"Authorization": f"Bearer {result['access_token']}"}
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as info:
        assert json.loads(info.read())["sub"] == "alice"
    rendered = render_credentials(profile, result, result["obtained_at"])
    assert rendered.metadata["account"] == "alice@example.test"
    print(f"\noauth timing: awaiting_user after {to_awaiting:.2f} s, completed after {to_completed:.2f} s")
    client.oauth_cancel("flow-complete")
    with pytest.raises(AgentCallError) as caught:
        client.oauth_status("flow-complete")
    assert caught.value.status == 404


def test_deny_ends_denied(client: AgentClient, display: Display, profiles: dict[str, ProviderProfile]) -> None:
    _start(client, profiles["codex"], display, "flow-deny")  # localhost:1455/auth/callback
    _log_in(client, display, "flow-deny", user="bob")
    display.key("Tab")  # from "Allow" to "Deny"
    display.key("Return")
    state = _wait(client, "flow-deny", lambda s: s.status in TERMINAL)
    assert state.status == "denied", _public(state)
    assert state.error_code == "access_denied"
    assert state.result is None
    client.oauth_cancel("flow-deny")


def test_wrong_state_is_refused_and_the_flow_still_completes(
    client: AgentClient, display: Display, profiles: dict[str, ProviderProfile]
) -> None:
    answer = _start(client, profiles["gemini"], display, "flow-state")  # 127.0.0.1, client secret
    redirect = answer.redirect_uri
    assert redirect.startswith("http://127.0.0.1:") and redirect.endswith("/oauth2callback")
    _wait(client, "flow-state", lambda s: s.status == "awaiting_user")
    status, body = _get(f"{redirect}?code=stolen-code&state=not-the-state")
    assert status == 400
    assert "This sign-in link is not valid" in body
    status, _ = _get(f"{redirect}?code=stolen-code")
    assert status == 400
    state = client.oauth_status("flow-state")
    assert state.refused_callbacks == 2
    assert state.status == "awaiting_user"
    _log_in(client, display, "flow-state", user="carol")
    display.key("Return")
    state = _wait(client, "flow-state", lambda s: s.status in TERMINAL)
    assert state.status == "completed", _public(state)
    assert state.result.as_dict()["refresh_token"]
    # Only one successful callback per flow.
    status, _ = _get(f"{redirect}?code=again&state=whatever")
    assert status == 400
    client.oauth_cancel("flow-state")


def test_delete_stops_chromium_and_is_idempotent(
    client: AgentClient, display: Display, profiles: dict[str, ProviderProfile]
) -> None:
    answer = _start(client, profiles["claude_code"], display, "flow-delete")
    _wait(client, "flow-delete", lambda s: s.status == "awaiting_user")
    assert _chromium_alive()
    client.oauth_cancel("flow-delete")
    end = time.monotonic() + 10
    while _chromium_alive() and time.monotonic() < end:
        time.sleep(0.1)
    assert _chromium_alive() == []
    client.oauth_cancel("flow-delete")  # idempotent
    with pytest.raises(AgentCallError):
        client.oauth_status("flow-delete")
    # The loopback listener is gone too.
    with pytest.raises(OSError):
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(answer.redirect_uri, timeout=3)


def test_bad_requests(client: AgentClient) -> None:
    with pytest.raises(AgentCallError) as caught:
        client.oauth_start(OAuthFlowSpec.model_construct(flow_id="x"))  # sends {"flow_id": "x"} only
    assert caught.value.status == 400 and caught.value.agent_code == "invalid_request"
    with pytest.raises(AgentCallError) as caught:
        client.oauth_status("no-such-flow")
    assert caught.value.status == 404
    client.oauth_cancel("no-such-flow")


def test_refused_code_exchange_fails_the_flow(
    client: AgentClient, display: Display, profiles: dict[str, ProviderProfile]
) -> None:
    spec = profiles["gemini"].oauth_spec("flow-badsecret").model_copy(update={"client_secret": "not-the-client-secret"})
    spec = spec.with_browser(display=display.name, user=_browser_user())
    client.oauth_start(spec)
    _log_in(client, display, "flow-badsecret", user="dave")
    display.key("Return")
    state = _wait(client, "flow-badsecret", lambda s: s.status in TERMINAL)
    assert state.status == "failed", _public(state)
    assert state.error_code == "token_exchange_failed"
    assert "invalid_client" in state.error_message
    assert "not-the-client-secret" not in state.model_dump_json()
    assert state.result is None
    client.oauth_cancel("flow-badsecret")
