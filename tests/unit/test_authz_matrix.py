"""Authorization matrix: every endpoint, dashboard page and websocket as owner, other user, admin,
anonymous, and with an expired or revoked credential, through a bearer token and through the
dashboard's session cookie. All answers as designed:

- another user's object answers 404 exactly like a missing one (same status, same body), so ids
  do not leak; a refused request changes nothing (VMs, sessions, tickets, tokens);
- admins read everyone's objects through the API (``?all=true``, ``GET`` of one object) and may act
  on them there; the terminal and the login screen (VNC) are the owner's only, and the dashboard
  acts on the admin's own objects only; ``/admin`` pages are admins only (403 page for others);
- anonymous, expired and revoked credentials: 401 ``authentication_required`` from the API, a
  redirect to the sign-in page from the dashboard (401 JSON from the page's poll endpoint);
- state-changing requests with the cookie need the session's CSRF token (403, nothing changes);
- ``/metrics``: open to loopback clients (not requests relayed by a proxy); otherwise ``metrics_token`` or an
  admin's API token.

``test_every_route_is_in_the_matrix`` enumerates the app's routes (HTTP, websockets, mounts): a
route that is neither in a matrix nor in ``PUBLIC`` (with the reason it is public) fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.routing import APIRoute, APIWebSocketRoute
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.websockets import WebSocketDisconnect

from remotecli.agent.protocol import PtyData
from remotecli.app import create_app
from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.db.models import ApiToken, AuthSession, User, Vm, WsTicket, utcnow
from remotecli.domain.states import AuthStatus
from remotecli.drivers.fake import FakeAgent, FakeDriver
from remotecli.services import auth_flow, tickets, vm_manager
from remotecli.services import dashboard_sessions as sessions
from remotecli.services import users as users_service
from remotecli.services.transitions import set_auth_status
from remotecli.services.users import Principal
from tests.conftest import _database

ROLES = ("anonymous", "expired", "revoked", "other", "admin", "owner")  # the order each row is called in
SIGNED_OUT = ("anonymous", "expired", "revoked")
OBJECTS = ("cli", "browser", "session")
PASSWORD = "correct horse battery"
METRICS_TOKEN = "metrics-scrape-token-for-tests"
REMOTE_CLIENT = ("203.0.113.7", 50000)  # TEST-NET-3: not loopback


# ----------------------------------------------------------------------------------------------
# The world: one app per database kind; fresh users and objects per test


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def app_ctx(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppContext]:
    """One migrated database and app context per kind for the whole module (each test makes its own
    users and objects, so tests do not see each other's)."""
    tmp = tmp_path_factory.mktemp("authz")
    with contextlib.contextmanager(_database)(request.param, tmp, migrated=True) as url:
        # browser_clipboard_out: the VNC view's guest streams here are echoes, not RFB; the VNC
        # clipboard filter has its own tests (test_ws_bridge.py).
        settings = Settings(data_dir=tmp / "data", database_url=url, driver="fake", vm_boot_timeout_s=10,
                            metrics_token=METRICS_TOKEN, browser_clipboard_out=True)
        context = AppContext.create(settings, driver=FakeDriver())
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def app_client(app_ctx: AppContext) -> Iterator[TestClient]:
    with TestClient(create_app(app_ctx, background=False), raise_server_exceptions=False) as client:
        yield client


@functools.cache
def _password_hash() -> str:
    """One Argon2id hash of PASSWORD per run (hashing per user would cost ~0.1 s each)."""
    return PasswordHasher().hash(PASSWORD)


@dataclass
class World:
    ctx: AppContext
    client: TestClient
    principals: dict[str, Principal]
    tokens: dict[str, str | None]  # bearer token per role (expired/revoked: the owner's dead ones)
    cookies: dict[str, str | None]  # dashboard session cookie per role (expired/revoked: the owner's)
    sets: dict[str, dict[str, str]]  # "A": the owner's objects everyone but the admin is tried on; "B": the admin's
    names: dict[str, str] = field(default_factory=dict)

    def objects_for(self, role: str) -> dict[str, str]:
        # The admin works on its own copy of the owner's objects, so that what the admin may do
        # (stop, destroy, cancel) does not change what the owner's call finds.
        return self.sets["B" if role == "admin" else "A"]

    def owner_ids(self, *names: str) -> list[str]:
        ids = [objects[name] for objects in self.sets.values() for name in (names or OBJECTS)]
        return list(dict.fromkeys(ids))

    def principal_of(self, role: str) -> Principal:
        return self.principals["owner" if role in ("expired", "revoked") else role]


def _make_user(ctx: AppContext, name: str, *, admin: bool = False) -> Principal:
    user = users_service.create_user(ctx.db, name, is_admin=admin)
    with ctx.db.transaction() as session:
        session.execute(update(User).where(User.id == user.id).values(password_hash=_password_hash()))
    return Principal(user.id, user.name, admin)


def _objects(ctx: AppContext, owner: Principal, cli: str | None = None) -> dict[str, str]:
    return {
        "cli": cli or vm_manager.create_vm(ctx, owner, "cli").id,  # a user has one live CLI VM: shared
        "browser": vm_manager.create_vm(ctx, owner, "browser").id,
        "session": auth_flow.start_session(ctx, owner, "claude_code").id,
    }


@pytest.fixture
def world(app_ctx: AppContext, app_client: TestClient) -> Iterator[World]:
    ctx = app_ctx
    suffix = uuid.uuid4().hex[:8]
    names = {role: f"{role}-{suffix}" for role in ("owner", "other", "admin")}
    principals = {role: _make_user(ctx, name, admin=role == "admin") for role, name in names.items()}
    tokens: dict[str, str | None] = {"anonymous": None}
    cookies: dict[str, str | None] = {"anonymous": None}
    with ctx.db.read() as session:
        users = {role: session.get(User, principal.user_id) for role, principal in principals.items()}
    for role, user in users.items():
        assert user is not None
        tokens[role] = users_service.create_token(ctx.db, user)[1]
        cookies[role] = sessions.create_session(ctx.db, principals[role])[0]
    owner, owner_row = principals["owner"], users["owner"]
    assert owner_row is not None
    expired_row, tokens["expired"] = users_service.create_token(ctx.db, owner_row)
    revoked_row, tokens["revoked"] = users_service.create_token(ctx.db, owner_row)
    cookies["expired"] = expired_cookie = sessions.create_session(ctx.db, owner)[0]
    cookies["revoked"] = revoked_cookie = sessions.create_session(ctx.db, owner)[0]
    sessions.end_session(ctx.db, revoked_cookie)  # what POST /logout does
    with ctx.db.transaction() as session:
        past = utcnow() - dt.timedelta(minutes=1)
        session.execute(update(ApiToken).where(ApiToken.id == expired_row.id).values(expires_at=past))
        session.execute(update(ApiToken).where(ApiToken.id == revoked_row.id).values(revoked_at=utcnow()))
        session.execute(update(ApiToken).where(ApiToken.token_hash == users_service.hash_token(expired_cookie))
                        .values(expires_at=past))
    first = _objects(ctx, owner)
    sets = {"A": first, "B": _objects(ctx, owner, cli=first["cli"])}
    app_client.cookies.clear()
    yield World(ctx, app_client, principals, tokens, cookies, sets, names)
    app_client.cookies.clear()


def _snapshot(ctx: AppContext) -> tuple[Any, ...]:
    """Everything a refused request must leave as it was."""
    with ctx.db.read() as session:
        vms = sorted(session.execute(select(Vm.id, Vm.user_id, Vm.status)).all())
        auths = sorted(session.execute(select(AuthSession.id, AuthSession.user_id, AuthSession.status)).all())
        tickets = sorted(session.execute(select(WsTicket.id, WsTicket.used_at)).all())
        tokens = sorted(session.execute(select(ApiToken.id, ApiToken.revoked_at, ApiToken.expires_at)).all())
    return tuple(vms), tuple(auths), tuple(tickets), tuple(tokens)


def _prepare(world: World, how: str | None) -> None:
    """Put both copies of the owner's browser VM in the state a row needs (e.g. stopped for start)."""
    for objects in world.sets.values():
        if how == "stop":
            vm_manager.stop_vm(world.ctx, None, objects["browser"])
        elif how == "pause":
            vm_manager.pause_vm(world.ctx, None, objects["browser"])


# ----------------------------------------------------------------------------------------------
# Expected answers


@dataclass(frozen=True)
class Want:
    status: int
    code: str | None = None  # the JSON error code
    location: str | None = None  # a redirect's target; LOGIN: the sign-in page, back to this address
    sees: tuple[str, ...] = ()  # the owner's objects (by name; the copy this role is tried on) the body shows
    blind: bool = False  # the body shows none of the owner's objects (always checked for "other")
    mine: bool = False  # the created object ("id" in the body) belongs to the caller

    @property
    def refused(self) -> bool:
        return self.status >= 400 or self.location == LOGIN


LOGIN = "<sign-in page>"
OK, CREATED = Want(200), Want(201)
UNAUTHENTICATED = Want(401, "authentication_required")
VM_NOT_FOUND = Want(404, "vm_not_found")
SESSION_NOT_FOUND = Want(404, "auth_session_not_found")
TO_LOGIN = Want(303, location=LOGIN)


@dataclass(frozen=True)
class Row:
    method: str
    route: str  # the app's path template: the key the completeness test checks
    owner: Want
    other: Want
    admin: Want
    signed_out: Want = UNAUTHENTICATED  # anonymous, expired and revoked
    params: dict[str, str] = field(default_factory=dict)  # path parameter -> an object's name, or a literal
    query: str = ""  # may name objects: "session={session}"
    body: dict[str, Any] | None = None  # JSON for the API, form fields for the dashboard
    prepare: str | None = None  # "stop" / "pause" the browser VMs first

    @property
    def key(self) -> tuple[str, str]:
        return self.method, self.route

    @property
    def id(self) -> str:
        literal = ",".join(v for v in self.params.values() if v not in OBJECTS)
        return f"{self.method} {self.route}{'?' + self.query if self.query else ''}{' ' + literal if literal else ''}"

    def url(self, objects: dict[str, str]) -> str:
        path = self.route
        for name, value in self.params.items():
            path = path.replace("{" + name + "}", objects.get(value, value))
        return path + ("?" + self.query.format(**objects) if self.query else "")


def _list(sees: tuple[str, ...]) -> tuple[Want, Want, Want, Want]:
    """owner / other / admin / admin with ?all=true answers of a collection of ``sees`` objects."""
    return Want(200, sees=sees), Want(200, blind=True), Want(200, blind=True), Want(200, sees=sees)


_VMS, _AUTHS = _list(("cli", "browser")), _list(("session",))
VM = {"vm_id": "browser"}
SESSION = {"session_id": "session"}

API_ROWS = [
    Row("GET", "/api/v1/vms", _VMS[0], _VMS[1], _VMS[2]),
    # ?all=true is for admins; anyone else still gets their own VMs only.
    Row("GET", "/api/v1/vms", _VMS[0], _VMS[1], _VMS[3], query="all=true"),
    # Users create CLI VMs; the owner has one already (409). Browser VMs are the sign-ins' only
    # (ADR 0009): refused to everyone, admins included, and nothing is created.
    Row("POST", "/api/v1/vms", Want(409, "already_exists"), Want(201, mine=True), Want(201, mine=True),
        body={"vm_type": "cli"}),
    Row("POST", "/api/v1/vms", Want(403, "browser_vm_not_allowed"), Want(403, "browser_vm_not_allowed"),
        Want(403, "browser_vm_not_allowed"), body={"vm_type": "browser"}),
    # The owner has a live CLI VM (200, theirs); the others get a new one of their own (201).
    Row("POST", "/api/v1/vms/ensure", Want(200, mine=True), Want(201, mine=True), Want(201, mine=True),
        body={"vm_type": "cli"}),
    Row("GET", "/api/v1/vms/{vm_id}", OK, VM_NOT_FOUND, OK, params=VM),
    Row("POST", "/api/v1/vms/{vm_id}/stop", OK, VM_NOT_FOUND, OK, params=VM),
    Row("POST", "/api/v1/vms/{vm_id}/start", OK, VM_NOT_FOUND, OK, params=VM, prepare="stop"),
    Row("POST", "/api/v1/vms/{vm_id}/pause", OK, VM_NOT_FOUND, OK, params=VM),
    Row("POST", "/api/v1/vms/{vm_id}/resume", OK, VM_NOT_FOUND, OK, params=VM, prepare="pause"),
    Row("DELETE", "/api/v1/vms/{vm_id}", OK, VM_NOT_FOUND, OK, params=VM),
    # Running a command is *use*, like the terminal: the owner's only, admins included.
    Row("POST", "/api/v1/vms/{vm_id}/exec", OK, VM_NOT_FOUND, VM_NOT_FOUND, params=VM, body={"argv": ["true"]}),
    # Rebuilding a workspace is use too (it replaces the owner's VM, keeping their home): owner only.
    Row("POST", "/api/v1/vms/{vm_id}/rebuild", OK, VM_NOT_FOUND, VM_NOT_FOUND, params={"vm_id": "cli"}),
    # A terminal is the owner's only, admins included (a shell in someone's workspace is not a feature).
    Row("POST", "/api/v1/vms/{vm_id}/terminal", OK, VM_NOT_FOUND, VM_NOT_FOUND, params={"vm_id": "cli"}),
    # The caller's own home volume: the owner has one (made with their CLI VM); nobody sees another's.
    Row("GET", "/api/v1/workspace", OK, Want(404, "workspace_not_found"), Want(404, "workspace_not_found")),
    Row("GET", "/api/v1/providers", OK, OK, OK),
    # Credential health and key sign-in (issue 11): the caller's own workspace only, admins included.
    Row("GET", "/api/v1/credentials", Want(200, sees=("cli",)), Want(200, blind=True), Want(200, blind=True)),
    Row("POST", "/api/v1/credentials/keys", Want(201, sees=("cli",)), Want(201, blind=True), Want(201, blind=True),
        body={"provider": "gemini", "kind": "api_key", "key": "AIzaSy" + "Authz1" * 5 + "XYZ"}),
    # Device-code sign-in (issue 11): the caller's own only (another's id answers 404 like a missing
    # one: tests/unit/test_device_signin.py); a provider without one is refused and starts nothing.
    Row("GET", "/api/v1/device-signins", Want(200, blind=True), Want(200, blind=True), Want(200, blind=True)),
    Row("POST", "/api/v1/device-signins", Want(422, "device_signin_unsupported"),
        Want(422, "device_signin_unsupported"), Want(422, "device_signin_unsupported"), body={"provider": "gemini"}),
    Row("GET", "/api/v1/device-signins/{signin_id}", Want(404, "device_signin_not_found"),
        Want(404, "device_signin_not_found"), Want(404, "device_signin_not_found"),
        params={"signin_id": "dev_0000000000000000"}),
    Row("GET", "/api/v1/auth-sessions", _AUTHS[0], _AUTHS[1], _AUTHS[2]),
    Row("GET", "/api/v1/auth-sessions", _AUTHS[0], _AUTHS[1], _AUTHS[3], query="all=true"),
    Row("POST", "/api/v1/auth-sessions", Want(201, mine=True), Want(201, mine=True), Want(201, mine=True),
        body={"provider": "claude_code"}),
    Row("GET", "/api/v1/auth-sessions/{session_id}", OK, SESSION_NOT_FOUND, OK, params=SESSION),
    Row("GET", "/api/v1/auth-sessions/{session_id}/events", OK, SESSION_NOT_FOUND, OK, params=SESSION),
    Row("DELETE", "/api/v1/auth-sessions/{session_id}", OK, SESSION_NOT_FOUND, OK, params=SESSION),
]

# The dashboard, with its session cookie. Pages act on the caller's own objects only, admins included.
_DASHBOARD_404 = Want(404, blind=True)  # the dashboard again, "There is no such VM among yours."
_ADMINS_ONLY = Want(403, blind=True)  # "Admins only" page
_SIGNED_OUT_PAGE = Want(303, location="/login?notice=signed_out")
PAGE_ROWS = [
    Row("GET", "/", Want(303, location="/dashboard"), Want(303, location="/dashboard"),
        Want(303, location="/dashboard"), Want(303, location="/login")),
    Row("GET", "/login", Want(303, location="/dashboard"), Want(303, location="/dashboard"),
        Want(303, location="/dashboard"), OK),
    Row("POST", "/logout", _SIGNED_OUT_PAGE, _SIGNED_OUT_PAGE, _SIGNED_OUT_PAGE, _SIGNED_OUT_PAGE),
    Row("GET", "/dashboard", Want(200, sees=("cli", "browser")), Want(200, blind=True), Want(200, blind=True),
        TO_LOGIN),
    Row("POST", "/dashboard/vms/{vm_id}/{action}", Want(303, location="/dashboard?notice=stop"), _DASHBOARD_404,
        _DASHBOARD_404, TO_LOGIN, params={"vm_id": "browser", "action": "stop"}),
    Row("POST", "/dashboard/vms/{vm_id}/{action}", Want(303, location="/dashboard?notice=resume"), _DASHBOARD_404,
        _DASHBOARD_404, TO_LOGIN, params={"vm_id": "browser", "action": "resume"}, prepare="stop"),
    Row("POST", "/dashboard/vms/{vm_id}/{action}", Want(200, sees=("browser",)), _DASHBOARD_404, _DASHBOARD_404,
        TO_LOGIN, params={"vm_id": "browser", "action": "destroy"}),  # the confirmation page
    Row("POST", "/dashboard/vms/{vm_id}/{action}", Want(303, location="/dashboard?notice=destroy"), _DASHBOARD_404,
        _DASHBOARD_404, TO_LOGIN, params={"vm_id": "browser", "action": "destroy"}, body={"confirm": "yes"}),
    # Rebuild workspace: use of the owner's CLI VM (as POST /api/v1/vms/{id}/rebuild), owner only,
    # confirmed first like remove.
    Row("POST", "/dashboard/vms/{vm_id}/{action}", Want(200, sees=("cli",)), _DASHBOARD_404, _DASHBOARD_404,
        TO_LOGIN, params={"vm_id": "cli", "action": "rebuild"}),  # the confirmation page
    Row("POST", "/dashboard/vms/{vm_id}/{action}", Want(303, location="/dashboard?notice=rebuild"), _DASHBOARD_404,
        _DASHBOARD_404, TO_LOGIN, params={"vm_id": "cli", "action": "rebuild"}, body={"confirm": "yes"}),
    Row("GET", "/dashboard/remote-cli/auth", Want(200, sees=("session",)), Want(200, blind=True),
        Want(200, blind=True), TO_LOGIN),
    Row("GET", "/dashboard/remote-cli/auth", OK, Want(404, blind=True), Want(404, blind=True), TO_LOGIN,
        query="session={session}"),
    # The sign-in page's poll answers JSON, so a signed-out caller gets 401, not a redirect.
    Row("GET", "/dashboard/remote-cli/auth/{session_id}/state", OK, SESSION_NOT_FOUND, SESSION_NOT_FOUND,
        UNAUTHENTICATED, params=SESSION),
    Row("GET", "/dashboard/remote-cli/terminal", OK, OK, OK, TO_LOGIN),
    # The terminal page's "what will connecting do" poll (the caller's own workspace only): JSON, so 401.
    Row("GET", "/dashboard/remote-cli/terminal/state", OK, OK, OK, UNAUTHENTICATED),
    # Credential health "Check now" and key sign-in: the caller's own workspace only.
    Row("POST", "/dashboard/credentials/health", Want(200, sees=("cli",)), Want(200, blind=True),
        Want(200, blind=True), TO_LOGIN),
    Row("POST", "/dashboard/credentials/keys", Want(303, location="/dashboard?notice=key"),
        Want(303, location="/dashboard?notice=key"), Want(303, location="/dashboard?notice=key"), TO_LOGIN,
        body={"provider_kind": "gemini:api_key", "key": "AIzaSy" + "Authz1" * 5 + "XYZ"}),
    Row("GET", "/admin", _ADMINS_ONLY, _ADMINS_ONLY, Want(200, sees=OBJECTS), TO_LOGIN),
    Row("GET", "/admin/sessions/{session_id}", _ADMINS_ONLY, _ADMINS_ONLY, Want(200, sees=("session",)), TO_LOGIN,
        params=SESSION),
    Row("GET", "/admin/vms/{vm_id}", _ADMINS_ONLY, _ADMINS_ONLY, Want(200, sees=("browser",)), TO_LOGIN, params=VM),
]

# /metrics (test_metrics_matrix): loopback clients need nothing; anyone else a token.
METRICS_KEY = ("GET", "/metrics")
# The websockets (test_terminal_websocket_matrix, test_vnc_websocket_matrix): one-time tickets only.
WEBSOCKETS = {
    ("WEBSOCKET", "/api/v1/vms/{vm_id}/terminal"),
    ("WEBSOCKET", "/api/v1/auth-sessions/{session_id}/vnc"),
}

# Routes anyone may use, and why. test_public_routes_answer_everyone checks the GET ones.
PUBLIC: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "liveness probe: 'ok', nothing else",
    ("GET", "/readyz"): "readiness probe: database, migrations and driver in words, no user data",
    ("GET", "/openapi.json"): "the API's schema (documented as public in docs/security.md)",
    ("GET", "/docs"): "Swagger UI page for the schema (static HTML)",
    ("GET", "/docs/oauth2-redirect"): "part of the Swagger UI (static HTML)",
    ("GET", "/docs/swagger-init.js"): "starts the Swagger UI (a constant script, api/docs.py)",
    ("GET", "/redoc"): "ReDoc page for the schema (static HTML)",
    ("POST", "/login"): "the sign-in form (login-CSRF double submit, throttled; test_login_form_and_logout)",
    ("GET", "/auth/oidc/login"): "single sign-on entry point: sends the browser to the identity provider",
    ("GET", "/auth/oidc/callback"): "single sign-on return point: services/oidc.py checks state, PKCE and nonce",
    ("MOUNT", "/static"): "the stylesheet and the page scripts, no data",
    ("MOUNT", "/static/vendor/novnc"): "noVNC from npm",
    ("MOUNT", "/static/vendor/xterm"): "xterm.js from npm",
    ("MOUNT", "/static/vendor/xterm-addon-fit"): "xterm.js fit add-on from npm",
    ("MOUNT", "/static/vendor/swagger-ui"): "Swagger UI from npm (swagger-ui-dist), for /docs",
    ("MOUNT", "/static/vendor/redoc"): "ReDoc from npm, for /redoc",
}
# Only present while single sign-on is installed (services/oidc.py): not an error when absent.
OPTIONAL = {("GET", "/auth/oidc/login"), ("GET", "/auth/oidc/callback")}


# ----------------------------------------------------------------------------------------------
# Calling and checking


def _request(world: World, role: str, method: str, url: str, *, auth: str, body: dict[str, Any] | None = None,
             csrf: str | None = "own", client: TestClient | None = None) -> Any:
    """One request as ``role``. ``auth``: "bearer" or "cookie". ``csrf`` (cookie only): "own" = the
    session's token, None = none, or a literal token."""
    client = client or world.client
    client.cookies.clear()
    headers: dict[str, str] = {}
    api = url.startswith("/api/")
    if auth == "bearer":
        token = world.tokens[role]
        if token:
            headers["Authorization"] = f"Bearer {token}"
    else:
        cookie = world.cookies[role]
        if cookie:
            headers["Cookie"] = f"{sessions.SESSION_COOKIE}={cookie}"
        presented = (sessions.csrf_for(cookie) if cookie else None) if csrf == "own" else csrf
        if presented and method not in sessions.SAFE_METHODS:
            if api:
                headers["X-CSRF-Token"] = presented
            else:
                body = {**(body or {}), sessions.CSRF_FIELD: presented}
    kwargs: dict[str, Any] = {"headers": headers, "follow_redirects": False}
    if body is not None:
        kwargs["json" if api else "data"] = body
    response = client.request(method, url, **kwargs)
    client.cookies.clear()
    return response


def _check(world: World, role: str, want: Want, response: Any, url: str) -> None:
    where = f"{role}: {response.request.method} {url} -> {response.status_code} {response.text[:300]!r}"
    assert response.status_code == want.status, where
    if want.code is not None:
        assert response.json()["code"] == want.code, where
    if want.location is not None:
        expected = f"/login?next={quote(url, safe='')}" if want.location == LOGIN else want.location
        assert response.headers["location"] == expected, where
    text = response.text
    for name in want.sees:
        object_id = world.objects_for(role)[name]
        assert object_id[:8] in text, f"{where}: does not show {name} {object_id}"
    if want.blind or role == "other":
        leaked = [object_id for object_id in world.owner_ids() if object_id[:8] in text]
        assert not leaked, f"{where}: shows the owner's {leaked}"
    if want.mine:
        created = response.json()["id"]
        with world.ctx.db.read() as session:
            row = session.get(Vm, created) or session.get(AuthSession, created)
        assert row is not None and row.user_id == world.principal_of(role).user_id, where


def _same_as_missing(world: World, role: str, row: Row, response: Any, *, auth: str) -> None:
    """A hidden object's answer is the answer for an id that does not exist (ids do not leak)."""
    objects = world.objects_for(role)
    missing = {name: str(uuid.uuid4()) for name in objects}
    other = _request(world, role, row.method, row.url(missing), auth=auth, body=row.body)

    def scrub(text: str, ids: Iterable[str]) -> str:
        for object_id in ids:
            text = text.replace(object_id, "<id>")
        return text

    assert other.status_code == response.status_code
    assert scrub(other.text, missing.values()) == scrub(response.text, objects.values()), row.id


def _run_row(world: World, row: Row, *, auth: str) -> None:
    _prepare(world, row.prepare)
    for role in ROLES:
        want = {"owner": row.owner, "other": row.other, "admin": row.admin}.get(role, row.signed_out)
        url = row.url(world.objects_for(role))
        before = _snapshot(world.ctx) if want.refused else None
        response = _request(world, role, row.method, url, auth=auth, body=row.body)
        _check(world, role, want, response, url)
        if before is not None:
            assert _snapshot(world.ctx) == before, f"{role}: {row.id} was refused but changed something"
        if want.status == 404 and (row.params or "{" in row.query):
            _same_as_missing(world, role, row, response, auth=auth)


def _refuse_without_csrf(world: World, row: Row) -> None:
    """With the owner's live cookie, but no CSRF token or another session's: 403, nothing changes."""
    url = row.url(world.objects_for("owner"))
    foreign = sessions.csrf_for(world.cookies["other"] or "")
    for csrf in (None, foreign):
        before = _snapshot(world.ctx)
        response = _request(world, "owner", row.method, url, auth="cookie", body=row.body, csrf=csrf)
        assert response.status_code == 403, (row.id, csrf, response.text[:300])
        if url.startswith("/api/"):
            assert response.json()["code"] == "csrf_failed"
        assert _snapshot(world.ctx) == before, f"{row.id} without a CSRF token changed something"


# ----------------------------------------------------------------------------------------------
# The matrices


@pytest.mark.parametrize("auth", ["bearer", "cookie"])
@pytest.mark.parametrize("row", API_ROWS, ids=lambda row: row.id)
def test_api_matrix(world: World, row: Row, auth: str) -> None:
    if auth == "cookie" and row.method not in sessions.SAFE_METHODS:
        _refuse_without_csrf(world, row)
    _run_row(world, row, auth=auth)


@pytest.mark.parametrize("row", PAGE_ROWS, ids=lambda row: row.id)
def test_dashboard_matrix(world: World, row: Row) -> None:
    if row.method not in sessions.SAFE_METHODS:
        _refuse_without_csrf(world, row)
    _run_row(world, row, auth="cookie")


def test_public_routes_answer_everyone(world: World) -> None:
    for method, path in PUBLIC:
        if method != "GET" or path.startswith("/auth/oidc/"):
            continue
        for role in ROLES:
            for auth in ("bearer", "cookie"):
                response = _request(world, role, method, path, auth=auth)
                assert response.status_code == 200, (role, auth, path, response.text[:300])
                assert not any(object_id in response.text for object_id in world.owner_ids()), path
    assert world.client.get("/static/app.css").status_code == 200


def test_single_sign_on_entry_points_sign_nobody_in(world: World) -> None:
    """Public by design; without a provider's verified answer they never set a session cookie."""
    present = _routes(world.client.app)  # type: ignore[arg-type]
    for key in sorted(OPTIONAL & present):
        for query in ("", "?state=forged&code=forged"):
            response = _request(world, "anonymous", key[0], key[1] + query, auth="bearer")
            assert response.status_code in (303, 400, 401, 403, 404, 409, 503), (key, response.status_code)
            assert sessions.SESSION_COOKIE not in response.headers.get("set-cookie", ""), key


def test_metrics_matrix(world: World) -> None:
    # Loopback (a local Prometheus): open to every role, even with a dead or no token.
    for role in ROLES:
        response = _request(world, role, "GET", "/metrics", auth="bearer")
        assert response.status_code == 200 and response.text.startswith("# HELP"), role
    # Anyone else: the metrics token or an admin's API token; a user's token is not enough.
    remote = TestClient(world.client.app, client=REMOTE_CLIENT)
    want = {"owner": Want(403, "permission_denied"), "other": Want(403, "permission_denied"), "admin": OK,
            **dict.fromkeys(SIGNED_OUT, UNAUTHENTICATED)}
    for role in ROLES:
        for auth in ("bearer", "cookie"):
            response = _request(world, role, "GET", "/metrics", auth=auth, client=remote)
            # The dashboard cookie is never a metrics credential.
            _check(world, role, want[role] if auth == "bearer" else UNAUTHENTICATED, response, "/metrics")
    for token, status in ((METRICS_TOKEN, 200), ("not-the-metrics-token", 401), ("", 401)):
        response = remote.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == status, token
    # A reverse proxy on this host relays from loopback, with forwarded headers: not exempt.
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        relayed = world.client.get("/metrics", headers={header: "203.0.113.9"})
        assert relayed.status_code == 401 and relayed.json()["code"] == "authentication_required", header


# ----------------------------------------------------------------------------------------------
# Websockets: a one-time ticket is the only credential; errors close with 4401 (ticket),
# 4404 (not yours or missing: the same code), 4409 (not available now)


class _Echo:
    """A fake guest stream: what the browser sends comes back. ``read`` answers as the VNC proxy's
    TCP reader does (bytes); ``_Pty`` answers as a PTY does (``PtyData`` events)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def read(self, size: int = 65536) -> Any:
        return await self.queue.get()

    def write(self, data: bytes) -> None:  # the TCP writer's side
        self.queue.put_nowait(data)

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


class _Pty(_Echo):
    async def read(self, size: int = 65536) -> Any:
        return PtyData(await self.queue.get())

    async def write(self, data: bytes) -> None:  # type: ignore[override]
        self.queue.put_nowait(data)

    async def resize(self, cols: int, rows: int) -> None:
        return None

    async def close(self) -> None:  # type: ignore[override]
        return None


@pytest.fixture
def fake_streams(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []

    async def open_pty(self: FakeAgent, user: str, cols: int, rows: int, cmd: str | None = None) -> _Pty:
        opened.append(f"pty:{self._vm_id}")
        return _Pty()

    async def open_tcp(self: FakeAgent, port: int) -> tuple[_Echo, _Echo]:
        opened.append(f"tcp:{self._vm_id}")
        echo = _Echo()
        return echo, echo

    monkeypatch.setattr(FakeAgent, "open_pty", open_pty, raising=False)
    monkeypatch.setattr(FakeAgent, "open_tcp", open_tcp, raising=False)
    return opened


def _ws_refused(world: World, url: str, code: int, headers: dict[str, str] | None = None) -> None:
    world.client.cookies.clear()
    before = _snapshot(world.ctx)
    with pytest.raises(WebSocketDisconnect) as closed, \
            world.client.websocket_connect(url, headers=headers or {}) as ws:
        ws.receive_bytes()
    assert closed.value.code == code, (url, closed.value.code, closed.value.reason)
    after = _snapshot(world.ctx)
    # Only the (single-use) ticket may have been spent; nothing else changes.
    assert after[:2] == before[:2] and after[3] == before[3], url


def _ws_echo(world: World, url: str) -> None:
    with world.client.websocket_connect(url) as ws:
        ws.send_bytes(b"hello")
        assert ws.receive_bytes() == b"hello"


def _expired_ticket(world: World, kind: str, subject: str) -> str:
    ticket = tickets.issue_ticket(world.ctx, world.principals["owner"], kind, subject)
    with world.ctx.db.transaction() as session:
        session.execute(update(WsTicket).where(WsTicket.subject_id == subject, WsTicket.used_at.is_(None))
                        .values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    return ticket


def _ws_signed_out_and_forged(world: World, base: str, kind: str, subject: str, live_ticket: str) -> None:
    """anonymous (no ticket, a forged one), expired (an expired ticket), revoked (a used ticket;
    the owner's API token, cookie or bearer header instead of a ticket)."""
    for query in ("", "?token=", "?token=forged-ticket-value"):
        _ws_refused(world, base + query, 4401)
    _ws_refused(world, f"{base}?token={_expired_ticket(world, kind, subject)}", 4401)
    _ws_refused(world, f"{base}?token={live_ticket}", 4401)  # already used once
    _ws_refused(world, f"{base}?token={world.tokens['owner']}", 4401)
    _ws_refused(world, f"{base}?token={world.cookies['owner']}", 4401)
    _ws_refused(world, base, 4401, headers={"Authorization": f"Bearer {world.tokens['owner']}",
                                            "Cookie": f"{sessions.SESSION_COOKIE}={world.cookies['owner']}"})


def test_terminal_websocket_matrix(world: World, fake_streams: list[str]) -> None:
    cli = world.sets["A"]["cli"]
    base = f"/api/v1/vms/{cli}/terminal"
    # owner: a ticket from the API opens a shell in their VM.
    answer = _request(world, "owner", "POST", base, auth="bearer")
    assert answer.status_code == 200
    ticket = answer.json()["url"].split("token=")[1]
    _ws_echo(world, f"{base}?token={ticket}")
    assert fake_streams == [f"pty:{cli}"]
    # other, admin: the API gives them no ticket (test_api_matrix); one issued to them anyway is
    # refused like one for a VM that does not exist; their ticket for their own VM opens nothing here.
    for role in ("other", "admin"):
        principal = world.principals[role]
        _ws_refused(world, f"{base}?token={tickets.issue_ticket(world.ctx, principal, 'terminal', cli)}", 4404)
        missing = str(uuid.uuid4())
        missing_ticket = tickets.issue_ticket(world.ctx, principal, "terminal", missing)
        _ws_refused(world, f"/api/v1/vms/{missing}/terminal?token={missing_ticket}", 4404)
        own, _ = vm_manager.ensure_cli_vm(world.ctx, principal)
        _ws_refused(world, f"{base}?token={tickets.issue_ticket(world.ctx, principal, 'terminal', own.id)}", 4401)
    _ws_signed_out_and_forged(world, base, "terminal", cli, ticket)
    assert fake_streams == [f"pty:{cli}"]


def test_vnc_websocket_matrix(world: World, fake_streams: list[str]) -> None:
    session_id, browser = world.sets["A"]["session"], world.sets["A"]["browser"]
    with world.ctx.db.transaction() as db:
        auth = db.get(AuthSession, session_id)
        assert auth is not None
        set_auth_status(db, auth, AuthStatus.PROVISIONING, module="test", message="Preparing")
    with world.ctx.db.transaction() as db:
        auth = db.get(AuthSession, session_id)
        assert auth is not None
        set_auth_status(db, auth, AuthStatus.AWAITING_USER, module="test", message="Sign in",
                        browser_vm_id=browser)
    base = f"/api/v1/auth-sessions/{session_id}/vnc"
    # owner: the session's vnc_url opens the login screen, through either credential.
    for auth_kind in ("bearer", "cookie"):
        answer = _request(world, "owner", "GET", f"/api/v1/auth-sessions/{session_id}?vnc=1", auth=auth_kind)
        assert answer.status_code == 200 and answer.json()["vnc_url"], answer.text
        ticket = answer.json()["vnc_url"].split("token=")[1]
        _ws_echo(world, f"{base}?token={ticket}")
    assert fake_streams == [f"tcp:{browser}", f"tcp:{browser}"]
    # admin: sees the session but gets no vnc_url (the screen is the owner's); other: 404.
    before = _snapshot(world.ctx)
    admin_view = _request(world, "admin", "GET", f"/api/v1/auth-sessions/{session_id}?vnc=1", auth="bearer")
    assert admin_view.status_code == 200 and admin_view.json()["vnc_url"] is None, admin_view.text
    assert _snapshot(world.ctx) == before  # and no ticket was issued to the admin
    for role in ("other", "admin"):
        principal = world.principals[role]
        _ws_refused(world, f"{base}?token={tickets.issue_ticket(world.ctx, principal, 'vnc', session_id)}", 4404)
        own = auth_flow.start_session(world.ctx, principal, "codex")
        _ws_refused(world, f"{base}?token={tickets.issue_ticket(world.ctx, principal, 'vnc', own.id)}", 4401)
    _ws_signed_out_and_forged(world, base, "vnc", session_id, ticket)
    assert len(fake_streams) == 2


# ----------------------------------------------------------------------------------------------
# The real sign-in form and logout: the cookie they make is the one the matrix uses


def test_login_form_and_logout(world: World) -> None:
    client = world.client
    client.cookies.clear()
    name = world.names["other"]
    form = {"username": name, "password": PASSWORD, "next": "/dashboard"}
    # Without the login form's double-submit token: refused, no session.
    forged = client.post("/login", data={**form, "csrf_token": "forged"}, follow_redirects=False)
    assert forged.status_code == 403 and sessions.SESSION_COOKIE not in client.cookies
    login_csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
    assert login_csrf
    signed_in = client.post("/login", data={**form, "csrf_token": login_csrf.group(1)}, follow_redirects=False)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard"
    cookie = client.cookies.get(sessions.SESSION_COOKIE)
    assert cookie and cookie.startswith(sessions.SESSION_PREFIX)
    assert sessions.authenticate_session(world.ctx.db, cookie) == world.principals["other"]
    hidden = client.get(f"/api/v1/vms/{world.sets['A']['browser']}")
    assert hidden.status_code == 404 and hidden.json()["code"] == "vm_not_found"
    # Logout without the CSRF token keeps the session; with it, the session is dead on the server.
    assert client.post("/logout", data={}, follow_redirects=False).status_code == 403
    assert client.get("/dashboard", follow_redirects=False).status_code == 200
    out = client.post("/logout", data={sessions.CSRF_FIELD: sessions.csrf_for(cookie)}, follow_redirects=False)
    assert out.status_code == 303
    client.cookies.clear()
    dead = client.get("/dashboard", headers={"Cookie": f"{sessions.SESSION_COOKIE}={cookie}"},
                      follow_redirects=False)
    assert dead.status_code == 303 and dead.headers["location"].startswith("/login")
    api = client.get("/api/v1/vms", headers={"Cookie": f"{sessions.SESSION_COOKIE}={cookie}"})
    assert api.status_code == 401 and api.json()["code"] == "authentication_required"
    client.cookies.clear()


# ----------------------------------------------------------------------------------------------
# Completeness: every route the app serves is in a matrix above or in PUBLIC


def _walk(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI's _IncludedRouter
        if included is not None:
            context = getattr(route, "include_context", None)
            yield from _walk(included.routes, prefix + (getattr(context, "prefix", "") or ""))
        elif isinstance(route, APIWebSocketRoute | WebSocketRoute):
            yield "WEBSOCKET", prefix + route.path
        elif isinstance(route, APIRoute | Route):
            methods = set(route.methods or ())
            if "GET" in methods:
                methods.discard("HEAD")  # answered by the GET handler
            for method in methods:
                yield method, prefix + route.path
        elif isinstance(route, Mount):
            if route.routes:  # a mounted router: its routes count one by one
                yield from _walk(route.routes, prefix + route.path)
            else:  # a mounted app (static files)
                yield "MOUNT", prefix + route.path
        else:
            raise AssertionError(f"a route of a kind this test does not know: {route!r}; classify it")


def _routes(app: FastAPI) -> set[tuple[str, str]]:
    return set(_walk(app.router.routes))


def test_every_route_is_in_the_matrix(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'routes.db'}", driver="fake")
    ctx = AppContext.create(settings, driver=FakeDriver(), migrate=False)
    try:
        app = create_app(ctx, background=False)
        served = _routes(app)
        # The walk sees at least what the OpenAPI schema documents.
        documented = {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}
        assert documented <= served, documented - served
    finally:
        ctx.close()
    covered = {row.key for row in API_ROWS + PAGE_ROWS} | {METRICS_KEY} | WEBSOCKETS | set(PUBLIC)
    missing = served - covered
    assert not missing, (f"routes without a row in the authorization matrix: {sorted(missing)}; add rows "
                         "(owner, other, admin, signed out) or, if they are meant to be public, a PUBLIC entry "
                         "saying why")
    stale = covered - served - OPTIONAL
    assert not stale, f"matrix rows for routes the app does not serve: {sorted(stale)}"
    for row in API_ROWS + PAGE_ROWS:
        assert set(row.params) == set(re.findall(r"{(\w+)}", row.route)), row.id
    assert all(reason.strip() for reason in PUBLIC.values())
