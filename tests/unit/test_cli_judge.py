"""The offline CLI verdicts of tests/support/cli_judge.py, on what the pinned CLIs print."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import cli_judge

CLAUDE_OK = 'WARN something\n{\n  "loggedIn": true,\n  "authMethod": "claude.ai",\n  "email": "alice@example.test"\n}\n'
CLAUDE_NO_INFERENCE_SCOPE = '{\n  "loggedIn": false,\n  "authMethod": "none"\n}\n'
GEMINI_OK = (
    "Cached credentials are not valid: request to https://oauth2.googleapis.com/tokeninfo failed, reason: "
    "getaddrinfo EAI_AGAIN oauth2.googleapis.com\nError authenticating: FatalAuthenticationError: Manual "
    "authorization is required but the current session is non-interactive.\n"
)
GEMINI_EXPIRED = GEMINI_OK.replace("/tokeninfo", "/token")
GEMINI_NO_SETTINGS = "Please set an Auth method in your /home/cli/.gemini/settings.json or specify ...\n"


@pytest.mark.parametrize(
    ("provider", "code", "output", "ok"),
    [
        ("claude_code", 0, CLAUDE_OK, True),
        ("claude_code", 0, CLAUDE_NO_INFERENCE_SCOPE, False),
        ("claude_code", 1, "not json", False),
        ("codex", 0, "WARNING: proceeding ...\nLogged in using ChatGPT\n", True),
        ("codex", 1, "Not logged in\n", False),
        ("gemini", 41, GEMINI_OK, True),  # 41 either way offline: the output decides
        ("gemini", 41, GEMINI_EXPIRED, False),
        ("gemini", 41, GEMINI_NO_SETTINGS, False),
    ],
)
def test_verdicts(monkeypatch: pytest.MonkeyPatch, provider: str, code: int, output: str, ok: bool) -> None:
    seen: list[list[str]] = []

    def fake_run(ctx: Any, vm_id: str, argv: list[str], timeout_s: float = 300.0) -> tuple[int, str]:
        seen.append(argv)
        return code, output

    monkeypatch.setattr(cli_judge, "run_offline", fake_run)
    if ok:
        assert cli_judge.assert_cli_signed_in(None, "vm-1", provider)  # type: ignore[arg-type]
    else:
        with pytest.raises(cli_judge.CliVerdictError):
            cli_judge.assert_cli_signed_in(None, "vm-1", provider)  # type: ignore[arg-type]
    assert seen == [cli_judge.COMMANDS[provider]]
