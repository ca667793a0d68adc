"""What the dashboard shows, in words, from what the services read (pure functions, no queries, no HTML).

Kept apart from the routes so that the wording and the step logic are unit-tested directly.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from remotecli.db.models import Event, Vm, utcnow
from remotecli.domain.states import AUTH_TERMINAL, VM_STATUS_WORDS, AuthStatus, VmStatus, VmType
from remotecli.services.credential_health import CredentialHealth
from remotecli.services.dashboard import ProviderSignIn, TerminalState, WorkspaceSummary

# ----------------------------------------------------------------------------------------------
# Times in words


def ago(moment: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """``"3 min"``, ``"2 h"``, ``"5 days"``: how long ago (or, for a future moment, how long until)."""
    if moment is None:
        return ""
    seconds = abs(((now or utcnow()) - moment).total_seconds())
    if seconds < 60:
        return "less than a minute"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400 * 2:
        hours = int(seconds // 3600)
        return f"{hours} h"
    return f"{int(seconds // 86400)} days"


def relative(moment: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """``"in 59 min"`` or ``"3 h ago"``."""
    if moment is None:
        return ""
    now = now or utcnow()
    return f"in {ago(moment, now)}" if moment > now else f"{ago(moment, now)} ago"


def utc(moment: dt.datetime | None, *, seconds: bool = False) -> str:
    if moment is None:
        return ""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")


def parse_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


# ----------------------------------------------------------------------------------------------
# VMs

VM_TYPE_WORDS = {VmType.CLI.value: "CLI workspace", VmType.BROWSER.value: "Secure browser"}
_TONE = {
    VmStatus.RUNNING: "ok", VmStatus.PAUSED: "idle", VmStatus.STOPPED: "idle", VmStatus.FAILED: "bad",
    VmStatus.DESTROYED: "idle", VmStatus.DESTROYING: "busy", VmStatus.CREATING: "busy", VmStatus.STARTING: "busy",
    VmStatus.STOPPING: "busy",
}


@dataclass
class VmRow:
    id: str
    short_id: str
    user_id: str
    vm_type: str
    type_words: str
    status: str
    status_words: str
    tone: str
    reason: str
    age: str
    created: str
    actions: list[str]


def vm_actions(status: str, vm_type: str = "") -> list[str]:
    """What a user may do with a VM in ``status`` from the dashboard (the transition table allows it).
    A CLI VM that runs, is paused or stopped may be rebuilt (a new VM on the current image, the same
    home); a failed one is replaced by the next ``ensure`` anyway."""
    state = VmStatus(status)
    actions = []
    if state in (VmStatus.RUNNING, VmStatus.PAUSED):
        actions.append("stop")
    if state in (VmStatus.PAUSED, VmStatus.STOPPED):
        actions.append("resume")
    if vm_type == VmType.CLI.value and state in (VmStatus.RUNNING, VmStatus.PAUSED, VmStatus.STOPPED):
        actions.append("rebuild")
    if state not in (VmStatus.DESTROYED, VmStatus.DESTROYING):
        actions.append("destroy")
    return actions


def vm_row(vm: Vm, now: dt.datetime | None = None) -> VmRow:
    state = VmStatus(vm.status)
    return VmRow(
        id=vm.id, short_id=vm.id[:11], user_id=vm.user_id or "", vm_type=vm.vm_type,
        type_words=VM_TYPE_WORDS.get(vm.vm_type, vm.vm_type), status=vm.status, status_words=VM_STATUS_WORDS[state],
        tone=_TONE[state], reason=vm.status_reason or "", age=ago(vm.created_at, now), created=utc(vm.created_at),
        actions=vm_actions(vm.status, vm.vm_type),
    )


# ----------------------------------------------------------------------------------------------
# My workspace (the home volume) and the terminal's first words

#: From this share of the home used on, the dashboard says it is nearly full and what to do.
NEARLY_FULL = 0.9


def size_words(n: int) -> str:
    """``"3.1 GiB"``, ``"20 GiB"``, ``"512 MiB"``, ``"12 KiB"``."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            value = f"{n / scale:.1f}".removesuffix(".0")
            return f"{value} {unit}"
    return f"{n} bytes"


@dataclass
class WorkspacePanel:
    usage_words: str  # "3.1 GiB of 20 GiB used", or the size when usage cannot be read now
    percent: int | None
    state_words: str
    tone: str
    full_message: str  # "" unless the home is nearly full


def workspace_panel(summary: WorkspaceSummary) -> WorkspacePanel:
    total, used = summary.total_bytes, summary.used_bytes
    percent = None
    if used is not None and total:
        percent = min(100, round(100 * used / total))
        usage = f"{size_words(used)} of {size_words(total)} used"
    elif total:
        usage = f"{size_words(total)} in all; how much is used shows while your workspace runs"
    else:
        usage = "Usage unknown right now"
    full = ""
    if used is not None and total and used >= NEARLY_FULL * total:
        how_full = "full" if used >= total else f"nearly full ({percent} %)"
        full = (f"Your workspace's home is {how_full}. Free some space from the terminal (for example "
                "delete build outputs, caches under ~/.cache or old repositories; 'du -sh ~/* ~/.[!.]*' "
                "shows what is big): a full home stops CLI sign-ins from being saved and programs from "
                "writing files.")
    if summary.volume_status == "failed":
        state, tone = (f"Unavailable: {summary.volume_reason or 'its storage cannot be read'}. Nothing in it "
                       "was changed; an operator must restore it."), "bad"
    elif summary.volume_status == "creating":
        state, tone = "Being prepared", "busy"
    elif summary.vm_status == VmStatus.RUNNING.value:
        state, tone = "Running", "ok"
    elif summary.idle_stopped:
        state, tone = ("Stopped while idle. Your files are kept; it starts again when you open the terminal "
                       "or sign in to a CLI."), "idle"
    elif summary.vm_status in (VmStatus.CREATING.value, VmStatus.STARTING.value):
        state, tone = "Starting", "busy"
    elif summary.vm_status in (VmStatus.STOPPED.value, VmStatus.PAUSED.value, VmStatus.STOPPING.value):
        state, tone = (f"{VM_STATUS_WORDS[VmStatus(summary.vm_status)]}. Your files are kept; it starts again "
                       "when you open the terminal or sign in to a CLI."), "idle"
    else:
        state, tone = ("Not running. Your files are kept; a VM is made for them when you open the terminal "
                       "or sign in to a CLI."), "idle"
    return WorkspacePanel(usage_words=usage, percent=percent, state_words=state, tone=tone, full_message=full)


@dataclass
class TerminalWords:
    phase: str
    status: str  # the short badge
    message: str  # the overlay while it happens


def terminal_words(state: TerminalState) -> TerminalWords:
    """What the terminal page says while ``ensure`` runs: creating, starting, or connecting."""
    if state.phase == "create":
        if state.has_home:
            return TerminalWords("create", "Starting…", "Starting your workspace on a new VM, with your files. "
                                 "This can take a minute or two; this page connects by itself.")
        return TerminalWords("create", "Creating…", "Creating your workspace. This can take a minute or two; "
                             "this page connects by itself.")
    if state.phase == "start":
        why = " (it was stopped while idle)" if state.idle_stopped else ""
        return TerminalWords("start", "Starting…", f"Starting your workspace{why}. Your files are kept; "
                             "this page connects by itself.")
    return TerminalWords("connect", "Connecting…", "Connecting to your workspace…")


# ----------------------------------------------------------------------------------------------
# CLI credentials per provider


@dataclass
class ProviderCredential:
    provider: str
    name: str
    state: str  # "signed_in" | "lost" | "none"
    state_words: str
    account: str = ""
    expires: str = ""
    expires_relative: str = ""
    signed_in: str = ""
    live_session_id: str = ""
    action: str = "Authenticate"


def provider_credentials(sign_ins: list[ProviderSignIn], now: dt.datetime | None = None) -> list[ProviderCredential]:
    """For each provider: is the user's CLI workspace signed in (from completed sessions' metadata)?"""
    now = now or utcnow()
    rows = []
    for item in sign_ins:
        row = ProviderCredential(provider=item.provider, name=item.display_name, state="none",
                                 state_words="Not signed in")
        completed = item.completed
        if completed is not None:
            meta = completed.credential_meta
            expires = parse_time(meta.get("expires_at"))
            row.account = str(meta.get("account") or "")
            row.expires = utc(expires)
            row.expires_relative = relative(expires, now)
            row.signed_in = relative(completed.signed_in_at, now)
            row.action = "Re-authenticate"
            if completed.on_live_cli_vm:
                row.state, row.state_words = "signed_in", "Signed in"
            else:
                row.state = "lost"
                row.state_words = "Signed in earlier, but that CLI workspace was replaced: sign in again"
        row.live_session_id = item.live_session_id
        rows.append(row)
    return rows


def credential_health_rows(health: CredentialHealth, now: dt.datetime | None = None) -> dict[str, Any]:
    """The dashboard's "read from your workspace now" card (services/credential_health.py)."""
    now = now or utcnow()
    tones = {"signed_in": "ok", "expired_refreshable": "ok", "expired": "warn", "signed_out": "warn",
             "unreadable": "warn"}
    return {
        "workspace": health.workspace, "message": health.message,
        "checked": utc(health.checked_at, seconds=True) if health.checked_at else "",
        "rows": [{
            "provider": p.provider, "name": p.display_name, "state": p.state, "words": p.words,
            "tone": tones.get(p.state, "idle"), "account": p.account or "", "detail": p.detail or "",
            "expires": utc(p.access_expires_at), "expires_relative": relative(p.access_expires_at, now),
            "refreshed": utc(p.refreshed_at), "refreshed_relative": relative(p.refreshed_at, now),
            "reauthenticate": p.reauthenticate,
        } for p in health.providers],
    }


# ----------------------------------------------------------------------------------------------
# The sign-in page's steps

STEPS: list[tuple[str, str]] = [
    ("cli", "Preparing your CLI workspace"),
    ("browser", "Starting a secure browser"),
    ("login", "Log in below"),
    ("save", "Saving credentials to your workspace"),
    ("done", "Done"),
]
# Which step a (non-terminal) status is working on.
_ACTIVE = {
    AuthStatus.PENDING: "cli", AuthStatus.PROVISIONING: "browser", AuthStatus.AWAITING_USER: "login",
    AuthStatus.EXCHANGING: "save", AuthStatus.TRANSFERRING: "save", AuthStatus.COMPLETED: "done",
}


@dataclass
class Step:
    key: str
    label: str
    state: str  # "todo" | "active" | "done" | "failed"


#: The browser step's words once the session holds a running Browser VM (a warm one from the pool
#: at once; a booted one when it is up) while the CLI workspace is still being prepared.
BROWSER_READY_LABEL = "Secure browser ready"


def auth_steps(status: str, *, cli_ready: bool, ended_from: str | None = None,
               browser_ready: bool = False) -> list[Step]:
    """The five steps the sign-in page shows, each todo / active / done / failed.

    While provisioning, the CLI workspace and the secure browser are prepared side by side: both
    are active until the CLI VM runs. A session that ended (failed, expired, cancelled) marks the
    step it was on (``ended_from``: the status it left) as failed.
    """
    state = AuthStatus(status)
    keys = [key for key, _ in STEPS]
    if state is AuthStatus.COMPLETED:
        return [Step(key, label, "done") for key, label in STEPS]
    if state in AUTH_TERMINAL:
        try:
            before = AuthStatus(ended_from) if ended_from else AuthStatus.PENDING
        except ValueError:
            before = AuthStatus.PENDING
        at = _ACTIVE.get(before, "cli")
        if before is AuthStatus.PROVISIONING and not cli_ready:
            at = "cli"
        index = keys.index(at)
        return [Step(key, label, "done" if i < index else "failed" if i == index else "todo")
                for i, (key, label) in enumerate(STEPS)]
    steps = []
    active = _ACTIVE[state]
    index = keys.index(active)
    for i, (key, label) in enumerate(STEPS):
        if state in (AuthStatus.PENDING, AuthStatus.PROVISIONING) and key in ("cli", "browser"):
            if key == "browser" and browser_ready:
                steps.append(Step(key, BROWSER_READY_LABEL, "done"))
                continue
            steps.append(Step(key, label, "done" if key == "cli" and cli_ready else "active"))
            continue
        steps.append(Step(key, label, "done" if i < index else "active" if i == index else "todo"))
    return steps


# ----------------------------------------------------------------------------------------------
# Timelines (the seed's table: time, event, status)


@dataclass
class TimelineRow:
    time: str
    event: str
    module: str
    kind: str
    status: str
    vm_id: str
    tone: str


def _status_cell(event: Event) -> str:
    if event.to_status:
        return f"{event.from_status} → {event.to_status}" if event.from_status else event.to_status
    return ""


def timeline(events: list[Event]) -> list[TimelineRow]:
    rows = []
    for event in events:
        to = event.to_status or ""
        tone = "bad" if to in ("failed", "expired") else "ok" if to in ("running", "completed") else ""
        rows.append(TimelineRow(
            time=utc(event.at, seconds=True), event=event.message, module=event.module, kind=event.kind,
            status=_status_cell(event), vm_id=event.vm_id or "", tone=tone,
        ))
    return rows
