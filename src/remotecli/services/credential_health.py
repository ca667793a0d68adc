"""Credential health: each provider's sign-in state as read from the user's CLI VM now.

The guest agent reads the CLIs' own credential files in the CLI user's home and answers metadata
only (``GET /v1/credentials/health``, parsed in the guest by ``agent/guest/credhealth.py``): signed
in (with account and access-token expiry), refreshed at, expired but refreshable, expired, signed
out (no file, or the CLI cleared its tokens, e.g. after ``invalid_grant``). This is what the CLI
will see, not what a sign-in recorded when it delivered (``auth_sessions.credential_meta``).

A stopped (idle) or paused CLI VM is not started just to read health: the answer says "workspace
stopped" unless the caller asks (``refresh=True``), which starts it (or creates one) the way any
other use of the workspace does (``vm_manager.ensure_cli_vm``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from remotecli.agent.client import AgentCallError
from remotecli.agent.protocol import CliCredentialHealth, CredentialState
from remotecli.context import AppContext
from remotecli.domain.states import VmStatus
from remotecli.errors import AgentError
from remotecli.logging import get_logger
from remotecli.services import vm_manager
from remotecli.services.users import Principal

log = get_logger("credential-health")

#: States of a provider beyond the guest's ``CredentialState``: the workspace could not be read.
WORKSPACE_STOPPED = "workspace_stopped"
NO_WORKSPACE = "no_workspace"
UNKNOWN = "unknown"

#: How long a health read waits for the guest (the dashboard page waits for it).
HEALTH_TIMEOUT_S = 10.0

#: States in which the dashboard offers "Re-authenticate".
NEEDS_SIGN_IN = frozenset({CredentialState.SIGNED_OUT.value, CredentialState.EXPIRED.value,
                           CredentialState.UNREADABLE.value})

_WORDS = {
    CredentialState.SIGNED_IN.value: "Signed in",
    CredentialState.EXPIRED_REFRESHABLE.value: "Access expired; the CLI refreshes it on next use",
    CredentialState.EXPIRED.value: "Expired: sign in again",
    CredentialState.SIGNED_OUT.value: "Signed out",
    CredentialState.UNREADABLE.value: "Credential file unreadable: sign in again",
    WORKSPACE_STOPPED: "Workspace stopped",
    NO_WORKSPACE: "No workspace yet",
    UNKNOWN: "Workspace not reachable",
}


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    provider: str
    display_name: str
    state: str
    words: str
    method: str | None = None
    account: str | None = None
    access_expires_at: dt.datetime | None = None
    refreshed_at: dt.datetime | None = None
    has_refresh_token: bool = False
    detail: str | None = None

    @property
    def reauthenticate(self) -> bool:
        return self.state in NEEDS_SIGN_IN


@dataclass(frozen=True, slots=True)
class CredentialHealth:
    workspace: str  # running | stopped | starting | none | unreachable
    vm_id: str | None
    checked_at: dt.datetime | None  # when the guest read the files (None: not read)
    message: str
    providers: list[ProviderHealth]


def _moment(epoch: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(epoch, dt.UTC) if epoch is not None else None


def _placeholders(ctx: AppContext, state: str, detail: str | None = None) -> list[ProviderHealth]:
    return [ProviderHealth(provider=name, display_name=profile.display_name, state=state, words=_WORDS[state],
                           detail=detail)
            for name, profile in sorted(ctx.providers.items())]


def read_health(ctx: AppContext, principal: Principal, *, refresh: bool = False) -> CredentialHealth:
    """The caller's credential health, read from their CLI VM now (see the module docstring)."""
    vm = vm_manager.live_cli_vm(ctx, principal.user_id)
    if vm is None and not refresh:
        return CredentialHealth("none", None, None, "You have no CLI workspace yet; it is created when you "
                                "first use it (or refresh to create it now).", _placeholders(ctx, NO_WORKSPACE))
    if vm is not None and not refresh and vm.status != VmStatus.RUNNING.value:
        workspace = "stopped" if vm.status in (VmStatus.STOPPED.value, VmStatus.PAUSED.value) else "starting"
        return CredentialHealth(workspace, vm.id, None, f"Workspace {workspace}: credential health is read from "
                                "the running workspace (refresh to start it and read it now).",
                                _placeholders(ctx, WORKSPACE_STOPPED))
    if refresh:
        vm, _ = vm_manager.ensure_cli_vm(ctx, principal)
    assert vm is not None
    try:
        agent = ctx.agent(vm, timeout=HEALTH_TIMEOUT_S)
        try:
            report = agent.credential_health(ctx.settings.cli_guest_user)
        finally:
            agent.close()
    except AgentError as exc:
        log.warning("credential health not readable", extra={"vm_id": vm.id, "x_error": exc.code,
                                                              "x_detail": exc.log_detail})
        if isinstance(exc, AgentCallError) and exc.agent_code == "not_found":
            message = ("Your workspace runs an older image that cannot report sign-in health; "
                       "Rebuild workspace (your home is kept) to see it.")
        else:
            message = "Your workspace did not answer; try again shortly."
        return CredentialHealth("unreachable", vm.id, None, message, _placeholders(ctx, UNKNOWN))
    by_format = {entry.provider: entry for entry in report.providers}
    providers = [_of(name, profile.display_name, by_format.get(profile.credential_format))
                 for name, profile in sorted(ctx.providers.items())]
    log.info("credential health read", extra={"vm_id": vm.id,
                                               "x_states": {p.provider: p.state for p in providers}})
    return CredentialHealth("running", vm.id, _moment(report.checked_at), "Read from your workspace now.",
                            providers)


def _of(name: str, display_name: str, entry: CliCredentialHealth | None) -> ProviderHealth:
    if entry is None:
        return ProviderHealth(provider=name, display_name=display_name, state=UNKNOWN, words=_WORDS[UNKNOWN],
                              detail="the workspace's agent does not know this CLI")
    words = _WORDS[entry.state.value]
    if entry.state is CredentialState.SIGNED_IN and entry.method in ("api_key", "oauth_token"):
        words = "Signed in with an API key" if entry.method == "api_key" else "Signed in with a long-lived token"
    return ProviderHealth(
        provider=name, display_name=display_name, state=entry.state.value, words=words, method=entry.method,
        account=entry.account, access_expires_at=_moment(entry.access_expires_at),
        refreshed_at=_moment(entry.refreshed_at), has_refresh_token=entry.has_refresh_token, detail=entry.detail,
    )
