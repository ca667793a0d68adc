"""services.device_signin with the fake driver: the prompt parser against the real Codex 0.171's
output, the state machine (starting → awaiting_user → signed_in / failed / expired) with a scripted
guest in place of the exec path, and refusals. The real Codex in a real guest is in
tests/e2e/test_device_signin.py."""

from __future__ import annotations

import logging
import shlex
from typing import Any

import pytest

from remotecli.agent.protocol import ExecResult
from remotecli.context import AppContext
from remotecli.errors import DeviceSigninNotFound, DeviceSigninUnsupported, UnknownProvider
from remotecli.services import device_signin, vm_exec
from remotecli.services import users as users_service
from remotecli.services.users import Principal

# What `codex login --device-auth` (0.171.0) printed in a test run (its colours included).
CODEX_PROMPT = (
    "\nWelcome to Codex [v\x1b[90m0.171.0\x1b[0m]\n\x1b[90mOpenAI's command-line coding agent\x1b[0m\n\n"
    "Follow these steps to sign in with ChatGPT using device code authorization:\n\n"
    "1. Open this link in your browser and sign in to your account\n"
    "   \x1b[94mhttps://auth.openai.com/codex/device\x1b[0m\n\n"
    "2. Enter this one-time code \x1b[90m(expires in 15 minutes)\x1b[0m\n   \x1b[94m3CMC-62J5\x1b[0m\n\n"
    "\x1b[90mContinue only if you started this login in Codex. If a website or another person gave you this code, "
    "cancel.\x1b[0m\n\n"
)


def test_parse_prompt_reads_the_real_codex_output() -> None:
    assert device_signin.parse_prompt(CODEX_PROMPT) == ("https://auth.openai.com/codex/device", "3CMC-62J5")
    assert device_signin.parse_prompt("Welcome to Codex\n") == (None, None)


class ScriptedGuest:
    """Stands in for vm_exec.exec_in_vm: the CLI's output file grows as the script says."""

    def __init__(self, outputs: list[str], exit_code: int | None, status: str = "Logged in using ChatGPT") -> None:
        self.outputs = outputs
        self.exit_code = exit_code
        self.status = status
        self.calls: list[dict[str, Any]] = []

    def __call__(self, ctx: AppContext, principal: Principal | None, vm_id: str, argv: list[str], *,
                 timeout_s: float = 60, user: str | None = None, env: dict[str, str] | None = None,
                 cwd: str | None = None, stdin: bytes | None = None) -> ExecResult:
        self.calls.append({"argv": argv, "user": user})
        script = argv[-1]
        out = b""
        if script.startswith("mkdir -p"):
            assert "setsid -f sh -c" in script and shlex.join(["codex", "login", "--device-auth"]) in script
        elif script.startswith("cat "):
            ended = len(self.outputs) == 1 and self.exit_code is not None
            text = self.outputs.pop(0) if len(self.outputs) > 1 else self.outputs[0]
            out = f"{text}\n@@exit={self.exit_code if ended else ''}\n".encode()
        elif script == "codex login status":
            out = self.status.encode()
        return ExecResult(exit_code=0, stdout=out, stderr=b"", timed_out=False, duration_s=0.01)


@pytest.fixture
def principal(ctx: AppContext) -> Principal:
    user = users_service.create_user(ctx.db, "dev")
    return Principal(user.id, user.name, False)


def _run(ctx: AppContext, principal: Principal, guest: ScriptedGuest, monkeypatch: pytest.MonkeyPatch,
         provider: str = "codex") -> device_signin.DeviceSignin:
    monkeypatch.setattr(vm_exec, "exec_in_vm", guest)
    monkeypatch.setattr(device_signin, "POLL_INTERVAL_S", 0)
    started = device_signin.start(ctx, principal, provider, runner=lambda work: work())
    return device_signin.get(ctx, principal, started.id)


def test_signed_in_keeps_the_code_and_runs_as_the_cli_user(ctx: AppContext, principal: Principal,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    guest = ScriptedGuest(["", CODEX_PROMPT, CODEX_PROMPT + "Successfully logged in\n"], exit_code=0)
    done = _run(ctx, principal, guest, monkeypatch)
    assert done.status == device_signin.DeviceStatus.SIGNED_IN, done
    assert (done.user_code, done.verification_uri) == ("3CMC-62J5", "https://auth.openai.com/codex/device")
    assert "Logged in using ChatGPT" in done.message and done.ended_at is not None and done.cli_vm_id
    assert {call["user"] for call in guest.calls} == {ctx.settings.cli_guest_user}
    assert "device sign-in signed_in" in caplog.text
    assert "3CMC-62J5" not in caplog.text  # the one-time code is the user's alone


def test_a_cli_failure_ends_failed_with_its_words(ctx: AppContext, principal: Principal,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    guest = ScriptedGuest([CODEX_PROMPT, CODEX_PROMPT + "Error logging in: device auth failed with status 400\n"],
                          exit_code=1)
    done = _run(ctx, principal, guest, monkeypatch)
    assert done.status == device_signin.DeviceStatus.FAILED and done.error_code == "device_signin_failed"
    assert done.message == "The CLI's device sign-in failed: Error logging in: device auth failed with status 400"


def test_an_expired_code_ends_expired(ctx: AppContext, principal: Principal, monkeypatch: pytest.MonkeyPatch) -> None:
    guest = ScriptedGuest([CODEX_PROMPT, CODEX_PROMPT + "Error: device auth timed out after 15 minutes\n"],
                          exit_code=1)
    done = _run(ctx, principal, guest, monkeypatch)
    assert done.status == device_signin.DeviceStatus.EXPIRED and done.error_code == "device_code_expired"


def test_finished_but_not_signed_in_is_a_failure(ctx: AppContext, principal: Principal,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    guest = ScriptedGuest([CODEX_PROMPT + "Successfully logged in\n"], exit_code=0, status="Not logged in")
    done = _run(ctx, principal, guest, monkeypatch)
    assert done.status == device_signin.DeviceStatus.FAILED and done.error_code == "device_signin_unverified"


def test_refusals_and_visibility(ctx: AppContext, principal: Principal, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnknownProvider):
        device_signin.start(ctx, principal, "nope", runner=lambda work: None)
    with pytest.raises(DeviceSigninUnsupported):
        device_signin.start(ctx, principal, "gemini", runner=lambda work: None)
    mine = device_signin.start(ctx, principal, "codex", runner=lambda work: None)
    assert mine.status == device_signin.DeviceStatus.STARTING
    other = users_service.create_user(ctx.db, "other")
    with pytest.raises(DeviceSigninNotFound):
        device_signin.get(ctx, Principal(other.id, other.name, False), mine.id)
    admin = Principal(other.id, other.name, True)
    assert device_signin.get(ctx, admin, mine.id).id == mine.id
    assert [s.id for s in device_signin.list_mine(ctx, principal)] == [mine.id]
    assert device_signin.list_mine(ctx, Principal(other.id, other.name, False)) == []
