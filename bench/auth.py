#!/usr/bin/env python3
"""Sign-in latency with real parts: POST /auth-sessions → awaiting_user, warm pool vs snapshot
restore vs cold boot, in one run (issue 13).

A real controller (uvicorn on 127.0.0.1, background loops running) with the QEMU driver, real
guest images and a real IdP (oidc-provider) reached from the guest at 10.0.2.2. The user's CLI VM
runs already (a returning user), so each figure is the Browser VM's part: from ``POST
/api/v1/auth-sessions`` until the session is ``awaiting_user`` (the provider's login page shown by
Chromium in the Browser VM), read from the database every 50 ms. Each session is cancelled after.

* cold: no pool (``browser_pool_size`` 0), no snapshot: the Browser VM boots, then Chromium starts.
* warm: ``browser_pool_size`` 1 and the pool's VM ready (Chromium up on a blank page) before the
  POST; the pool's refill between runs is not timed.
* restore: no pool, the Browser snapshot built once (``driver.prepare_snapshot``, timed apart):
  the Browser VM is restored from it. Without snapshot support: "restore: not available".

``--login`` also types the login over the VNC websocket in the warm runs and reports the callback
→ completed time from the session's timeline (the whole flow through a warm VM).

Usage: bench/auth.py [--runs 3] [--provider claude_code] [--login]
(needs built images: REMOTECLI_DATA_DIR=.data/test-images remotecli images build all)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from remotecli.app import create_app  # noqa: E402
from remotecli.context import AppContext  # noqa: E402
from remotecli.services import auth_flow, pool, vm_manager  # noqa: E402
from remotecli.services import users as users_service  # noqa: E402
from remotecli.services.users import Principal  # noqa: E402
from tests.e2e.conftest import IDP_PASSWORD, Controller  # noqa: E402
from tests.integration.conftest import qemu_settings, require_images  # noqa: E402
from tests.integration.test_pool import FirewallGuard  # noqa: E402
from tests.support.idp_server import CLIENT_IDS, GEMINI_CLIENT_SECRET, run_idp  # noqa: E402
from tests.support.server import free_port, serve_app  # noqa: E402


def _until(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(poll)


def _one_signin(controller: Controller, provider: str, login: bool = False) -> tuple[float, float | None]:
    """POST → awaiting_user in seconds (and, with ``login``, callback → completed); ends the session."""
    ctx = controller.ctx
    started = time.monotonic()
    created = controller.api("POST", "/api/v1/auth-sessions", json={"provider": provider}).json()
    session_id = created["id"]
    while True:
        auth = auth_flow.get_session(ctx, None, session_id)
        if auth.status == "awaiting_user":
            took = time.monotonic() - started
            break
        if auth.status in ("failed", "expired", "cancelled") or time.monotonic() - started > 600:
            raise RuntimeError(f"session {auth.status}: {auth.message}")
        time.sleep(0.05)
    callback_to_done = None
    if login:
        from tests.e2e.test_auth_real_vms import _log_in_over_vnc

        _log_in_over_vnc(controller, controller.api("GET", f"/api/v1/auth-sessions/{session_id}").json())
        done = controller.wait_status(session_id, {"completed", "failed"})
        if done["status"] != "completed":
            raise RuntimeError(f"login: {done['status']} {done['message']}")
        events = controller.api("GET", f"/api/v1/auth-sessions/{session_id}/events").json()["items"]
        at = {e["to_status"]: dt.datetime.fromisoformat(e["at"]) for e in events if e["kind"] == "auth.status"}
        callback_to_done = (at["completed"] - at["exchanging"]).total_seconds()
    else:
        controller.api("DELETE", f"/api/v1/auth-sessions/{session_id}")
    browser = auth.browser_vm_id or ""
    _until(lambda: vm_manager.get_vm(ctx, None, browser).status == "destroyed", 120, "the Browser VM to go")
    return took, callback_to_done


def _fmt(values: list[float]) -> str:
    return f"median {statistics.median(values):6.2f} s  (all {', '.join(f'{v:.2f}' for v in values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--provider", default="claude_code")
    parser.add_argument("--login", action="store_true", help="also log in over VNC in the warm runs")
    args = parser.parse_args()
    assert IDP_PASSWORD
    work = Path(tempfile.mkdtemp(prefix="rcli-bench-auth-"))
    port = free_port()
    results: dict[str, list[float]] = {"cold": [], "warm": [], "restore": []}
    logins: list[float] = []
    restore_note = ""
    snapshot_build_s: float | None = None
    with run_idp(port=port, issuer=f"http://10.0.2.2:{port}", password=IDP_PASSWORD) as idp:
        for name, client_id in CLIENT_IDS.items():
            prefix = f"REMOTECLI_PROVIDER_{name.upper()}_"
            os.environ[prefix + "AUTHORIZE_URL"] = f"{idp.issuer}/auth"
            os.environ[prefix + "TOKEN_URL"] = f"{idp.issuer}/token"
            os.environ[prefix + "CLIENT_ID"] = client_id
            os.environ[prefix + "SCOPES"] = "openid email offline_access"
        os.environ["REMOTECLI_PROVIDER_GEMINI_CLIENT_SECRET"] = GEMINI_CLIENT_SECRET
        settings = qemu_settings(f"sqlite:///{work / 'bench.db'}",
                                 guest_host_allowed_ports=[idp.port], browser_pool_size=0,
                                 browser_pool_interval_s=0.5, auth_page_timeout_s=600)
        try:
            require_images(settings, "cli", "browser")
        except BaseException:
            print("guest images are not built: REMOTECLI_DATA_DIR=.data/test-images remotecli images build all",
                  file=sys.stderr)
            return 2
        ctx = AppContext.create(settings)
        user = users_service.create_user(ctx.db, f"bench{int(time.time())}")
        _, token = users_service.create_token(ctx.db, user)
        principal = Principal(user.id, user.name, False)
        guard = FirewallGuard(ctx, idp.port).__enter__()  # the host's guest firewall is shared (see there)
        try:
            with serve_app(create_app(ctx, background=True), free_port(), ws="websockets") as url:
                controller = Controller(ctx, url, principal, {"Authorization": f"Bearer {token}"}, [])
                vm_manager.ensure_cli_vm(ctx, principal)  # a returning user: the CLI VM runs
                for run in range(args.runs):
                    took, _ = _one_signin(controller, args.provider)
                    results["cold"].append(took)
                    print(f"cold    run {run + 1}: awaiting_user after {took:.2f} s", file=sys.stderr)
                ctx.settings.browser_pool_size = 1  # the pool's loop (running) fills it
                for run in range(args.runs):
                    _until(lambda: pool.state(ctx).ready >= 1, 600, "a ready pool VM", poll=0.2)
                    took, login_s = _one_signin(controller, args.provider, login=args.login)
                    results["warm"].append(took)
                    if login_s is not None:
                        logins.append(login_s)
                    print(f"warm    run {run + 1}: awaiting_user after {took:.2f} s", file=sys.stderr)
                ctx.settings.browser_pool_size = 0
                pool.release_for_capacity(ctx, 10**9)  # no warm VM may serve the restore runs
                _until(lambda: pool.state(ctx).ready + pool.state(ctx).booting == 0, 300, "the pool to drain")
                if not ctx.driver.capabilities.snapshot:
                    restore_note = f"the {ctx.driver.name} driver has no snapshots"
                else:
                    started = time.monotonic()
                    try:
                        ref = ctx.driver.prepare_snapshot("browser")
                    except Exception as exc:  # the snapshot's own failure: reported, not fatal
                        ref, restore_note = None, f"snapshot build failed: {type(exc).__name__}: {exc}"[:300]
                    snapshot_build_s = time.monotonic() - started
                    if ref is None and not restore_note:
                        restore_note = "no snapshot for the browser image"
                if not restore_note:
                    for run in range(args.runs):
                        took, _ = _one_signin(controller, args.provider)
                        results["restore"].append(took)
                        print(f"restore run {run + 1}: awaiting_user after {took:.2f} s", file=sys.stderr)
        finally:
            guard.__exit__()
            for vm in vm_manager.list_vms(ctx, None):
                if vm.status != "destroyed":
                    vm_manager.destroy_vm(ctx, None, vm.id, reason="bench cleanup")
            ctx.close()
    accel = ctx.driver.availability().facts.get("accel", "?")
    print(f"# bench/auth.py  {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC  provider={args.provider} "
          f"runs={args.runs} accel={accel} cores={os.cpu_count()} load={os.getloadavg()[0]:.1f}")
    print("POST /auth-sessions -> awaiting_user (the user's CLI VM already running)")
    cold = statistics.median(results["cold"])
    for mode in ("cold", "warm", "restore"):
        if results[mode]:
            ratio = "" if mode == "cold" else f"   cold/{mode} = {cold / statistics.median(results[mode]):.1f}x"
            print(f"  {mode:8} {_fmt(results[mode])}{ratio}")
        else:
            print(f"  {mode:8} not available ({restore_note or 'not measured'})")
    if snapshot_build_s is not None and results["restore"]:
        print(f"  (the browser snapshot was built once in {snapshot_build_s:.1f} s before the restore runs)")
    if logins:
        print(f"callback -> completed (warm runs)   {_fmt(logins)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
