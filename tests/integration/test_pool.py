"""The warm pool with real QEMU guests (a pool of 2, three sign-ins at once), and the Browser VM's
Chromium policy (a download link writes no file).

One module-scoped controller on SQLite (the claim race on both databases, and ten sign-ins at once,
are tests/unit/test_pool.py with the fake driver). Guests reach a small page server on the host's
loopback (10.0.2.2 from a guest) that plays the provider's sign-in page and serves a download. In
order, to boot as few VMs as possible on this 2-core TCG host: a pool VM killed while idle is
replaced after one reconciler pass; three sign-ins at once take the two warm VMs and boot one; a
download link in a warm VM's Chromium writes nothing; a claimed VM killed while the user logs in
gets the session words and another VM.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from remotecli.background import signins
from remotecli.background.pool import PoolKeeper
from remotecli.background.reconciler import Reconciler
from remotecli.context import AppContext
from remotecli.db.models import AuthSession
from remotecli.domain.states import VmStatus
from remotecli.services import auth_flow, pool, vm_exec, vm_manager
from remotecli.services import users as users_service
from remotecli.services.signin_state import BROWSER_RESTARTING
from remotecli.services.users import Principal
from tests.integration.conftest import close_and_clean, qemu_settings, require_images
from tests.support.net import qemu_pids_naming
from tests.support.server import free_port

pytestmark = pytest.mark.slow

DOWNLOAD_NAME = "remotecli-dl-probe-6c1f.bin"
PROVIDERS = ("claude_code", "codex", "gemini")


class _Pages(http.server.BaseHTTPRequestHandler):
    """The provider's sign-in page (any path under /auth), a page that downloads a file at once."""

    def do_GET(self) -> None:
        if self.path.startswith("/auth"):
            self._send(b"<!doctype html><title>Test provider sign-in</title><h1>Sign in</h1>", "text/html")
        elif self.path.startswith("/download"):
            self._send((f'<!doctype html><title>download page</title><a id="d" href="/file" download="{DOWNLOAD_NAME}">'
                        "get</a><script>document.getElementById('d').click();"
                        "setTimeout(()=>{document.title='download clicked'},500)</script>").encode(), "text/html")
        elif self.path.startswith("/file"):
            self._send(b"x" * 4096, "application/octet-stream",
                       {"Content-Disposition": f'attachment; filename="{DOWNLOAD_NAME}"'})
        else:
            self.send_error(404)

    def _send(self, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class FirewallGuard:
    """Keeps this controller's guest firewall (with the page server's port) in force while the
    module runs. The host's nftables table is one for every controller on the machine, and other
    test runs on this shared box rewrite it with their own allowed ports, which cut our guests off
    from the page server mid-test (seen: two sign-ins stuck loading the page)."""

    def __init__(self, ctx: AppContext, port: int) -> None:
        self.ctx, self.port = ctx, port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FirewallGuard:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        from remotecli.drivers.qemu import confinement

        while not self._stop.wait(1.0):
            if self.ctx.settings.guest_network_isolation == "off" or shutil.which("nft") is None:
                return
            listed = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=False).stdout
            if f"{self.port}" not in listed:
                with contextlib.suppress(Exception):
                    confinement.confine(self.ctx.settings)


@dataclass
class Env:
    ctx: AppContext
    user: Principal
    port: int
    worker: signins.SigninWorker


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Pages)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://10.0.2.2:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in PROVIDERS:
            mp.setenv(f"REMOTECLI_PROVIDER_{name.upper()}_AUTHORIZE_URL", f"{base}/auth")
            mp.setenv(f"REMOTECLI_PROVIDER_{name.upper()}_TOKEN_URL", f"{base}/token")
        db = Path(tempfile.mkdtemp(prefix="rc-pool-")) / "pool.db"
        # auth_page_timeout_s: Chromium's first page can take minutes when the shared host is loaded.
        settings = qemu_settings(f"sqlite:///{db}", browser_pool_size=2, guest_host_allowed_ports=[port],
                                 auth_page_timeout_s=600)
        require_images(settings, "cli", "browser")
        ctx = AppContext.create(settings)
        worker = signins.SigninWorker(ctx, interval_s=0.2)
        guard = FirewallGuard(ctx, port).__enter__()
        try:
            user = users_service.create_user(ctx.db, "pooluser")
            principal = Principal(user.id, user.name, False)
            vm_manager.ensure_cli_vm(ctx, principal)  # the user's workspace exists: the sign-ins time the browser
            assert pool.refill(ctx) == 2
            worker.start()
            yield Env(ctx, principal, port, worker)
        finally:
            worker.stop()
            for auth in auth_flow.list_sessions(ctx, None, all_users=True):
                with contextlib.suppress(Exception):
                    auth_flow.cancel_session(ctx, None, auth.id)
            guard.__exit__()
            close_and_clean(ctx)
            server.shutdown()


def _wait(ctx: AppContext, session_id: str, ok: object, timeout: float = 300) -> AuthSession:
    deadline = time.monotonic() + timeout
    while True:
        auth = auth_flow.get_session(ctx, None, session_id)
        if callable(ok) and ok(auth):
            return auth
        if time.monotonic() > deadline or auth.status in ("failed", "expired", "cancelled"):
            timeline = "\n".join(f"  {e.kind} {e.message}" for e in auth_flow.session_events(ctx, None, session_id))
            raise AssertionError(f"session {auth.status}: {auth.message}\n{timeline}")
        time.sleep(0.1)


def _kill_qemu(ctx: AppContext, vm_id: str) -> None:
    pids = qemu_pids_naming(f"{vm_manager.get_vm(ctx, None, vm_id).directory}/")
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while qemu_pids_naming(f"{vm_manager.get_vm(ctx, None, vm_id).directory}/") and time.monotonic() < deadline:
        time.sleep(0.1)


def _idle(ctx: AppContext) -> list[str]:
    return [vm.id for vm in vm_manager.list_vms(ctx, None, vm_type="browser", include_ended=False)
            if vm.user_id is None]


def test_idle_pool_vm_killed_is_replaced_after_a_reconciler_pass(env: Env) -> None:
    ctx = env.ctx
    idle = _idle(ctx)
    assert len(idle) == 2
    _kill_qemu(ctx, idle[0])
    Reconciler(ctx).run_once()
    assert vm_manager.get_vm(ctx, None, idle[0]).status == VmStatus.FAILED.value
    assert PoolKeeper(ctx).run_once() == 1  # the pool's next pass boots and warms a replacement
    now = _idle(ctx)
    assert len(now) == 2 and idle[0] not in now
    assert pool.state(ctx).ready == 2


def test_three_signins_at_once_two_warm_one_booted(env: Env) -> None:
    ctx = env.ctx
    warm = set(_idle(ctx))
    started = time.monotonic()
    ids = [auth_flow.start_session(ctx, env.user, name).id for name in PROVIDERS]
    took: dict[str, float] = {}
    done: dict[str, AuthSession] = {}
    while len(done) < len(ids):
        for sid in ids:
            if sid not in done:
                auth = auth_flow.get_session(ctx, None, sid)
                if auth.status == "awaiting_user":
                    done[sid], took[sid] = auth, time.monotonic() - started
                elif auth.status in ("failed", "expired", "cancelled") or time.monotonic() - started > 700:
                    _wait(ctx, sid, lambda a: False, timeout=0)
        time.sleep(0.1)
    browsers = [done[sid].browser_vm_id for sid in ids]
    assert all(browsers) and len(set(browsers)) == 3  # no VM serves two sessions
    warm_served = [sid for sid in ids if done[sid].browser_vm_id in warm]
    assert len(warm_served) == 2
    cold = next(sid for sid in ids if sid not in warm_served)
    print(f"\nawaiting_user after: warm {[round(took[s], 1) for s in warm_served]} s, cold {took[cold]:.1f} s")
    assert max(took[s] for s in warm_served) < took[cold]
    for sid in warm_served:
        events = [e.message for e in auth_flow.session_events(ctx, None, sid)]
        assert "Secure browser ready (a warm one from the pool)" in events


def _guest_python(ctx: AppContext, vm_id: str, code: str, timeout: float = 60) -> str:
    result = vm_exec.exec_in_vm(ctx, None, vm_id, ["python3", "-c", code], timeout_s=timeout)
    assert result.exit_code == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


def test_a_download_link_writes_no_file_in_the_browser_vm(env: Env) -> None:
    ctx = env.ctx
    auth = next(a for a in auth_flow.list_sessions(ctx, None, all_users=True)
                if a.status == "awaiting_user" and a.browser_vm_id)
    vm_id = auth.browser_vm_id or ""
    # The sign-in's own Chromium (the flow's, DevTools on the guest's loopback) opens the page,
    # whose script clicks a download link at once.
    title = _guest_python(ctx, vm_id, (
        "import sys, time, json; sys.path.insert(0, '/opt/remotecli')\n"
        "from remotecli_guest.oauth import _navigate, _devtools_pages\n"
        "port = next(p for p in range(9222, 9300) if _devtools_pages(p))\n"
        f"assert _navigate(port, 'http://10.0.2.2:{env.port}/download')\n"
        "for _ in range(200):\n"
        "    pages = [p for p in _devtools_pages(port) if p.get('type') == 'page']\n"
        "    if pages and pages[0].get('title') == 'download clicked': break\n"
        "    time.sleep(0.2)\n"
        "time.sleep(8)\n"
        "print(pages[0].get('title'))\n"), timeout=90)
    assert title.strip() == "download clicked"  # the page loaded and its script clicked the link
    found = _guest_python(ctx, vm_id, (
        "import os\n"
        "hits = []\n"
        "for top in ('/tmp', '/home', '/root', '/var/tmp'):\n"
        "    for root, dirs, files in os.walk(top):\n"
        f"        hits += [os.path.join(root, f) for f in files if f.startswith('{DOWNLOAD_NAME}')"
        " or f.endswith('.crdownload')]\n"
        "print(hits)\n"))
    assert found.strip() == "[]"
    policy = _guest_python(ctx, vm_id, "print(open('/etc/chromium/policies/managed/remotecli.json').read())")
    assert '"DownloadRestrictions": 3' in policy and '"AllowFileSelectionDialogs": false' in policy


def test_claimed_vm_killed_while_the_user_logs_in_gets_words_and_another_vm(env: Env) -> None:
    ctx = env.ctx
    auth = next(a for a in auth_flow.list_sessions(ctx, None, all_users=True)
                if a.status == "awaiting_user" and a.browser_vm_id
                and vm_manager.get_vm(ctx, None, a.browser_vm_id).pool)
    first = auth.browser_vm_id or ""
    _kill_qemu(ctx, first)
    words = _wait(ctx, auth.id, lambda a: a.message == BROWSER_RESTARTING or a.browser_vm_id not in (first,),
                  timeout=120)
    assert words.status == "awaiting_user"
    after = _wait(ctx, auth.id, lambda a: a.browser_vm_id not in (None, first) and a.oauth_flow_id is not None)
    assert after.status == "awaiting_user"
    assert after.message is not None and "new secure browser" in after.message
    kinds = [(e.kind, e.message) for e in auth_flow.session_events(ctx, None, auth.id)]
    assert ("auth.browser_restarted", BROWSER_RESTARTING) in kinds
    assert vm_manager.get_vm(ctx, None, first).status in (VmStatus.FAILED.value, VmStatus.DESTROYED.value,
                                                         VmStatus.DESTROYING.value)
    assert vm_manager.get_vm(ctx, None, after.browser_vm_id or "").status == VmStatus.RUNNING.value


def test_vnc_clipboard_filter_follows_a_real_x11vnc_stream(env: Env) -> None:
    """The bridge's RFB filter (on by default) through a handshake and a full screen update of the
    Browser VM's real x11vnc, with noVNC's encodings asked for: it follows the stream to the end of
    the update and passes the screen on (its ServerCutText dropping is unit-tested)."""
    import asyncio

    from remotecli.api.ws_bridge import RfbClipboardFilter

    ctx = env.ctx
    vm = next(v for v in vm_manager.list_vms(ctx, None, vm_type="browser", status="running"))
    agent = ctx.agent(vm)

    async def talk() -> tuple[int, str]:
        reader, writer = await agent.open_tcp(ctx.settings.browser_vnc_port)
        rfb = RfbClipboardFilter()
        passed = 0
        sent: set[str] = set()

        def send(data: bytes) -> None:
            writer.write(rfb.from_client(data))

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(65536), 2)
            except TimeoutError:
                data = b""
            passed += len(rfb.from_server(data))
            state = rfb._server_state
            if state == "security" and "version" not in sent:
                send(b"RFB 003.008\n")
                sent.add("version")
            elif state == "chosen" and "choice" not in sent:
                send(b"\x01")
                sent.add("choice")
            elif state == "init" and "client_init" not in sent:
                send(b"\x01")
                sent.add("client_init")
            elif state == "messages" and "requests" not in sent:
                encodings = [7, 16, 6, 0, 1, -239, -223, -224, -308, -1063131698, -312, -313, -258]
                send(b"\x02\0" + len(encodings).to_bytes(2, "big")
                     + b"".join(e.to_bytes(4, "big", signed=True) for e in encodings))
                send(b"\x03\x00\0\0\0\0" + (1280).to_bytes(2, "big") + (800).to_bytes(2, "big"))
                sent.add("requests")
            elif "requests" in sent and state == "messages" and passed > 1000 and not data:
                break
            await writer.drain()
        writer.close()
        return passed, rfb._server_state

    try:
        passed, state = asyncio.run(talk())
    finally:
        agent.close()
    assert state == "messages" and passed > 1000  # handshake, ServerInit and a whole update followed
