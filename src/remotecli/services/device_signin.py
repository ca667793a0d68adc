"""Device-code sign-in: the CLI signs itself in, in the CLI VM, and the user enters a code elsewhere.

Where a CLI offers a browserless sign-in (today: Codex, ``codex login --device-auth``), remotecli
offers it too, with no Browser VM::

    POST /api/v1/device-signins {"provider": "codex"}
      starting ──► awaiting_user ──► signed_in
          │             │  (user_code + verification_uri shown on the dashboard and in the API)
          └─────────────┴──► failed (with the CLI's reason) │ expired (the code was not entered in time)

1. The user's CLI VM is prepared (``vm_manager.ensure_cli_vm``), and the CLI's own device sign-in
   starts in it as the CLI user, through the exec path (``vm_exec.exec_in_vm``), detached: its
   output goes to a file in the user's home (``~/.cache/remotecli-device/<id>/``).
2. The controller reads that file every second until the CLI printed its link and one-time code
   (Codex: "1. Open this link ... https://auth.openai.com/codex/device", "2. Enter this one-time
   code ... ABCD-EFGH"); the session shows them (``awaiting_user``).
3. The user opens the link anywhere and enters the code; the CLI, polling its provider, gets its
   tokens and **writes its own credential file** (no token passes through the controller).
4. The CLI exits 0 and says "Successfully logged in": the controller asks the CLI itself
   (``codex login status`` → "Logged in using ChatGPT") and ends ``signed_in``. Any other exit ends
   ``failed`` with the CLI's last line; the deadline (15 minutes, the codes' life at OpenAI) ends
   ``expired`` and stops the CLI's process.

What is kept: sessions live in the controller's memory (this process), like the exec slots; a
restarted controller forgets a device sign-in in progress (the CLI in the guest gives up on its own
when the code expires) and the user starts again. The CLI's output never reaches a log or an
event; the parsed code and link are kept for the user's own GET and not logged either (a device
code is a phishing target: whoever enters it first signs the CLI in to their account).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import secrets
import shlex
import threading
import time
import weakref
from collections.abc import Callable
from enum import StrEnum

from remotecli.context import AppContext
from remotecli.db.models import utcnow
from remotecli.errors import DeviceSigninNotFound, DeviceSigninUnsupported, RemotecliError, UnknownProvider
from remotecli.logging import get_logger, log_context
from remotecli.profiles import load_profiles
from remotecli.services import access, vm_exec, vm_manager
from remotecli.services.users import Principal

MODULE = "device_signin"
log = get_logger(MODULE)

#: How long a code is good for (OpenAI's device codes: 15 minutes).
CODE_LIFETIME_S = 15 * 60
POLL_INTERVAL_S = 1.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_URL = re.compile(r"https?://[^\s\x1b]+")
_USER_CODE = re.compile(r"\b[A-Z0-9]{4,}-[A-Z0-9]{4,}\b")


class DeviceStatus(StrEnum):
    STARTING = "starting"
    AWAITING_USER = "awaiting_user"
    SIGNED_IN = "signed_in"
    FAILED = "failed"
    EXPIRED = "expired"


ENDED = frozenset({DeviceStatus.SIGNED_IN, DeviceStatus.FAILED, DeviceStatus.EXPIRED})
#: The one transition table; ``_move`` is the one place a status changes.
TRANSITIONS: dict[DeviceStatus, frozenset[DeviceStatus]] = {
    DeviceStatus.STARTING: frozenset({DeviceStatus.AWAITING_USER, DeviceStatus.FAILED, DeviceStatus.EXPIRED}),
    DeviceStatus.AWAITING_USER: frozenset({DeviceStatus.SIGNED_IN, DeviceStatus.FAILED, DeviceStatus.EXPIRED}),
    DeviceStatus.SIGNED_IN: frozenset(),
    DeviceStatus.FAILED: frozenset(),
    DeviceStatus.EXPIRED: frozenset(),
}


@dataclasses.dataclass(frozen=True)
class DeviceCommand:
    """How one CLI runs its device sign-in and says it is signed in."""

    argv: tuple[str, ...]
    success_line: str  # printed by the sign-in when it succeeded
    status_argv: tuple[str, ...]  # the CLI's own status check
    status_line: str  # what the status check prints when signed in


#: Providers whose CLI offers a device-code sign-in.
DEVICE_COMMANDS: dict[str, DeviceCommand] = {
    "codex": DeviceCommand(
        argv=("codex", "login", "--device-auth"),
        success_line="Successfully logged in",
        status_argv=("codex", "login", "status"),
        status_line="Logged in using ChatGPT",
    ),
}


@dataclasses.dataclass
class DeviceSignin:
    id: str
    user_id: str
    provider: str
    status: DeviceStatus
    message: str
    created_at: dt.datetime
    expires_at: dt.datetime
    cli_vm_id: str | None = None
    user_code: str | None = None
    verification_uri: str | None = None
    error_code: str | None = None
    ended_at: dt.datetime | None = None


@dataclasses.dataclass
class _Registry:
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    sessions: dict[str, DeviceSignin] = dataclasses.field(default_factory=dict)


# One registry per AppContext (keyed by identity: the context is a dataclass, not hashable).
_registries: dict[int, tuple[weakref.ref[AppContext], _Registry]] = {}
_registries_lock = threading.Lock()


def _registry(ctx: AppContext) -> _Registry:
    key = id(ctx)
    with _registries_lock:
        entry = _registries.get(key)
        if entry is not None and entry[0]() is ctx:
            return entry[1]
        registry = _Registry()

        def forget(_: weakref.ref[AppContext], key: int = key) -> None:
            with _registries_lock:
                _registries.pop(key, None)

        _registries[key] = (weakref.ref(ctx, forget), registry)
        return registry


def _snapshot(signin: DeviceSignin) -> DeviceSignin:
    return dataclasses.replace(signin)


def _move(ctx: AppContext, signin_id: str, to: DeviceStatus, message: str, **fields: str | None) -> bool:
    """The one place a device sign-in's status changes (by the table); False if it may not."""
    registry = _registry(ctx)
    with registry.lock:
        signin = registry.sessions[signin_id]
        if to != signin.status and to not in TRANSITIONS[signin.status]:
            return False
        signin.status = to
        signin.message = message
        for name, value in fields.items():
            setattr(signin, name, value)
        if to in ENDED:
            signin.ended_at = utcnow()
    # The status only: the message may hold the one-time code, which is the user's alone to see.
    log.info("device sign-in %s", to.value, extra={"user_id": signin.user_id, "device_signin_id": signin_id,
                                                   "provider": signin.provider, "error": fields.get("error_code")})
    return True


def start(ctx: AppContext, principal: Principal, provider: str,
          runner: Callable[[Callable[[], None]], None] | None = None) -> DeviceSignin:
    """Start the provider CLI's device sign-in in the caller's CLI VM; returns the new session
    (``starting``). ``runner`` runs the work (default: a daemon thread)."""
    profiles = load_profiles(ctx.settings)
    if provider not in profiles:
        raise UnknownProvider(log_detail=f"device sign-in: unknown provider {provider!r}")
    if provider not in DEVICE_COMMANDS:
        raise DeviceSigninUnsupported(
            f"{profiles[provider].display_name} offers no device-code sign-in; "
            "sign in with the browser (POST /api/v1/auth-sessions) or with a key instead.")
    now = utcnow()
    signin = DeviceSignin(
        id=f"dev_{secrets.token_hex(8)}", user_id=principal.user_id, provider=provider,
        status=DeviceStatus.STARTING, message=f"Starting {profiles[provider].display_name}'s device sign-in "
        "in your CLI workspace", created_at=now, expires_at=now + dt.timedelta(seconds=CODE_LIFETIME_S),
    )
    registry = _registry(ctx)
    with registry.lock:
        registry.sessions[signin.id] = signin
    work = lambda: _run(ctx, principal, signin.id)  # noqa: E731
    if runner is None:
        threading.Thread(target=work, name=f"device-signin-{signin.id}", daemon=True).start()
    else:
        runner(work)
    return get(ctx, principal, signin.id)


def get(ctx: AppContext, principal: Principal, signin_id: str) -> DeviceSignin:
    """One device sign-in of the caller (admins: anyone's); 404 alike for missing and others'."""
    registry = _registry(ctx)
    with registry.lock:
        signin = registry.sessions.get(signin_id)
        found = _snapshot(signin) if signin is not None else None
    if found is None:
        raise DeviceSigninNotFound()
    access.ensure_visible(principal, found.user_id, DeviceSigninNotFound())
    return found


def list_mine(ctx: AppContext, principal: Principal) -> list[DeviceSignin]:
    registry = _registry(ctx)
    with registry.lock:
        mine = [_snapshot(s) for s in registry.sessions.values() if s.user_id == principal.user_id]
    return sorted(mine, key=lambda s: s.created_at, reverse=True)


def _work_dir(ctx: AppContext, signin_id: str) -> str:
    return f"{ctx.settings.cli_guest_home.rstrip('/')}/.cache/remotecli-device/{signin_id}"


def _exec(ctx: AppContext, principal: Principal, vm_id: str, script: str, timeout_s: float = 60.0) -> tuple[int, str]:
    """A shell script as the CLI user through the exec path; returns exit code and output."""
    home = ctx.settings.cli_guest_home.rstrip("/")
    result = vm_exec.exec_in_vm(
        ctx, principal, vm_id, ["sh", "-c", script], timeout_s=timeout_s, user=ctx.settings.cli_guest_user,
        cwd=home, env={"HOME": home, "NO_COLOR": "1", "TERM": "dumb"},
    )
    return result.exit_code, (result.stdout + result.stderr).decode("utf-8", "replace")


def parse_prompt(output: str) -> tuple[str | None, str | None]:
    """The verification link and one-time code from the CLI's output (ANSI colours removed)."""
    text = _ANSI.sub("", output)
    uri = next((u.rstrip(".,)") for u in _URL.findall(text) if "device" in u), None)
    code_at = text.find("one-time code")
    match = _USER_CODE.search(text, code_at if code_at >= 0 else 0)
    return uri, (match.group(0) if match else None)


def _last_line(output: str) -> str:
    lines = [line.strip() for line in _ANSI.sub("", output).splitlines() if line.strip()]
    line = lines[-1] if lines else "no output"
    return line[:300]


def _run(ctx: AppContext, principal: Principal, signin_id: str) -> None:
    """The worker of one device sign-in: prepare the VM, start the CLI, follow its output."""
    with log_context(user_id=principal.user_id):
        try:
            _follow(ctx, principal, signin_id)
        except RemotecliError as exc:
            _move(ctx, signin_id, DeviceStatus.FAILED, f"The device sign-in could not run: {exc.message}",
                  error_code=exc.code)
        except Exception:  # a bug must still end the session with words
            log.exception("device sign-in worker failed", extra={"device_signin_id": signin_id})
            _move(ctx, signin_id, DeviceStatus.FAILED, "The device sign-in stopped on an internal error; "
                  "start it again", error_code="internal_error")


def _follow(ctx: AppContext, principal: Principal, signin_id: str) -> None:
    signin = get(ctx, principal, signin_id)
    command = DEVICE_COMMANDS[signin.provider]
    vm, _ = vm_manager.ensure_cli_vm(ctx, principal)
    _move(ctx, signin_id, DeviceStatus.STARTING, signin.message, cli_vm_id=vm.id)
    work = shlex.quote(_work_dir(ctx, signin_id))
    inner = f'echo $$ > "$0/pid"; {shlex.join(command.argv)} > "$0/out" 2>&1; echo $? > "$0/exit"'
    launch = (f"mkdir -p {work} && chmod 700 {work} && "
              f"setsid -f sh -c {shlex.quote(inner)} {work} </dev/null >/dev/null 2>&1")
    code, output = _exec(ctx, principal, vm.id, launch)
    if code != 0:
        _move(ctx, signin_id, DeviceStatus.FAILED, f"The CLI could not be started: {_last_line(output)}",
              error_code="device_signin_start_failed")
        return
    deadline = time.monotonic() + CODE_LIFETIME_S
    while True:
        time.sleep(POLL_INTERVAL_S)
        _, out = _exec(ctx, principal, vm.id,
                       f'cat {work}/out 2>/dev/null; echo; echo "@@exit=$(cat {work}/exit 2>/dev/null)"')
        text, _, tail = out.rpartition("@@exit=")
        exit_text = tail.strip()
        current = get(ctx, principal, signin_id)
        if current.status == DeviceStatus.STARTING:
            uri, user_code = parse_prompt(text)
            if uri and user_code:
                _move(ctx, signin_id, DeviceStatus.AWAITING_USER,
                      f"Open {uri} and enter the code {user_code}", user_code=user_code, verification_uri=uri)
        if exit_text:
            _finish(ctx, principal, signin_id, vm.id, command, int(exit_text) if exit_text.isdigit() else -1, text)
            return
        if time.monotonic() > deadline:
            _exec(ctx, principal, vm.id, f'kill -TERM -- -"$(cat {work}/pid)" 2>/dev/null; true')
            _move(ctx, signin_id, DeviceStatus.EXPIRED, "The code expired before it was entered; start again",
                  error_code="device_code_expired")
            return


def _finish(ctx: AppContext, principal: Principal, signin_id: str, vm_id: str, command: DeviceCommand,
            exit_code: int, output: str) -> None:
    if exit_code != 0 or command.success_line not in _ANSI.sub("", output):
        text = _ANSI.sub("", output)
        if "expired" in text.lower() or "timed out" in text.lower():
            _move(ctx, signin_id, DeviceStatus.EXPIRED, "The code expired before it was entered; start again",
                  error_code="device_code_expired")
            return
        _move(ctx, signin_id, DeviceStatus.FAILED, f"The CLI's device sign-in failed: {_last_line(output)}",
              error_code="device_signin_failed")
        return
    code, status = _exec(ctx, principal, vm_id, shlex.join(command.status_argv), timeout_s=120)
    if code != 0 or command.status_line not in status:
        _move(ctx, signin_id, DeviceStatus.FAILED,
              f"The CLI finished but does not say it is signed in: {_last_line(status)}",
              error_code="device_signin_unverified")
        return
    _move(ctx, signin_id, DeviceStatus.SIGNED_IN,
          f"Signed in: the CLI wrote its own credentials in your CLI workspace ({command.status_line})")
