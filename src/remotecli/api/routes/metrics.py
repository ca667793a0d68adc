"""``/metrics``: Prometheus text format (version 0.0.4), written by hand (no extra dependency).

Access: clients on a loopback address need nothing (a Prometheus on the same host, or behind
a reverse proxy that adds a token). Anyone else must send ``Authorization: Bearer <token>`` with
either ``settings.metrics_token`` or an admin's API token. See docs/decisions/0006.

Gauges come from the database at scrape time (VMs by type and status, sessions by status, failed
VMs by reason bucket); counters come from this process's background loops (pass durations,
actions, orphans removed, VMs the loops failed by reason bucket).
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from remotecli.api.deps import Ctx
from remotecli.background.common import STATS, reason_bucket
from remotecli.domain.states import AuthStatus, VmStatus, VmType
from remotecli.errors import AuthenticationRequired, PermissionDenied
from remotecli.services import capacity, pool
from remotecli.services import metrics as metrics_service
from remotecli.services.users import authenticate_token

router = APIRouter(tags=["health"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        label_text = ",".join(f'{key}="{_escape(val)}"' for key, val in sorted(labels.items()))
        number = repr(float(value)) if not float(value).is_integer() else str(int(value))
        self.lines.append(f"{name}{{{label_text}}} {number}" if labels else f"{name} {number}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host in ("localhost", "testclient"):  # starlette's TestClient reports "testclient"
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _authorize(request: Request, ctx: Ctx) -> None:
    # A request relayed by a proxy on this host arrives from loopback too: it carries forwarded
    # headers (an untrusted proxy's are not applied to request.client), so it is not exempt.
    relayed = any(name in request.headers for name in ("x-forwarded-for", "forwarded", "x-real-ip"))
    if not relayed and _is_loopback(request.client.host if request.client else None):
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationRequired()
    expected = ctx.settings.metrics_token
    if expected and hmac.compare_digest(expected.encode(), token.encode()):
        return
    if not authenticate_token(ctx.db, token).is_admin:
        raise PermissionDenied("Metrics are for administrators.")


def render(ctx: Ctx) -> str:
    out = _Writer()
    counts = metrics_service.record_counts(ctx)
    vm_counts, session_counts, failed_reasons = counts.vms, counts.sessions, counts.failed_reasons
    out.family("remotecli_vms", "gauge", "VM rows by type and status.")
    for vm_type in VmType:
        for status in VmStatus:
            out.sample("remotecli_vms", vm_counts.get((vm_type.value, status.value), 0),
                       type=vm_type.value, status=status.value)
    out.family("remotecli_auth_sessions", "gauge", "Sign-in sessions by status.")
    for auth_status in AuthStatus:
        out.sample("remotecli_auth_sessions", session_counts.get(auth_status.value, 0), status=auth_status.value)
    buckets: dict[str, int] = {}
    for reason in failed_reasons:
        bucket = reason_bucket(reason)
        buckets[bucket] = buckets.get(bucket, 0) + 1
    out.family("remotecli_vms_failed", "gauge", "failed VM rows (not yet garbage-collected) by reason bucket.")
    for bucket, count in sorted(buckets.items()):
        out.sample("remotecli_vms_failed", count, reason=bucket)

    out.family("remotecli_browser_pool_vms", "gauge",
               "Live Browser VMs the warm pool booted: ready (claimable), booting, claimed (serving a sign-in).")
    pool_counts = pool.pool_counts(ctx)
    for state in ("ready", "booting", "claimed"):
        out.sample("remotecli_browser_pool_vms", pool_counts[state], state=state)
    out.family("remotecli_browser_pool_size", "gauge", "The warm pool's target size (browser_pool_size).")
    out.sample("remotecli_browser_pool_size", ctx.settings.browser_pool_size)

    room = capacity.usage(ctx)
    out.family("remotecli_capacity_memory_mib", "gauge",
               "Memory VMs may hold on the host (after reserve and overcommit), held by live VMs, and free.")
    for state, memory in (("capacity", room.capacity.memory_mib), ("used", room.used_memory_mib),
                          ("free", room.free_memory_mib)):
        out.sample("remotecli_capacity_memory_mib", memory, state=state)
    out.family("remotecli_capacity_vcpus", "gauge", "vCPUs VMs may have on the host (after overcommit), used, free.")
    for state, vcpus in (("capacity", room.capacity.vcpus), ("used", room.used_vcpus), ("free", room.free_vcpus)):
        out.sample("remotecli_capacity_vcpus", vcpus, state=state)

    out.family("remotecli_loop_pass_seconds", "summary", "Duration of background loop passes in this process.")
    for loop in ("reconciler", "gc"):
        out.sample("remotecli_loop_pass_seconds_sum", STATS.pass_seconds_sum.get(loop, 0.0), loop=loop)
        out.sample("remotecli_loop_pass_seconds_count", STATS.passes.get(loop, 0), loop=loop)
    out.family("remotecli_loop_last_pass_seconds", "gauge", "Duration of the last pass of each loop.")
    for loop, seconds in sorted(STATS.last_pass_seconds.items()):
        out.sample("remotecli_loop_last_pass_seconds", seconds, loop=loop)
    out.family("remotecli_loop_step_errors_total", "counter", "Loop steps that raised (logged; the loop went on).")
    for loop in ("reconciler", "gc"):
        out.sample("remotecli_loop_step_errors_total", STATS.pass_errors.get(loop, 0), loop=loop)
    out.family("remotecli_reconciler_orphans_removed_total", "counter",
               "Host VMs (process, directory, ports) no row owned, removed by the reconciler.")
    out.sample("remotecli_reconciler_orphans_removed_total", STATS.orphans_removed)
    out.family("remotecli_vm_failures_total", "counter", "VMs the background loops marked failed, by reason bucket.")
    for bucket, count in sorted(STATS.failures.items()):
        out.sample("remotecli_vm_failures_total", count, reason=bucket)
    out.family("remotecli_loop_actions_total", "counter", "Background loop actions by kind and result.")
    for (kind, result), count in sorted(STATS.actions.items()):
        out.sample("remotecli_loop_actions_total", count, kind=kind, result=result)
    return out.text()


@router.get("/metrics", response_class=PlainTextResponse, include_in_schema=True)
def metrics(request: Request, ctx: Ctx) -> PlainTextResponse:
    """Prometheus metrics (loopback: open; otherwise a bearer token, see the module docstring)."""
    _authorize(request, ctx)
    return PlainTextResponse(render(ctx), media_type=CONTENT_TYPE)
