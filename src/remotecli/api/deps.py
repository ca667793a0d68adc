"""Request dependencies: the app context and the authenticated principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from remotecli.context import AppContext
from remotecli.errors import AuthenticationRequired
from remotecli.services.users import Principal, authenticate_token


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


Ctx = Annotated[AppContext, Depends(get_ctx)]


def get_principal(request: Request, ctx: Ctx) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationRequired()
    return authenticate_token(ctx.db, token.strip())


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
