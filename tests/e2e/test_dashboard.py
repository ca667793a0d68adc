"""The dashboard end to end, in a real browser: Playwright drives Debian's Chromium (headless)
against a real controller with QEMU guests and a real IdP. The user logs in to the dashboard,
signs in to a CLI by typing into the embedded noVNC view, and reads the credential file's mode in
the web terminal. Every page is saved as a PNG (``REMOTECLI_SCREENSHOT_DIR``, default: the test's
temporary directory); the ones in docs/screenshots/ come from here.

No token may reach the page: the test records every HTTP response body and websocket text frame
the browser saw, the pages' HTML and their storage, and looks for the IdP's planted token values.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Vm, utcnow
from remotecli.domain.states import AuthStatus
from remotecli.services import auth_flow, vm_manager
from remotecli.services import users as users_service
from remotecli.services.users import Principal
from tests.e2e.conftest import IDP_PASSWORD, PLANTED_ACCESS, PLANTED_REFRESH, Controller
from tests.support.cli_judge import assert_cli_signed_in

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DASHBOARD_PASSWORD = "dashboard-e2e-password"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SLOW_MS = 420_000  # two VMs boot under TCG and Chromium in the guest is slow


@dataclass
class Seen:
    """Everything the browser received."""

    texts: list[str] = field(default_factory=list)

    def assert_no_tokens(self) -> None:
        assert self.texts, "nothing was recorded"
        for secret in (PLANTED_ACCESS, PLANTED_REFRESH):
            leaked = [text[:200] for text in self.texts if secret in text]
            assert not leaked, f"a token reached the browser: {leaked}"


@dataclass
class Browser:
    browser: Any
    url: str
    shots: Path
    seen: Seen

    def page(self, viewport: dict[str, int] = DESKTOP) -> Any:
        context = self.browser.new_context(viewport=viewport, base_url=self.url)
        page = context.new_page()
        page.set_default_timeout(30_000)

        def on_response(response: Any) -> None:
            try:
                kind = response.headers.get("content-type", "")
                if "json" in kind or "text" in kind or "html" in kind:
                    self.seen.texts.append(response.text())
            except Exception:
                pass  # redirects and aborted requests have no body

        def on_websocket(ws: Any) -> None:
            ws.on("framereceived", lambda payload: self.seen.texts.append(payload)
                  if isinstance(payload, str) else None)

        page.on("response", on_response)
        page.on("websocket", on_websocket)
        return page

    def shot(self, page: Any, name: str) -> None:
        page.screenshot(path=str(self.shots / f"{name}.png"), full_page=False)

    def record_page_state(self, page: Any) -> None:
        """The page's HTML and the script-visible state (storage, the noVNC/xterm DOM)."""
        self.seen.texts.append(page.content())
        self.seen.texts.append(page.evaluate(
            "() => JSON.stringify({local: {...localStorage}, session: {...sessionStorage}, "
            "cookies: document.cookie, url: location.href, text: document.body.innerText})"))


@pytest.fixture
def browser(controller: Controller, tmp_path: Path) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/install.sh installs it)")
    shots = Path(os.environ.get("REMOTECLI_SCREENSHOT_DIR") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with playwright_sync.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield Browser(chromium, controller.url, shots, Seen())
        finally:
            chromium.close()


@pytest.fixture
def dashboard_user(controller: Controller) -> Principal:
    """The controller fixture's user, with a dashboard password."""
    users_service.set_password(controller.ctx.db, controller.principal.name, DASHBOARD_PASSWORD)
    return controller.principal


def _login(browser: Browser, page: Any, name: str, password: str = DASHBOARD_PASSWORD,
           shot: str | None = None) -> None:
    page.goto("/login")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    if shot:
        browser.shot(page, shot)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/dashboard")


def _oauth_title(ctx: AppContext, session_id: str) -> str:
    """The title of the page on the Browser VM's screen, as its OAuth agent reports it."""
    with ctx.db.read() as db:
        auth = db.get(AuthSession, session_id)
    if auth is None or not auth.browser_vm_id or not auth.oauth_flow_id:
        return ""
    agent = ctx.agent(vm_manager.get_vm(ctx, None, auth.browser_vm_id))
    try:
        return str(agent.oauth_status(auth.oauth_flow_id).page_title or "")
    finally:
        agent.close()


def _wait_title(ctx: AppContext, session_id: str, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    title = ""
    while time.monotonic() < deadline:
        title = _oauth_title(ctx, session_id)
        if text in title:
            return
        time.sleep(0.5)
    raise AssertionError(f"page {text!r} never appeared on the secure browser's screen (last: {title!r})")


def _session_id(page: Any) -> str:
    page.wait_for_url("**/dashboard/remote-cli/auth?session=*")
    return str(page.url.split("session=")[1])


def _start_sign_in(browser: Browser, page: Any, provider: str, shot: str | None = None) -> str:
    page.goto("/dashboard/remote-cli/auth")
    if shot:
        browser.shot(page, shot)
    page.locator(f'.provider-choice[data-provider="{provider}"]').click()
    session_id = _session_id(page)
    page.locator("#flow").wait_for(state="visible")
    return session_id


def _wait_visible(page: Any, selector: str, timeout_ms: int = SLOW_MS) -> None:
    """Wait for ``selector``; fail at once (with the page's words) if the sign-in ends instead."""
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        if page.locator(selector).is_visible():
            return
        if selector != "#result-bad" and page.locator("#result-bad").is_visible():
            raise AssertionError("the sign-in ended: " + page.locator("#result-bad").inner_text())
        time.sleep(0.5)
    raise AssertionError(f"{selector} did not appear; the page says: {page.locator('#flow').inner_text()!r}")


def _type_into_screen(browser: Browser, page: Any, ctx: AppContext, session_id: str, *,
                      consent: str = "allow", shot: str | None = None) -> None:
    """Log in at the IdP through the noVNC view, with the keyboard only (as a person would)."""
    _wait_visible(page, "#screen-card.live")
    page.locator("#screen-state", has_text="Connected").wait_for(timeout=60_000)
    _wait_title(ctx, session_id, "Sign in")
    time.sleep(2)  # let the login page's pixels reach the view
    page.focus("#screen canvas")  # noVNC's keyboard input; no click, which would move the guest's focus
    for attempt in range(3):
        # Under load the guest's first key after connecting can be spent on focusing Chromium's
        # window (tests/support/rfb.py, wake_keyboard): Shift first, which types nothing.
        page.keyboard.press("Shift")
        time.sleep(0.5)
        page.keyboard.type("alice", delay=40)
        page.keyboard.press("Tab")
        page.keyboard.type(IDP_PASSWORD, delay=40)
        page.keyboard.press("Enter")
        try:  # still the login form a while later (keys typed before it had focus): type again
            _wait_title(ctx, session_id, "Authorize", timeout=60 if attempt < 2 else 180)
            break
        except AssertionError:
            if attempt == 2:
                raise
    time.sleep(2)
    if shot:
        browser.shot(page, shot)
    if consent == "deny":
        page.keyboard.press("Tab")  # from the autofocused "Allow" to "Deny"
    page.keyboard.press("Enter")


def test_login_sign_in_to_claude_code_over_novnc_then_read_the_file_in_the_terminal(
        controller: Controller, dashboard_user: Principal, browser: Browser) -> None:
    ctx = controller.ctx
    page = browser.page()
    _login(browser, page, dashboard_user.name, shot="login")
    browser.shot(page, "dashboard-empty")
    assert page.get_by_text("You have no VMs yet").is_visible()
    browser.record_page_state(page)

    session_id = _start_sign_in(browser, page, "claude_code", shot="auth-choose")
    page.locator('#steps [data-step="browser"].step-active').wait_for(timeout=60_000)
    browser.shot(page, "auth-preparing")
    _type_into_screen(browser, page, ctx, session_id, shot="auth-login")
    browser.record_page_state(page)

    _wait_visible(page, "#result-ok")
    assert page.locator('#steps [data-step="done"].step-done').is_visible()
    assert page.locator("#ok-provider").inner_text() == "Claude Code"
    assert page.locator("#ok-account").inner_text() == "alice@example.test"
    assert "UTC" in page.locator("#ok-expiry").inner_text()
    assert page.locator("#screen-card").is_hidden()
    browser.shot(page, "auth-done")
    browser.record_page_state(page)

    # The web terminal: a shell in the CLI VM that received the credentials.
    page.get_by_role("link", name="Open terminal").click()
    page.wait_for_url("**/dashboard/remote-cli/terminal")
    page.locator("#term-conn", has_text="Connected").wait_for(timeout=SLOW_MS)
    page.locator(".xterm-rows", has_text="$").wait_for(timeout=60_000)  # the prompt
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("ls -l ~/.claude/.credentials.json", delay=20)
    page.keyboard.press("Enter")
    listing = page.locator(".xterm-rows", has_text=".credentials.json")
    page.locator(".xterm-rows", has_text="-rw-------").wait_for(timeout=60_000)
    # xterm.js may pad a row with spaces up to the cursor or the terminal's width.
    line = next(row.rstrip() for row in listing.inner_text().splitlines() if "-rw-------" in row)
    assert line.startswith("-rw------- 1 cli cli") and line.endswith("/home/cli/.claude/.credentials.json")
    browser.shot(page, "terminal")
    browser.record_page_state(page)

    # The dashboard now shows the sign-in (metadata only) and the CLI workspace.
    page.goto("/dashboard")
    row = page.locator('ul.providers:not(.health) > .provider[data-provider="claude_code"]')
    assert "Signed in" in row.inner_text() and "alice@example.test" in row.inner_text()
    # The health card reads the CLI's own file in the workspace now: signed in, same account.
    health = page.locator('ul.providers.health > .provider[data-provider="claude_code"]')
    assert health.get_attribute("data-state") == "signed_in"
    assert "alice@example.test" in health.inner_text()
    assert page.locator("table.vms tr", has_text="CLI workspace").filter(has_text="Running").count() == 1
    browser.shot(page, "dashboard")
    browser.record_page_state(page)

    phone = browser.page(PHONE)
    _login(browser, phone, dashboard_user.name)
    browser.shot(phone, "dashboard-phone")
    phone.goto(f"/dashboard/remote-cli/auth?session={session_id}")
    phone.locator("#result-ok").wait_for(state="visible")
    browser.shot(phone, "auth-done-phone")
    browser.record_page_state(phone)

    # An operator looks at the same sign-in in /admin.
    users_service.create_user(ctx.db, "ops", is_admin=True)
    users_service.set_password(ctx.db, "ops", DASHBOARD_PASSWORD)
    admin = browser.page()
    _login(browser, admin, "ops")
    admin.goto("/admin")
    assert admin.get_by_text(session_id[:8]).is_visible()
    browser.shot(admin, "admin")
    admin.goto(f"/admin/sessions/{session_id}")
    timeline = admin.locator("table.timeline").inner_text()
    assert "Sign-in to claude_code requested" in timeline and "transferring → completed" in timeline
    browser.shot(admin, "admin-timeline")
    browser.record_page_state(admin)

    browser.seen.assert_no_tokens()
    with ctx.db.read() as db:  # the real Claude Code in that CLI VM, offline, says it is signed in
        cli_vm_id = db.get(AuthSession, session_id).cli_vm_id  # type: ignore[union-attr]
    assert cli_vm_id and assert_cli_signed_in(ctx, cli_vm_id, "claude_code")


def test_denied_consent_shows_the_failure_in_words(controller: Controller, dashboard_user: Principal,
                                                   browser: Browser) -> None:
    page = browser.page()
    _login(browser, page, dashboard_user.name)
    session_id = _start_sign_in(browser, page, "claude_code")
    _type_into_screen(browser, page, controller.ctx, session_id, consent="deny")
    page.locator("#result-bad").wait_for(state="visible", timeout=SLOW_MS)
    assert page.locator("#bad-title").inner_text() == "Sign-in failed"
    assert "You declined access at Claude Code" in page.locator("#bad-message").inner_text()
    assert page.locator("#bad-code").inner_text() == "Code: oauth_denied"
    assert page.get_by_role("button", name="Try again").is_visible()
    assert page.locator('#steps .step-failed[data-step="save"]').count() == 1 \
        or page.locator('#steps .step-failed[data-step="login"]').count() == 1
    assert page.locator("#screen-card").is_hidden()
    browser.shot(page, "auth-failed")
    browser.record_page_state(page)
    # "Try again" starts a new session for the same provider.
    page.get_by_role("button", name="Try again").click()
    page.wait_for_function(f"() => !location.search.includes('{session_id}')")
    new_id = page.url.split("session=")[1]
    assert new_id != session_id
    assert auth_flow.get_session(controller.ctx, None, new_id).provider == "claude_code"
    auth_flow.cancel_session(controller.ctx, None, new_id)
    page.locator("#bad-title", has_text="Sign-in cancelled").wait_for(timeout=60_000)
    browser.seen.assert_no_tokens()


def test_a_session_that_expires_while_the_user_looks_away(controller: Controller, dashboard_user: Principal,
                                                         browser: Browser) -> None:
    page = browser.page()
    _login(browser, page, dashboard_user.name)
    session_id = _start_sign_in(browser, page, "claude_code")
    _wait_visible(page, "#screen-card.live")
    # Leaving the page cancels nothing: the session goes on and can be resumed from the dashboard.
    page.goto("/dashboard")
    page.get_by_role("link", name="Continue sign-in").click()
    assert _session_id(page) == session_id
    _wait_visible(page, "#screen-card.live", 60_000)
    with controller.ctx.db.transaction() as db:
        auth = db.get(AuthSession, session_id)
        assert auth is not None
        auth.expires_at = utcnow()  # the clock ran out
    page.locator("#result-bad").wait_for(state="visible", timeout=120_000)
    assert page.locator("#bad-title").inner_text() == "Sign-in expired"
    assert "took too long and expired" in page.locator("#bad-message").inner_text()
    assert page.locator("#screen-card").is_hidden()
    assert page.locator('#steps [data-step="login"].step-failed').is_visible()
    browser.shot(page, "auth-expired")
    assert auth_flow.get_session(controller.ctx, None, session_id).status == AuthStatus.EXPIRED.value


def test_a_user_cannot_see_another_users_vms_or_sessions(controller: Controller, dashboard_user: Principal,
                                                         browser: Browser) -> None:
    """No VM boots here: the other user's rows are written directly (a stopped VM, a live session)."""
    ctx = controller.ctx
    now = utcnow()
    vm_id = f"vm-{uuid.uuid4()}"
    session_id = str(uuid.uuid4())
    with ctx.db.transaction() as db:
        db.add(Vm(id=vm_id, user_id=dashboard_user.user_id, vm_type="cli", status="stopped", driver=ctx.driver.name,
                  vcpus=1, memory_mib=256, directory=str(ctx.settings.vms_dir / vm_id),
                  agent_secret_enc=ctx.box.encrypt_text("x", f"agent-secret:{vm_id}"), generation=0,
                  created_at=now, updated_at=now, status_changed_at=now))
        db.add(AuthSession(id=session_id, user_id=dashboard_user.user_id, provider="codex", status="cancelled",
                           message="Sign-in cancelled.", generation=0, created_at=now, updated_at=now,
                           expires_at=now))
    users_service.create_user(ctx.db, "mallory")
    users_service.set_password(ctx.db, "mallory", DASHBOARD_PASSWORD)

    owner = browser.page()
    _login(browser, owner, dashboard_user.name)
    assert owner.locator(f'tr[data-vm-id="{vm_id}"]').is_visible()

    page = browser.page()
    _login(browser, page, "mallory")
    assert page.locator(f'tr[data-vm-id="{vm_id}"]').count() == 0
    assert vm_id not in page.content()
    browser.shot(page, "dashboard-other-user")
    response = page.goto(f"/dashboard/remote-cli/auth?session={session_id}")
    assert response.status == 404 and page.get_by_text("does not exist or is not yours").is_visible()
    browser.shot(page, "auth-not-yours")
    for path in (f"/api/v1/auth-sessions/{session_id}", f"/dashboard/remote-cli/auth/{session_id}/state",
                 f"/api/v1/vms/{vm_id}", f"/api/v1/auth-sessions/{session_id}/events"):
        assert page.request.get(path).status == 404, path
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    for action in ("resume", "destroy"):
        answer = page.request.post(f"/dashboard/vms/{vm_id}/{action}", form={"csrf_token": csrf, "confirm": "yes"})
        assert answer.status == 404
    assert page.request.post(f"/api/v1/vms/{vm_id}/terminal", headers={"X-CSRF-Token": csrf}).status == 404
    assert page.request.delete(f"/api/v1/vms/{vm_id}", headers={"X-CSRF-Token": csrf}).status == 404
    assert page.goto("/admin").status == 403
    assert vm_manager.get_vm(ctx, None, vm_id).status == "stopped"
