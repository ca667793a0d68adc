"""The real CLI is the judge: after a sign-in, run the provider's own CLI in the CLI VM, offline, and
check that it says it is signed in with the files the controller delivered.

"Offline" means a network namespace of its own inside the guest (``unshare --net`` through the
guest agent, which runs as root; then ``runuser`` to the CLI user with a clean environment), so
nothing the CLI tries can leave the guest. What each CLI prints there, read from their code and
checked against the pinned releases:

- ``claude auth status``: JSON with ``"loggedIn": true`` and ``"authMethod": "claude.ai"`` (it
  reads ``~/.claude/.credentials.json`` and ``~/.claude.json`` without the network).
- ``codex login status``: ``Logged in using ChatGPT`` (on stderr), exit code 0.
- ``gemini --debug -p hi``: exits 41 offline whatever the files say, so the exit code cannot judge.
  With ``security.auth.selectedType`` missing it says "Please set an Auth method"; with no or
  unreadable ``oauth_creds.json``, or an expired access token, it never reaches tokeninfo. With
  valid, unexpired OAuth credentials it takes the access token from the file and fails only when
  it tries to verify it online: "Cached credentials are not valid: request to
  https://oauth2.googleapis.com/tokeninfo failed". That line is the verdict.

Usage at the end of an end-to-end sign-in test::

    verdict = assert_cli_signed_in(controller.ctx, done["cli_vm_id"], "codex")
"""

from __future__ import annotations

import json
from typing import Any

from remotecli.context import AppContext
from remotecli.services import vm_manager

__all__ = ["CliVerdictError", "assert_cli_signed_in", "run_offline"]

# Bring up loopback in the new namespace (some runtimes bind it), then drop to the CLI user with a
# minimal environment: nothing of the agent's environment (root's HOME, proxies) leaks in.
_OFFLINE_SHELL = (
    'u="$0"; h="$1"; shift; ip link set lo up 2>/dev/null; '
    'exec runuser -u "$u" -- env -i HOME="$h" USER="$u" LOGNAME="$u" TERM=dumb NO_COLOR=1 '
    'PATH=/usr/local/bin:/usr/bin:/bin "$@"'
)
GEMINI_OFFLINE_VERDICT = "Cached credentials are not valid: request to https://oauth2.googleapis.com/tokeninfo failed"
GEMINI_NO_AUTH_METHOD = "Please set an Auth method"

COMMANDS: dict[str, list[str]] = {
    "claude_code": ["claude", "auth", "status"],
    "codex": ["codex", "login", "status"],
    "gemini": ["gemini", "--debug", "-p", "hi"],
}


class CliVerdictError(AssertionError):
    """The CLI did not say it is signed in (the message has what it printed)."""


def run_offline(ctx: AppContext, vm_id: str, argv: list[str], timeout_s: float = 300.0) -> tuple[int, str]:
    """Run ``argv`` as the CLI user in a new network namespace in the CLI VM ``vm_id``; returns the
    exit code and stdout+stderr."""
    user = ctx.settings.cli_guest_user
    home = ctx.settings.cli_guest_home.rstrip("/")
    vm = vm_manager.get_vm(ctx, None, vm_id)
    agent = ctx.agent(vm)
    try:
        result = agent.exec(
            ["unshare", "--net", "--", "sh", "-c", _OFFLINE_SHELL, user, home, *argv],
            timeout_s=timeout_s,
            cwd=home,
        )
    finally:
        agent.close()
    output = result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")
    if result.timed_out:
        raise CliVerdictError(f"{' '.join(argv)} timed out after {timeout_s:g} s offline:\n{output[-3000:]}")
    return result.exit_code, output


# Key sign-in (services/key_signin.py): the key is in the CLI user's environment file, which the
# shell profile sources, so the CLI runs in a login shell (bash -l). What the pinned CLIs print then:
# ``claude auth status`` "loggedIn": true with authMethod "api_key" (ANTHROPIC_API_KEY) or
# "oauth_token" (CLAUDE_CODE_OAUTH_TOKEN); ``codex login status`` "API key configured" (exit 0);
# ``gemini -p`` with GEMINI_API_KEY and selectedType gemini-api-key passes its auth check and stops
# at the next one, the untrusted working directory (exit 55), where without the key it says it
# must have GEMINI_API_KEY (exit 41).
GEMINI_KEY_MISSING = "you must specify the GEMINI_API_KEY environment variable"
GEMINI_PAST_AUTH = "Gemini CLI is not running in a trusted directory"


def assert_cli_signed_in(ctx: AppContext, vm_id: str, provider: str, mode: str = "oauth") -> str:
    """Assert the provider's real CLI in the CLI VM says it is signed in; returns its verdict line.

    ``mode``: ``oauth`` (delivered credential files) or a key sign-in's kind, ``api_key`` or
    ``oauth_token`` (Claude's long-lived token)."""
    if mode != "oauth":
        return _assert_key_signed_in(ctx, vm_id, provider, mode)
    argv = COMMANDS[provider]
    code, output = run_offline(ctx, vm_id, argv)
    shown = f"{' '.join(argv)} (exit {code}) said:\n{output[-3000:]}"
    if provider == "claude_code":
        status = _json_object(output)
        if code != 0 or status.get("loggedIn") is not True or status.get("authMethod") != "claude.ai":
            raise CliVerdictError(f"Claude Code is not signed in: {shown}")
        return f'claude auth status: "loggedIn": true, "authMethod": "claude.ai", email {status.get("email")}'
    if provider == "codex":
        if code != 0 or "Logged in using ChatGPT" not in output:
            raise CliVerdictError(f"Codex is not signed in: {shown}")
        return "codex login status: Logged in using ChatGPT"
    if provider == "gemini":
        if GEMINI_NO_AUTH_METHOD in output or GEMINI_OFFLINE_VERDICT not in output:
            raise CliVerdictError(f"Gemini CLI did not take the delivered OAuth credentials: {shown}")
        return f"gemini -p offline: {GEMINI_OFFLINE_VERDICT} (no auth-method prompt)"
    raise ValueError(f"no CLI verdict for provider {provider!r}")


def _assert_key_signed_in(ctx: AppContext, vm_id: str, provider: str, kind: str) -> str:
    argv = ["bash", "-l", "-c", " ".join(COMMANDS[provider])]
    code, output = run_offline(ctx, vm_id, argv)
    shown = f"{' '.join(argv)} (exit {code}) said:\n{output[-3000:]}"
    if provider == "claude_code":
        status = _json_object(output)
        method = {"api_key": "api_key", "oauth_token": "oauth_token"}[kind]
        if code != 0 or status.get("loggedIn") is not True or status.get("authMethod") != method:
            raise CliVerdictError(f"Claude Code is not signed in with its {kind}: {shown}")
        return f'claude auth status: "loggedIn": true, "authMethod": "{method}"'
    if provider == "codex":
        if code != 0 or "API key configured" not in output:
            raise CliVerdictError(f"Codex is not signed in with an API key: {shown}")
        return "codex login status: API key configured"
    if provider == "gemini":
        if GEMINI_NO_AUTH_METHOD in output or GEMINI_KEY_MISSING in output or GEMINI_PAST_AUTH not in output:
            raise CliVerdictError(f"Gemini CLI did not take the API key: {shown}")
        return f"gemini -p offline: past the auth check ({GEMINI_PAST_AUTH})"
    raise ValueError(f"no CLI verdict for provider {provider!r}")


def _json_object(output: str) -> dict[str, Any]:
    """The first JSON object in ``output`` (warnings may precede it)."""
    start = output.find("{")
    while start >= 0:
        try:
            doc, _ = json.JSONDecoder().raw_decode(output[start:])
        except ValueError:
            start = output.find("{", start + 1)
            continue
        return doc if isinstance(doc, dict) else {}
    return {}
