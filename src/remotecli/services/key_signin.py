"""Key sign-in, no browser: a pasted API key (or Claude long-lived token) put into the CLI VM the way
each CLI takes it.

What each CLI of the pinned cli image accepts (read from the installed packages and checked with
them offline, not from memory):

- **Codex** (``codex``, kind ``api_key``): ``codex login --with-api-key`` reads the key from stdin
  and writes ``~/.codex/auth.json`` ``{"auth_mode": "apikey", "OPENAI_API_KEY": ...}`` itself;
  ``codex login status`` then says "API key configured". Run in the guest as the CLI user.
- **Claude Code** (``claude_code``): kind ``oauth_token`` (from ``claude setup-token``, shaped
  ``sk-ant-oat01-...``) goes in ``CLAUDE_CODE_OAUTH_TOKEN``; kind ``api_key`` (``sk-ant-api03-...``)
  in ``ANTHROPIC_API_KEY``. Both are read from the environment only, so they go in the CLI user's
  environment file (``CLI_ENV_FILE``, mode 0600, in the home so it persists with the home volume),
  sourced by the user's shell profile. In interactive use Claude Code asks once whether to use a
  custom ``ANTHROPIC_API_KEY`` unless the key's last 20 characters are in ``~/.claude.json``
  ``customApiKeyResponses.approved``, which is where Claude Code itself records the user's yes: the
  delivery records it there, since pasting the key was the user's yes.
- **Gemini CLI** (``gemini``, kind ``api_key``, ``AIza...``): ``GEMINI_API_KEY`` in the same
  environment file, and ``~/.gemini/settings.json`` deep-merged with ``security.auth.selectedType``
  = ``gemini-api-key`` (the user's other settings stay).

Validation is by shape only (no call to a provider): an unknown provider, an unknown kind, a
malformed key, or a key with another provider's shape is refused with a stable 4xx code before
anything is held, logged or delivered. A valid key is sealed (AES-256-GCM, ``crypto.SecretBox``,
bound to the user and provider) at once and opened only to be written into the guest; it is never
stored in the database, logged, put in an event or returned.
"""

from __future__ import annotations

import json
import re
import shlex
import uuid
from dataclasses import dataclass
from typing import Final

from remotecli.agent.client import AgentCallError, AgentFileNotFound
from remotecli.agent.protocol import CLI_ENV_FILE, CredentialState, GuestAgent
from remotecli.context import AppContext
from remotecli.db.models import Vm
from remotecli.errors import (
    AgentError,
    KeyDeliveryFailed,
    KeyProviderMismatch,
    MalformedKey,
    UnknownKeyKind,
    UnknownProvider,
)
from remotecli.logging import get_logger
from remotecli.services import vm_manager
from remotecli.services.providers import merge_json_file
from remotecli.services.transitions import record_event
from remotecli.services.users import Principal

log = get_logger("key-signin")

MAX_KEY_LENGTH: Final = 512


@dataclass(frozen=True, slots=True)
class KeyShape:
    provider: str  # the credential format (claude_code, codex, gemini)
    kind: str  # api_key | oauth_token
    label: str  # for people: "an Anthropic API key"
    pattern: re.Pattern[str]
    env_var: str | None  # None: delivered by the CLI's own login command (Codex)


# Shapes as the providers issue them today; the body is limited to URL-safe characters, so a key can
# never break out of the single quotes of the environment file.
SHAPES: Final = (
    KeyShape("claude_code", "oauth_token", "a Claude long-lived token (claude setup-token)",
             re.compile(r"sk-ant-oat\d{2}-[A-Za-z0-9_-]{20,400}"), "CLAUDE_CODE_OAUTH_TOKEN"),
    KeyShape("claude_code", "api_key", "an Anthropic API key",
             re.compile(r"sk-ant-api\d{2}-[A-Za-z0-9_-]{20,400}"), "ANTHROPIC_API_KEY"),
    KeyShape("codex", "api_key", "an OpenAI API key",
             re.compile(r"sk-(?!ant-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,400}"), None),
    KeyShape("gemini", "api_key", "a Gemini API key", re.compile(r"AIza[0-9A-Za-z_-]{35}"), "GEMINI_API_KEY"),
)
KINDS: Final = {provider: {s.kind for s in SHAPES if s.provider == provider} for provider in
                ("claude_code", "codex", "gemini")}
CLAUDE_ENV_VARS: Final = ("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_API_KEY")
GEMINI_KEY_SETTINGS: Final = {"security": {"auth": {"selectedType": "gemini-api-key"}}}
PROFILE_MARK: Final = "# remotecli: key sign-in environment"
PROFILE_LINE: Final = (f'if [ -r "$HOME/{CLI_ENV_FILE}" ]; then . "$HOME/{CLI_ENV_FILE}"; fi  {PROFILE_MARK}')
# Login shells read ~/.bash_profile instead of ~/.profile when it exists; ~/.bashrc covers the
# interactive shells that are not login shells.
PROFILE_FILES: Final = (".profile", ".bash_profile", ".bashrc")
CODEX_LOGIN_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True, slots=True)
class KeyDelivery:
    """What a key sign-in returns: metadata only."""

    provider: str
    kind: str
    vm_id: str
    state: str  # the CLI's state read back from the guest after delivery
    method: str | None
    written: list[str]  # paths relative to the home (or the command run)


@dataclass(frozen=True, slots=True)
class _Sealed:
    """A validated key, encrypted for the time until it is written into the guest."""

    shape: KeyShape
    ciphertext: bytes
    aad: bytes

    def __repr__(self) -> str:
        return f"_Sealed(provider={self.shape.provider!r}, kind={self.shape.kind!r})"


def validate(ctx: AppContext, provider: str, kind: str, key: str) -> KeyShape:
    """The key's shape, or a 4xx error saying what is wrong (never echoing the key)."""
    profile = ctx.providers.get(provider) if isinstance(provider, str) else None
    if profile is None:
        raise UnknownProvider()
    fmt = profile.credential_format
    if kind not in KINDS.get(fmt, set()):
        raise UnknownKeyKind(f"{profile.display_name} takes a key of kind "
                             + " or ".join(repr(k) for k in sorted(KINDS.get(fmt, set()))) + ".")
    key = key.strip() if isinstance(key, str) else ""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise MalformedKey()
    for shape in SHAPES:
        if shape.pattern.fullmatch(key):
            if shape.provider == fmt and shape.kind == kind:
                return shape
            raise KeyProviderMismatch(f"That looks like {shape.label}, not {_label(fmt, kind)}; "
                                      "choose the provider and kind it belongs to.")
    raise MalformedKey(f"That does not look like {_label(fmt, kind)}; paste the whole key as the provider shows it.")


def _label(fmt: str, kind: str) -> str:
    return next(s.label for s in SHAPES if s.provider == fmt and s.kind == kind)


def seal(ctx: AppContext, principal: Principal, provider: str, kind: str, key: str) -> _Sealed:
    """Validate and encrypt at once; the plain key is not kept."""
    shape = validate(ctx, provider, kind, key)
    aad = f"key-signin:{principal.user_id}:{provider}:{uuid.uuid4().hex}".encode()
    return _Sealed(shape, ctx.box.encrypt(key.strip().encode(), aad), aad)


def sign_in_with_key(ctx: AppContext, principal: Principal, provider: str, kind: str, key: str) -> KeyDelivery:
    """Validate, seal, deliver into the user's CLI VM (started or created if needed) and read the
    CLI's state back from the guest."""
    sealed = seal(ctx, principal, provider, kind, key)
    del key
    vm, _ = vm_manager.ensure_cli_vm(ctx, principal)
    agent = ctx.agent(vm)
    try:
        written = _deliver(ctx, agent, sealed)
        report = agent.credential_health(ctx.settings.cli_guest_user)
    except AgentCallError as exc:
        full = exc.agent_code == "no_space"
        _event(ctx, principal, vm, provider, kind, ok=False, error="workspace_full" if full else exc.code)
        raise KeyDeliveryFailed("Your workspace's home is full; free some space and try again." if full
                                else None, log_detail=exc.log_detail) from None
    except KeyDeliveryFailed as exc:  # the CLI refused the key, or the files did not read back
        _event(ctx, principal, vm, provider, kind, ok=False, error=exc.code)
        raise
    except AgentError as exc:
        _event(ctx, principal, vm, provider, kind, ok=False, error=exc.code)
        raise KeyDeliveryFailed(log_detail=exc.log_detail) from None
    finally:
        agent.close()
    entry = next((e for e in report.providers if e.provider == sealed.shape.provider), None)
    state = entry.state.value if entry is not None else "unknown"
    method = entry.method if entry is not None else None
    _event(ctx, principal, vm, provider, kind, ok=True, state=state)
    if state != CredentialState.SIGNED_IN.value or method != sealed.shape.kind:
        raise KeyDeliveryFailed("The key was written, but your workspace does not read it as signed in.",
                                log_detail=f"{provider}: state {state}, method {method} after delivery")
    return KeyDelivery(provider=provider, kind=kind, vm_id=vm.id, state=state, method=method, written=written)


def _event(ctx: AppContext, principal: Principal, vm: Vm, provider: str, kind: str, *, ok: bool,
           state: str | None = None, error: str | None = None) -> None:
    details: dict[str, str] = {"provider": provider, "kind": kind}
    if state:
        details["state"] = state
    if error:
        details["error"] = error
    message = (f"{provider} key ({kind}) written to {vm.id}" if ok
               else f"{provider} key ({kind}) could not be written to {vm.id}: {error}")
    with ctx.db.transaction() as session:
        record_event(session, module="key-signin", kind="credentials.key_delivered" if ok else
                     "credentials.key_delivery_failed", message=message, user_id=principal.user_id,
                     vm_id=vm.id, details=details)
    log.info(message, extra={"vm_id": vm.id, "user_id": principal.user_id})


def _deliver(ctx: AppContext, agent: GuestAgent, sealed: _Sealed) -> list[str]:
    user = ctx.settings.cli_guest_user
    home = ctx.settings.cli_guest_home.rstrip("/")
    shape = sealed.shape
    secret = ctx.box.decrypt(sealed.ciphertext, sealed.aad).decode()
    if shape.env_var is None:  # Codex: its own login command, key on stdin
        result = agent.exec(["codex", "login", "--with-api-key"], timeout_s=CODEX_LOGIN_TIMEOUT_S, user=user,
                            cwd=home, stdin=(secret + "\n").encode())
        if not result.ok:
            raise KeyDeliveryFailed(log_detail=f"codex login --with-api-key exited {result.exit_code}"
                                    f"{' (timed out)' if result.timed_out else ''}")
        return ["codex login --with-api-key"]
    drop = CLAUDE_ENV_VARS if shape.provider == "claude_code" else (shape.env_var,)
    written = [_write_env(agent, home, user, shape.env_var, secret, drop)]
    written += _hook_profiles(agent, home, user)
    if shape.provider == "gemini":
        path = f"{home}/.gemini/settings.json"
        content = merge_json_file(_read(agent, path), json.dumps(GEMINI_KEY_SETTINGS).encode(), deep=True)
        _write_checked(agent, path, content, 0o600, user)
        written.append(".gemini/settings.json")
    elif shape.kind == "api_key":
        written.append(_approve_claude_key(agent, home, user, secret))
    return written


def _read(agent: GuestAgent, path: str) -> bytes | None:
    try:
        return agent.read_file(path).data
    except AgentFileNotFound:
        return None


def _write_checked(agent: GuestAgent, path: str, content: bytes, mode: int, user: str) -> None:
    agent.write_file(path, content, mode=mode, owner=user, dir_mode=0o700)
    back = agent.read_file(path)
    if back.data != content or (back.mode & 0o777) != mode or back.owner != user:
        raise KeyDeliveryFailed(log_detail=f"{path}: read back differs (mode {oct(back.mode)}, owner {back.owner})")


def render_env_file(existing: bytes | None, name: str, value: str, drop: tuple[str, ...]) -> bytes:
    """The environment file with ``name`` set to ``value`` and the other names in ``drop`` removed;
    other lines (another provider's key, the user's own) stay as they were."""
    lines = [] if existing is None else existing.decode("utf-8", "replace").splitlines()
    kept = [line for line in lines
            if not any(re.match(rf"\s*(export\s+)?{re.escape(n)}=", line) for n in (*drop, name))]
    if not kept:
        kept = ["# Written by remotecli's key sign-in (mode 0600); sourced by your shell profile."]
    kept.append(f"export {name}={shlex.quote(value)}")
    return ("\n".join(kept) + "\n").encode()


def _write_env(agent: GuestAgent, home: str, user: str, name: str, value: str, drop: tuple[str, ...]) -> str:
    path = f"{home}/{CLI_ENV_FILE}"
    _write_checked(agent, path, render_env_file(_read(agent, path), name, value, drop), 0o600, user)
    return CLI_ENV_FILE


def _hook_profiles(agent: GuestAgent, home: str, user: str) -> list[str]:
    """Make the shell profiles source the environment file (once; the user's lines stay)."""
    changed: list[str] = []
    for name in PROFILE_FILES:
        path = f"{home}/{name}"
        try:
            current = agent.read_file(path)
        except AgentFileNotFound:
            if name != ".profile":
                continue
            data, mode = b"", 0o644
        else:
            data, mode = current.data, current.mode & 0o777
        if PROFILE_MARK.encode() in data:
            continue
        prefix = data if not data or data.endswith(b"\n") else data + b"\n"
        _write_checked(agent, path, prefix + PROFILE_LINE.encode() + b"\n", mode, user)
        changed.append(name)
    return changed


def _approve_claude_key(agent: GuestAgent, home: str, user: str, secret: str) -> str:
    """Record the user's yes to the custom API key where Claude Code keeps it (its last 20 chars)."""
    path = f"{home}/.claude.json"
    existing = _read(agent, path)
    try:
        doc = json.loads(existing) if existing else {}
    except (ValueError, UnicodeDecodeError):
        doc = {}
    doc = doc if isinstance(doc, dict) else {}
    responses = doc.get("customApiKeyResponses")
    responses = responses if isinstance(responses, dict) else {}
    suffix = secret.strip()[-20:]
    approved = [k for k in responses.get("approved", []) if isinstance(k, str)]
    rejected = [k for k in responses.get("rejected", []) if isinstance(k, str) and k != suffix]
    if suffix not in approved:
        approved.append(suffix)
    doc["customApiKeyResponses"] = {**responses, "approved": approved, "rejected": rejected}
    doc.setdefault("hasCompletedOnboarding", True)
    _write_checked(agent, path, (json.dumps(doc, indent=2) + "\n").encode(), 0o600, user)
    return ".claude.json"
