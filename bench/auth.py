#!/usr/bin/env python3
"""Sign-in latency with real parts: QEMU guests, Chromium in the Browser VM, a real IdP, VNC typing.

For each run: ``POST /api/v1/auth-sessions`` → ``awaiting_user`` (CLI VM ensured and Browser VM
booted side by side, Chromium showing the login page), then the login is typed over the VNC
websocket like a user would, and the time from the callback (the session's ``exchanging`` event)
to ``completed`` (tokens exchanged, credential files written in the CLI VM and read back) is taken
from the session's own timeline. Prints medians. The first run has no CLI VM yet (cold); later
runs reuse the live CLI VM, as a returning user would.

Usage: bench/auth.py [--runs 3] [--provider claude_code]   (needs built images: remotecli images build all)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from remotecli.app import create_app  # noqa: E402
from remotecli.context import AppContext  # noqa: E402
from remotecli.services import users as users_service  # noqa: E402
from remotecli.services import vm_manager  # noqa: E402
from remotecli.services.users import Principal  # noqa: E402
from tests.e2e.conftest import IDP_PASSWORD, Controller  # noqa: E402
from tests.e2e.test_auth_real_vms import _log_in_over_vnc  # noqa: E402
from tests.integration.conftest import qemu_settings, require_images  # noqa: E402
from tests.support.idp_server import CLIENT_IDS, GEMINI_CLIENT_SECRET, run_idp  # noqa: E402
from tests.support.server import free_port, serve_app  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--provider", default="claude_code")
    args = parser.parse_args()
    assert IDP_PASSWORD
    work = Path(tempfile.mkdtemp(prefix="rcli-bench-auth-"))
    port = free_port()
    with run_idp(port=port, issuer=f"http://10.0.2.2:{port}", password=IDP_PASSWORD) as idp:
        for name, client_id in CLIENT_IDS.items():
            prefix = f"REMOTECLI_PROVIDER_{name.upper()}_"
            os.environ[prefix + "AUTHORIZE_URL"] = f"{idp.issuer}/auth"
            os.environ[prefix + "TOKEN_URL"] = f"{idp.issuer}/token"
            os.environ[prefix + "CLIENT_ID"] = client_id
            os.environ[prefix + "SCOPES"] = "openid email offline_access"
        os.environ["REMOTECLI_PROVIDER_GEMINI_CLIENT_SECRET"] = GEMINI_CLIENT_SECRET
        settings = qemu_settings(f"sqlite:///{work / 'bench.db'}", guest_host_allowed_ports=[idp.port])
        try:
            require_images(settings, "cli", "browser")
        except BaseException:
            print("guest images are not built: REMOTECLI_DATA_DIR=.data/test-images remotecli images build all",
                  file=sys.stderr)
            return 2
        ctx = AppContext.create(settings)
        user = users_service.create_user(ctx.db, f"bench{int(time.time())}")
        _, token = users_service.create_token(ctx.db, user)
        to_awaiting: list[float] = []
        callback_to_done: list[float] = []
        try:
            with serve_app(create_app(ctx, background=True), free_port(), ws="websockets") as url:
                controller = Controller(ctx, url, Principal(user.id, user.name, False),
                                        {"Authorization": f"Bearer {token}"}, [])
                for run in range(args.runs):
                    started = time.monotonic()
                    created = controller.api("POST", "/api/v1/auth-sessions", json={"provider": args.provider}).json()
                    body = controller.wait_status(created["id"], {"awaiting_user", "failed"})
                    if body["status"] != "awaiting_user":
                        print(f"run {run}: {body['status']} {body['message']}", file=sys.stderr)
                        return 1
                    to_awaiting.append(time.monotonic() - started)
                    _log_in_over_vnc(controller, body)
                    done = controller.wait_status(created["id"], {"completed", "failed"})
                    if done["status"] != "completed":
                        print(f"run {run}: {done['status']} {done['message']}", file=sys.stderr)
                        return 1
                    events = controller.api("GET", f"/api/v1/auth-sessions/{created['id']}/events").json()["items"]
                    at = {e["to_status"]: dt.datetime.fromisoformat(e["at"])
                          for e in events if e["kind"] == "auth.status"}
                    callback_to_done.append((at["completed"] - at["exchanging"]).total_seconds())
                    print(f"run {run + 1}: awaiting_user after {to_awaiting[-1]:.1f} s, "
                          f"callback -> completed {callback_to_done[-1]:.2f} s", file=sys.stderr)
        finally:
            for vm in vm_manager.list_vms(ctx, None):
                if vm.status != "destroyed":
                    vm_manager.destroy_vm(ctx, None, vm.id, reason="bench cleanup")
            ctx.close()
    accel = ctx.driver.availability().facts.get("accel", "?")
    print(f"# bench/auth.py  {dt.date.today()}  provider={args.provider} runs={args.runs} accel={accel} "
          f"cores={os.cpu_count()}")
    print(f"POST /auth-sessions -> awaiting_user   median {statistics.median(to_awaiting):6.1f} s  "
          f"(first/cold {to_awaiting[0]:.1f} s, all {', '.join(f'{v:.1f}' for v in to_awaiting)})")
    print(f"callback -> completed                 median {statistics.median(callback_to_done):6.2f} s  "
          f"(all {', '.join(f'{v:.2f}' for v in callback_to_done)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
