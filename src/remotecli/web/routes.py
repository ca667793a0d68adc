"""Dashboard pages: login/logout, my VMs and credentials, sign-in to a CLI (noVNC), web terminal, admin.

Pages are rendered on the server (Jinja2). The live parts (the sign-in progress and its noVNC view,
the terminal) are small JavaScript modules that talk to the REST API with the session cookie and
the CSRF header. No page, script state or response ever holds a credential: the API returns only
``credential_meta`` (account, expiry, scopes).

Why one module of about 490 lines: every page goes through the same session, CSRF, redirect and
security-header helpers at the top; each page itself is a few lines (the services do the work,
``views.py`` the words), and splitting them would spread those helpers' one contract over files.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from remotecli.background.gc import GarbageCollector
from remotecli.context import AppContext
from remotecli.domain.states import VM_STATUS_WORDS, AuthStatus, VmStatus
from remotecli.errors import AuthenticationRequired, NotFound, RemotecliError, TooManyLoginAttempts
from remotecli.logging import get_logger
from remotecli.services import admin as admin_service
from remotecli.services import credential_health, key_signin, login_limits, oidc, vm_manager
from remotecli.services import dashboard as dashboard_service
from remotecli.services import dashboard_sessions as sessions
from remotecli.services import users as users_service
from remotecli.services.users import Principal
from remotecli.web import views

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.globals["vm_status_words"] = {s.value: w for s, w in VM_STATUS_WORDS.items()}
router = APIRouter(include_in_schema=False)
log = get_logger("dashboard")

CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self' ws: wss:; font-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'self'; object-src 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
NOTICES = {
    "stop": "The VM is stopped.",
    "resume": "The VM is running again.",
    "destroy": "The VM was removed.",
    "rebuild": ("Your workspace was rebuilt: a new CLI VM on the current image, with your home kept "
                "(your files and CLI sign-ins are where you left them)."),
    "signed_out": "You are signed out.",
    "key": "Your key is in your workspace and the CLI reads it as signed in.",
}


class _LoginRedirect(Exception):
    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


def _ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


def _secure(request: Request) -> bool:
    public = _ctx(request).settings.public_url or ""
    return request.url.scheme == "https" or public.startswith("https://")


def _current(request: Request) -> tuple[Principal, str] | None:
    token = request.cookies.get(sessions.SESSION_COOKIE)
    if not token:
        return None
    try:
        return sessions.authenticate_session(_ctx(request).db, token), token
    except AuthenticationRequired:
        return None


def _require(request: Request) -> tuple[Principal, str]:
    current = _current(request)
    if current is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise _LoginRedirect(f"/login?next={quote(target, safe='')}")
    return current


def _safe_next(value: str | None) -> str:
    """Only same-site paths: never an open redirect."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/dashboard"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/dashboard"
    return value


def _page(request: Request, name: str, context: dict[str, Any], *, status_code: int = 200,
          current: tuple[Principal, str] | None = None) -> HTMLResponse:
    principal, token = current if current else (None, None)
    base = {
        "principal": principal,
        "csrf_token": sessions.csrf_for(token) if token else "",
        "path": request.url.path,
        "vendor_ready": vendor_ready(),
    }
    response = templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response


def _error_page(request: Request, current: tuple[Principal, str] | None, title: str, message: str,
                status_code: int) -> HTMLResponse:
    return _page(request, "error.html", {"title": title, "message": message}, status_code=status_code,
                 current=current)


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {key: value for key, value in form.items() if isinstance(value, str)}


def _check_form_csrf(token: str, form: dict[str, str]) -> None:
    sessions.check_csrf(token, form.get(sessions.CSRF_FIELD))


# ----------------------------------------------------------------------------------------------
# Vendor packages (npm, installed by scripts/install.sh into web/node_modules)

VENDOR_DIR = HERE / "node_modules"
VENDOR_PACKAGES = {
    "novnc": "@novnc/novnc",
    "xterm": "@xterm/xterm",
    "xterm-addon-fit": "@xterm/addon-fit",
}


def vendor_ready() -> bool:
    return all((VENDOR_DIR / package / "package.json").is_file() for package in VENDOR_PACKAGES.values())


# ----------------------------------------------------------------------------------------------
# Login and logout


def _login_page(request: Request, *, error: str = "", name: str = "", next_path: str = "/dashboard",
                status_code: int = 200, notice: str = "", error_code: str = "") -> HTMLResponse:
    login_csrf = sessions.new_login_csrf()
    settings = _ctx(request).settings
    sso = {"label": f"Sign in with {settings.oidc_display_name}",
           "href": f"{oidc.LOGIN_PATH}?next={quote(next_path, safe='')}"} if settings.oidc_enabled else None
    response = _page(request, "login.html", {"error": error, "error_code": error_code, "name": name, "next": next_path,
                                             "login_csrf": login_csrf, "notice": notice, "sso": sso},
                     status_code=status_code)
    response.set_cookie(sessions.LOGIN_CSRF_COOKIE, login_csrf, max_age=3600, path="/login", httponly=True,
                        samesite="strict", secure=_secure(request))
    return response


@router.get("/", response_model=None)
def root(request: Request) -> RedirectResponse:
    return RedirectResponse("/dashboard" if _current(request) else "/login", status_code=303)


@router.get("/login", response_model=None)
def login_form(request: Request, next: str = "/dashboard", notice: str = "") -> Response:
    if _current(request):
        return RedirectResponse(_safe_next(next), status_code=303)
    return _login_page(request, next_path=_safe_next(next), notice=NOTICES.get(notice, ""))


@router.post("/login", response_model=None)
async def login(request: Request) -> Response:
    form = await _form(request)
    name = form.get("username", "").strip().lower()
    next_path = _safe_next(form.get("next"))
    cookie = request.cookies.get(sessions.LOGIN_CSRF_COOKIE, "")
    if not sessions.login_csrf_ok(cookie, form.get(sessions.CSRF_FIELD, "")):
        return _login_page(request, error="This form was open too long or came from another site. "
                           "Please sign in again.", name=name, next_path=next_path, status_code=403)
    client = request.client.host if request.client else ""
    ctx = _ctx(request)
    try:
        login_limits.check(ctx.db, ctx.settings, name, client)
    except TooManyLoginAttempts as exc:
        log.info("dashboard sign-in refused: %s", exc.code, extra={"client": client})
        return _login_page(request, error=exc.message, name=name, next_path=next_path,
                           status_code=exc.http_status, error_code=exc.code)
    try:
        principal = users_service.verify_password(ctx.db, name, form.get("password", ""))
    except AuthenticationRequired as exc:
        login_limits.record_failure(ctx.db, name, client)
        log.info("dashboard sign-in refused", extra={"client": client})
        return _login_page(request, error=exc.message, name=name, next_path=next_path, status_code=401,
                           error_code=exc.code)
    login_limits.record_success(ctx.db, name)
    token, _expires = sessions.create_session(ctx.db, principal, client=client)
    response = RedirectResponse(next_path, status_code=303)
    _set_session_cookie(request, response, token)
    response.delete_cookie(sessions.LOGIN_CSRF_COOKIE, path="/login")
    return response


def _set_session_cookie(request: Request, response: Response, token: str) -> None:
    """The dashboard session cookie, the same for a password and a single sign-on."""
    response.set_cookie(sessions.SESSION_COOKIE, token, max_age=int(sessions.SESSION_TTL.total_seconds()),
                        path="/", httponly=True, samesite="lax", secure=_secure(request))


# ----------------------------------------------------------------------------------------------
# Single sign-on (OpenID Connect; services/oidc.py)


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def _sso_error(request: Request, exc: RemotecliError, state: str = "") -> Response:
    """A failed single sign-on: a page (or JSON ``{code, message}``) in words, with the stable code."""
    level = log.warning if exc.http_status >= 500 else log.info
    level("single sign-on refused", extra={"x_code": exc.code, "x_detail": exc.log_detail or ""})
    response: Response
    if _wants_json(request):
        response = JSONResponse(exc.to_dict(), status_code=exc.http_status, headers={"Cache-Control": "no-store"})
    else:
        response = _page(request, "error.html", {
            "title": "Single sign-on did not work", "message": exc.message, "code": exc.code,
            "actions": [("Try again", oidc.LOGIN_PATH), ("Back to sign in", "/login")]
            if _ctx(request).settings.oidc_enabled else [("Back to sign in", "/login")],
        }, status_code=exc.http_status)
    # The callback's address holds the (spent) code: never send it on as a referrer.
    response.headers["Referrer-Policy"] = "no-referrer"
    if state:
        response.delete_cookie(oidc.attempt_cookie_name(state), path=oidc.ATTEMPT_COOKIE_PATH, httponly=True,
                               samesite="lax", secure=_secure(request))
    return response


@router.get(oidc.LOGIN_PATH, response_model=None)
def oidc_login(request: Request, next: str = "/dashboard") -> Response:
    """Send the browser to the identity provider (authorization-code flow, PKCE, state, nonce)."""
    if _current(request):
        return RedirectResponse(_safe_next(next), status_code=303)
    ctx = _ctx(request)
    try:
        start = oidc.start_login(ctx, redirect_to=oidc.redirect_uri(ctx.settings, str(request.base_url)),
                                 next_path=_safe_next(next))
    except RemotecliError as exc:
        return _sso_error(request, exc)
    response = RedirectResponse(start.authorize_url, status_code=303)
    response.set_cookie(start.cookie_name, start.cookie_value, max_age=start.max_age, path=oidc.ATTEMPT_COOKIE_PATH,
                        httponly=True, samesite="lax", secure=_secure(request))
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get(oidc.CALLBACK_PATH, response_model=None)
def oidc_callback(request: Request) -> Response:
    """The provider sends the browser back here: verify, sign the user in, go to the dashboard."""
    ctx = _ctx(request)
    params = {key: value for key, value in request.query_params.items()}
    try:
        result = oidc.complete_login(ctx, params=params, cookies=request.cookies)
    except RemotecliError as exc:
        return _sso_error(request, exc, params.get("state", ""))
    client = request.client.host if request.client else ""
    token, _expires = sessions.create_session(ctx.db, result.principal, client=client, method="oidc")
    response = RedirectResponse(_safe_next(result.next_path), status_code=303)
    _set_session_cookie(request, response, token)
    response.delete_cookie(oidc.attempt_cookie_name(params["state"]), path=oidc.ATTEMPT_COOKIE_PATH, httponly=True,
                           samesite="lax", secure=_secure(request))
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@router.post("/logout", response_model=None)
async def logout(request: Request) -> Response:
    token = request.cookies.get(sessions.SESSION_COOKIE, "")
    form = await _form(request)
    if token:
        try:
            _check_form_csrf(token, form)
        except RemotecliError:
            return _error_page(request, _current(request), "Could not sign out",
                               "This page's security token is out of date. Reload the page and try again.", 403)
        sessions.end_session(_ctx(request).db, token)
    response = RedirectResponse("/login?notice=signed_out", status_code=303)
    response.delete_cookie(sessions.SESSION_COOKIE, path="/", httponly=True, samesite="lax",
                           secure=_secure(request))
    return response


# ----------------------------------------------------------------------------------------------
# Dashboard: my VMs and my CLI credentials


def _dashboard(request: Request, current: tuple[Principal, str], *, notice: str = "", error: str = "",
               status_code: int = 200, refresh_health: bool = False) -> HTMLResponse:
    data = dashboard_service.overview(_ctx(request), current[0])
    home = dashboard_service.workspace(_ctx(request), current[0])
    health = credential_health.read_health(_ctx(request), current[0], refresh=refresh_health)
    return _page(request, "dashboard.html", {
        "vms": [views.vm_row(vm) for vm in data.vms], "hidden_vms": data.hidden_vms,
        "workspace": views.workspace_panel(home) if home is not None else None,
        "credentials": views.provider_credentials(data.sign_ins), "notice": notice, "error": error,
        "health": views.credential_health_rows(health), "key_kinds": KEY_KINDS,
    }, status_code=status_code, current=current)


# Key sign-in (services/key_signin.py): the choices of the dashboard's form, "provider:kind".
KEY_KINDS = [("claude_code:api_key", "Claude Code: Anthropic API key"),
             ("claude_code:oauth_token", "Claude Code: long-lived token (claude setup-token)"),
             ("codex:api_key", "Codex: OpenAI API key"), ("gemini:api_key", "Gemini CLI: Gemini API key")]


@router.post("/dashboard/credentials/health", response_model=None)
async def credentials_health_refresh(request: Request) -> Response:
    """"Check now": read credential health, starting the workspace if it is stopped."""
    current = _require(request)
    form = await _form(request)
    try:
        _check_form_csrf(current[1], form)
        return _dashboard(request, current, refresh_health=True)
    except RemotecliError as exc:
        return _dashboard(request, current, error=exc.message, status_code=exc.http_status)


@router.post("/dashboard/credentials/keys", response_model=None)
async def credentials_key(request: Request) -> Response:
    """Sign a CLI in with a pasted key (the key is never echoed back, logged or kept)."""
    current = _require(request)
    form = await _form(request)
    provider, _, kind = form.get("provider_kind", "").partition(":")
    try:
        _check_form_csrf(current[1], form)
        key_signin.sign_in_with_key(_ctx(request), current[0], provider, kind, form.get("key", ""))
    except RemotecliError as exc:
        return _dashboard(request, current, error=exc.message, status_code=exc.http_status)
    return RedirectResponse("/dashboard?notice=key", status_code=303)


@router.get("/dashboard", response_model=None)
def dashboard(request: Request, notice: str = "") -> Response:
    current = _require(request)
    return _dashboard(request, current, notice=NOTICES.get(notice, ""))


@router.post("/dashboard/vms/{vm_id}/{action}", response_model=None)
async def vm_action(request: Request, vm_id: str, action: str) -> Response:
    current = _require(request)
    form = await _form(request)
    try:
        _check_form_csrf(current[1], form)
    except RemotecliError as exc:
        return _dashboard(request, current, error=exc.message, status_code=403)
    ctx = _ctx(request)
    principal = current[0]
    own = dashboard_service.own(principal)  # the dashboard acts on your own VMs only
    try:
        vm = vm_manager.get_vm(ctx, own, vm_id)
        if action not in views.vm_actions(vm.status, vm.vm_type):
            return _dashboard(request, current, error=f"You cannot {action} a VM that is "
                              f"{VM_STATUS_WORDS[VmStatus(vm.status)].lower()}.", status_code=409)
        if action in ("destroy", "rebuild") and form.get("confirm") != "yes":
            return _page(request, "confirm.html", {"vm": views.vm_row(vm), "action": action}, current=current)
        if action == "stop":
            vm_manager.stop_vm(ctx, own, vm_id)
        elif action == "resume":
            if vm.status == VmStatus.STOPPED.value:
                vm_manager.start_vm(ctx, own, vm_id)
            else:
                vm_manager.resume_vm(ctx, own, vm_id)
        elif action == "destroy":
            vm_manager.destroy_vm(ctx, own, vm_id, reason=f"removed by {principal.name} from the dashboard")
        elif action == "rebuild":
            vm_manager.rebuild_cli_vm(ctx, own, vm_id)  # as POST /api/v1/vms/{id}/rebuild: owner only
    except NotFound:
        return _dashboard(request, current, error="There is no such VM among yours.", status_code=404)
    except RemotecliError as exc:
        return _dashboard(request, current, error=exc.message, status_code=exc.http_status)
    return RedirectResponse(f"/dashboard?notice={action}", status_code=303)


# ----------------------------------------------------------------------------------------------
# Sign in to a CLI (noVNC)


@router.get("/dashboard/remote-cli/auth", response_model=None)
def auth_page(request: Request, session: str = "", provider: str = "") -> Response:
    current = _require(request)
    try:
        data = dashboard_service.sign_in_page(_ctx(request), current[0], session)
    except NotFound:
        return _error_page(request, current, "No such sign-in",
                           "This sign-in does not exist or is not yours. Start a new one.", 404)
    names = {p.name: p.display_name for p in data.providers}
    return _page(request, "auth.html", {
        "providers": data.providers, "preselect": provider if provider in names else "",
        "session_id": data.session.id if data.session else "", "live": data.live, "provider_names": names,
    }, current=current)


@router.get("/dashboard/remote-cli/auth/{session_id}/state", response_model=None)
def auth_state(request: Request, session_id: str) -> Response:
    """The sign-in page's poll: the session (as the API shows it, without a VNC ticket) and its steps."""
    current = _current(request)
    if current is None:
        return JSONResponse({"code": "authentication_required",
                             "message": "Your dashboard session has ended; sign in again."}, status_code=401)
    try:
        state = dashboard_service.sign_in_state(_ctx(request), current[0], session_id)
    except RemotecliError as exc:
        return JSONResponse(exc.to_dict(), status_code=exc.http_status)
    out = state.session
    steps = views.auth_steps(out.status, cli_ready=state.cli_ready, ended_from=state.ended_from,
                             browser_ready=state.browser_ready)
    expires = state.expires_at
    body = {
        "session": out.model_dump(mode="json"),
        "steps": [{"key": s.key, "label": s.label, "state": s.state} for s in steps],
        "terminal": state.terminal,
        "expires_in_s": max(0, int((expires - dt.datetime.now(dt.UTC)).total_seconds())) if expires else None,
        "credential_expires": views.utc(views.parse_time(out.credential.expires_at)) if out.credential else "",
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


# ----------------------------------------------------------------------------------------------
# Web terminal


@router.get("/dashboard/remote-cli/terminal", response_model=None)
def terminal_page(request: Request) -> Response:
    current = _require(request)
    words = views.terminal_words(dashboard_service.terminal_state(_ctx(request), current[0]))
    return _page(request, "terminal.html", {"words": words}, current=current)


@router.get("/dashboard/remote-cli/terminal/state", response_model=None)
def terminal_state(request: Request) -> Response:
    """The terminal page asks before each (re)connect what ``ensure`` will do, to say it in words:
    ``{"phase": "create" | "start" | "connect", "status": ..., "message": ..., "has_home": ...}``."""
    current = _current(request)
    if current is None:
        return JSONResponse({"code": "authentication_required",
                             "message": "Your dashboard session has ended; sign in again."}, status_code=401)
    state = dashboard_service.terminal_state(_ctx(request), current[0])
    words = views.terminal_words(state)
    return JSONResponse({"phase": words.phase, "status": words.status, "message": words.message,
                         "has_home": state.has_home}, headers={"Cache-Control": "no-store"})


# ----------------------------------------------------------------------------------------------
# Admin


def _require_admin(request: Request) -> tuple[Principal, str] | HTMLResponse:
    current = _require(request)
    if not current[0].is_admin:
        return _error_page(request, current, "Admins only",
                           "This page is for operators with the admin role.", 403)
    return current


@router.get("/admin", response_model=None)
def admin(request: Request, user: str = "", vm_type: str = "", status: str = "", provider: str = "",
          session_status: str = "", ended: str = "") -> Response:
    current = _require_admin(request)
    if isinstance(current, HTMLResponse):
        return current
    ctx = _ctx(request)
    filters = admin_service.AdminFilters(user=user, vm_type=vm_type, status=status, provider=provider,
                                         session_status=session_status, ended=ended)
    data = admin_service.overview(ctx, current[0], filters)
    return _page(request, "admin.html", {
        "vms": [views.vm_row(vm) for vm in data.vms], "sessions": data.sessions, "users": data.users,
        "names": data.names, "filters": filters, "capacity": data.capacity,
        "vm_statuses": [s.value for s in VmStatus], "auth_statuses": [s.value for s in AuthStatus],
        "providers": dashboard_service.provider_choices(ctx),
        "gc": admin_service.gc_preview(ctx, current[0], GarbageCollector(ctx)),
        "ago": views.ago, "utc": views.utc,
    }, current=current)


_Detail = TypeVar("_Detail", admin_service.SessionDetail, admin_service.VmDetail)


def _timeline_page(request: Request, load: Callable[[AppContext, Principal], _Detail],
                   fields: Callable[[_Detail], dict[str, Any]], missing: tuple[str, str]) -> Response:
    """An admin's page of one object and its timeline (``missing``: title and words for an unknown id)."""
    current = _require_admin(request)
    if isinstance(current, HTMLResponse):
        return current
    try:
        detail = load(_ctx(request), current[0])
    except NotFound:
        return _error_page(request, current, *missing, 404)
    return _page(request, "admin_timeline.html", {
        "owner": detail.owner, "rows": views.timeline(detail.events), "utc": views.utc, **fields(detail),
    }, current=current)


@router.get("/admin/sessions/{session_id}", response_model=None)
def admin_session(request: Request, session_id: str) -> Response:
    return _timeline_page(
        request, lambda ctx, who: admin_service.session_detail(ctx, who, session_id),
        lambda d: {"title": f"Sign-in {d.session.id}", "subject": d.session, "kind": "session"},
        ("No such session", "There is no sign-in session with that id."))


@router.get("/admin/vms/{vm_id}", response_model=None)
def admin_vm(request: Request, vm_id: str) -> Response:
    return _timeline_page(
        request, lambda ctx, who: admin_service.vm_detail(ctx, who, vm_id),
        lambda d: {"title": f"VM {d.vm.id}", "subject": d.vm, "kind": "vm", "vm": views.vm_row(d.vm)},
        ("No such VM", "There is no VM with that id."))
