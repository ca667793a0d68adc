"""Dashboard single sign-on against a real OpenID Connect provider (oidc-provider, ``tests/support/idp``).

A real controller (uvicorn on 127.0.0.1, fake VM driver: no VM is involved in signing in) is
registered at the local IdP as the confidential web client ``remotecli-dashboard`` with its exact
callback URL. The httpx tests follow every redirect and post the IdP's own login and consent
forms (both databases); the browser test does the same in Chromium (Playwright), as a person
would. All traffic stays on 127.0.0.1.

What they prove: a new IdP account lands on the dashboard as a new user; the same account comes
back as the same user; a local user with the same name is not taken over; a denied consent is a
403 ``sso_denied`` and creates nothing; no client secret, code or token reaches a log line, an
event or the browser.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import select

from remotecli.app import create_app
from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.db.models import Event, User, UserIdentity
from remotecli.drivers.fake import FakeDriver
from remotecli.logging import JsonFormatter
from remotecli.services import oidc
from remotecli.services import users as users_service
from tests.support.idp_server import DASHBOARD_CLIENT_ID, DASHBOARD_CLIENT_SECRET, Idp, run_idp
from tests.support.server import free_port, serve_app

IDP_PASSWORD = "idp-sso-password-42"
PLANTED_ACCESS = "at-planted-sso-5d1e9c3a7b2f4e60"
LOCAL_PASSWORD = "local-dashboard-password"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class Stack:
    idp: Idp
    ctx: AppContext
    url: str


@contextlib.contextmanager
def sso_stack(data_dir: Path, db_url: str) -> Iterator[Stack]:
    """The IdP with the controller's exact callback URL registered, then the controller on that port."""
    port = free_port()
    callback = f"http://127.0.0.1:{port}{oidc.CALLBACK_PATH}"
    with run_idp(password=IDP_PASSWORD, planted_access_token=PLANTED_ACCESS,
                 dashboard_redirect_uris=[callback]) as idp:
        settings = Settings(data_dir=data_dir, database_url=db_url, driver="fake", run_background=False,
                            oidc_issuer=idp.issuer, oidc_client_id=DASHBOARD_CLIENT_ID,
                            oidc_client_secret=DASHBOARD_CLIENT_SECRET, oidc_display_name="Test IdP")
        oidc.clear_cache()
        ctx = AppContext.create(settings, driver=FakeDriver())
        try:
            with serve_app(create_app(ctx, background=False), port) as url:
                yield Stack(idp, ctx, url)
        finally:
            ctx.close()
            oidc.clear_cache()


@pytest.fixture
def stack(tmp_path: Path, db_url: str) -> Iterator[Stack]:
    with sso_stack(tmp_path / "data", db_url) as running:
        yield running


def _form_action(page: httpx.Response) -> str:
    match = re.search(r'<form method="post" action="([^"]+)"', page.text)
    assert match, f"no form on {page.url}: {page.text[:300]}"
    return match.group(1)


def sign_in_with_httpx(stack: Stack, username: str, *, consent: str = "allow") -> tuple[httpx.Response, list[str]]:
    """Start at the controller, sign in at the IdP's form, answer its consent page; returns the final
    response and the authorization codes the browser carried back."""
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        login_page = browser.get(f"{stack.url}/auth/oidc/login")
        assert login_page.status_code == 200 and login_page.url.port == stack.idp.port
        assert "Sign in" in login_page.text and DASHBOARD_CLIENT_ID in login_page.text
        consent_page = browser.post(f"{stack.idp.url}{_form_action(login_page)}",
                                    data={"username": username, "password": IDP_PASSWORD})
        assert "Authorize" in consent_page.text, consent_page.text[:300]
        final = browser.post(f"{stack.idp.url}{_form_action(consent_page)}", data={"decision": consent})
        codes = [parse_qs(urlsplit(str(r.headers.get("location", ""))).query).get("code", [""])[0]
                 for r in final.history]
        if final.status_code == 200:
            final.read()
            # The session cookie works on the next request too.
            assert browser.get(f"{stack.url}/dashboard").status_code == 200
        return final, [code for code in codes if code]


def test_sign_in_through_the_real_idp_with_httpx(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ctx = stack.ctx
    local = users_service.create_user(ctx.db, "dave")
    users_service.set_password(ctx.db, "dave", LOCAL_PASSWORD)

    page, codes = sign_in_with_httpx(stack, "carol")
    assert page.status_code == 200 and page.url.path == "/dashboard" and page.url.port == urlsplit(stack.url).port
    assert 'class="user-name"' in page.text and ">carol" in page.text
    assert codes, "the callback carried no code"
    with ctx.db.read() as db:
        carol = db.scalars(select(User).where(User.name == "carol")).one()
        identity = db.scalars(select(UserIdentity).where(UserIdentity.user_id == carol.id)).one()
    assert carol.password_hash is None and not carol.is_admin
    assert (identity.issuer, identity.subject, identity.email) == (stack.idp.issuer, "carol", "carol@example.test")

    # The same IdP account again: the same user, no second identity.
    again, more = sign_in_with_httpx(stack, "carol")
    codes += more
    assert again.url.path == "/dashboard"
    # An IdP account named like a local user gets a user of its own; the local one is untouched.
    twin, more = sign_in_with_httpx(stack, "dave")
    codes += more
    assert ">dave-2" in twin.text
    with ctx.db.read() as db:
        names = sorted(db.scalars(select(User.name)))
        identities = sorted((i.subject, i.user_id) for i in db.scalars(select(UserIdentity)))
        events = [(e.kind, e.message, e.details) for e in db.scalars(select(Event))]
    assert names == ["carol", "dave", "dave-2"]
    assert [subject for subject, _ in identities] == ["carol", "dave"]
    assert all(user_id != local.id for _, user_id in identities)
    assert users_service.verify_password(ctx.db, "dave", LOCAL_PASSWORD).user_id == local.id
    assert sum(1 for kind, _, details in events if kind == "user.login" and details["method"] == "oidc") == 3

    # No record at all (the controller's, its HTTP client's) holds the secret or a token. The codes
    # travel in the callback's URL: uvicorn's access log line has it, and the log formatter must
    # redact it (this test's own HTTP client logs the URLs it follows: those records are not ours).
    everything = "\n".join(r.getMessage() + " " + repr(r.__dict__) for r in caplog.records)
    ours = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    logged = "\n".join(JsonFormatter().format(r) for r in ours)
    assert "dashboard single sign-on" in logged
    for secret in (DASHBOARD_CLIENT_SECRET, PLANTED_ACCESS):
        assert secret not in everything and secret not in repr(events)
    for code in codes:
        assert code not in logged and code not in repr(events)
    assert not re.search(r"eyJ[\w-]{10,}\.[\w-]{10,}\.", everything + repr(events)), "an ID token was logged"


def test_denied_consent_signs_nobody_in(stack: Stack) -> None:
    page, _codes = sign_in_with_httpx(stack, "mallory", consent="deny")
    assert page.status_code == 403
    assert '<code id="error-code">sso_denied</code>' in page.text and "declined" in page.text
    with stack.ctx.db.read() as db:
        assert list(db.scalars(select(User))) == []
        assert list(db.scalars(select(UserIdentity))) == []


@pytest.mark.e2e
@pytest.mark.slow
def test_sign_in_in_a_real_browser(tmp_path: Path) -> None:
    playwright_sync = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/install.sh installs it)")
    shots = Path(os.environ.get("REMOTECLI_SCREENSHOT_DIR") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    seen: list[str] = []
    with sso_stack(tmp_path / "data", f"sqlite:///{tmp_path / 'sso.db'}") as stack, \
            playwright_sync.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context(viewport={"width": 1280, "height": 800}, base_url=stack.url)
            page = context.new_page()
            page.set_default_timeout(30_000)

            def on_response(response: Any) -> None:
                with contextlib.suppress(Exception):  # redirects have no body
                    seen.append(response.text())

            page.on("response", on_response)
            page.goto("/login?next=/dashboard/remote-cli/terminal")
            button = page.get_by_role("link", name="Sign in with Test IdP")
            assert button.is_visible()
            page.screenshot(path=str(shots / "login-sso.png"))
            button.click()

            # The IdP's own pages, as a person fills them in.
            page.wait_for_url(f"{stack.idp.url}/interaction/**")
            page.get_by_label("User name").fill("erin")
            page.get_by_label("Password").fill(IDP_PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("button", name="Allow").click()

            page.wait_for_url(f"{stack.url}/dashboard/remote-cli/terminal")
            assert page.locator(".user-name").inner_text().strip() == "erin"
            page.goto("/dashboard")
            assert page.locator(".user-name").inner_text().strip() == "erin"
            page.screenshot(path=str(shots / "dashboard-sso.png"))
            cookies = {c["name"]: c for c in context.cookies()}
            session = cookies["rcli_session"]
            assert session["httpOnly"] and session["sameSite"] == "Lax"
            assert not [name for name in cookies if name.startswith(oidc.ATTEMPT_COOKIE_PREFIX)]
            seen.append(page.content())
            seen.append(str(page.evaluate("() => document.cookie + JSON.stringify({...localStorage})")))

            # Signing out and in again: the IdP remembers the browser, the controller the user.
            page.get_by_role("button", name="Sign out").click()
            page.wait_for_url("**/login?notice=signed_out")
            page.get_by_role("link", name="Sign in with Test IdP").click()
            page.wait_for_url(f"{stack.url}/dashboard")
            assert page.locator(".user-name").inner_text().strip() == "erin"
        finally:
            chromium.close()
        with stack.ctx.db.read() as db:
            assert sorted(db.scalars(select(User.name))) == ["erin"]
        for text in seen:
            assert PLANTED_ACCESS not in text and DASHBOARD_CLIENT_SECRET not in text
            assert not re.search(r"eyJ[\w-]{10,}\.[\w-]{10,}\.", text), "an ID token reached the browser"
