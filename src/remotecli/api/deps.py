"""Request dependencies: the app context and the authenticated principal.

A request is authenticated by exactly one of:

- ``Authorization: Bearer <API token>`` (scripts, the CLI), or
- the dashboard's login-session cookie; then every state-changing request (not GET/HEAD/OPTIONS)
  must also carry the session's CSRF token in ``X-CSRF-Token`` (see ``remotecli.services.dashboard_sessions``).

A request that sends a bearer header is judged by it alone, never by a cookie it may also carry.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from remotecli.context import AppContext
from remotecli.errors import AuthenticationRequired
from remotecli.services.dashboard_sessions import (
    CSRF_HEADER,
    SAFE_METHODS,
    SESSION_COOKIE,
    authenticate_session,
    check_csrf,
)
from remotecli.services.users import Principal, authenticate_token


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


Ctx = Annotated[AppContext, Depends(get_ctx)]


def get_principal(request: Request, ctx: Ctx) -> Principal:
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationRequired()
        return authenticate_token(ctx.db, token.strip())
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        principal = authenticate_session(ctx.db, cookie)
        if request.method.upper() not in SAFE_METHODS:
            check_csrf(cookie, request.headers.get(CSRF_HEADER))
        return principal
    raise AuthenticationRequired()


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
