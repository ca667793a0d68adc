"""Dashboard login sessions and CSRF tokens.

A login session is a random token in an HttpOnly cookie. The server keeps only its SHA-256 (a row
of ``api_tokens`` named ``dashboard session``, with an expiry, revoked on logout), so a session can
be listed and revoked like any other credential, and no new table is needed. Session tokens carry
their own prefix (``rcls_``): ``authenticate_token`` refuses them as bearer tokens, and a bearer
token is refused as a session.

The CSRF token of a session is ``HMAC-SHA256(session token, "remotecli-csrf")``: unguessable
without the cookie, stable for the session's life, and it reveals nothing about the cookie. Forms
send it as ``csrf_token``; scripts send it as the ``X-CSRF-Token`` header. The login form, which
has no session yet, uses a double-submit cookie instead.

Both front doors honour these sessions (the dashboard's pages, and the REST API for the pages'
scripts), so the session and its transport names (cookie, header, form field) live here, below
both; ``web`` only sets and clears the cookies.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import uuid

from sqlalchemy import select, update

from remotecli.db.models import ApiToken, User, UserIdentity, utcnow
from remotecli.db.session import Database
from remotecli.errors import AuthenticationRequired, PermissionDenied
from remotecli.services.transitions import record_event
from remotecli.services.users import DASHBOARD_SESSION_NAME, Principal, hash_token

SESSION_PREFIX = "rcls_"
SESSION_NAME = DASHBOARD_SESSION_NAME
SESSION_COOKIE = "rcli_session"
LOGIN_CSRF_COOKIE = "rcli_login_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SESSION_TTL = dt.timedelta(hours=12)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class CsrfFailed(PermissionDenied):
    code = "csrf_failed"
    default_message = "This page's security token is missing or out of date; reload the page and try again."


def csrf_for(session_token: str) -> str:
    return hmac.new(session_token.encode(), b"remotecli-csrf", hashlib.sha256).hexdigest()


def check_csrf(session_token: str, presented: str | None) -> None:
    if not presented or not hmac.compare_digest(csrf_for(session_token), presented):
        raise CsrfFailed()


def create_session(db: Database, principal: Principal, *, client: str = "",
                   method: str = "password") -> tuple[str, dt.datetime]:
    """Start a login session; returns the cookie value (shown to nobody else) and its expiry.
    ``method`` (``password`` or ``oidc``) goes into the sign-in event."""
    token = SESSION_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    expires = now + SESSION_TTL
    with db.transaction() as session:
        session.add(ApiToken(
            id=str(uuid.uuid4()), user_id=principal.user_id, name=SESSION_NAME, token_hash=hash_token(token),
            prefix=token[: len(SESSION_PREFIX) + 4], created_at=now, expires_at=expires, last_used_at=now,
        ))
        how = " with single sign-on" if method == "oidc" else ""
        details = {"method": method, **({"client": client[:64]} if client else {})}
        record_event(session, module="dashboard", kind="user.login", message=f"{principal.name} signed in{how}",
                     user_id=principal.user_id, details=details)
    return token, expires


def authenticate_session(db: Database, token: str) -> Principal:
    """The principal of a live login session; ``AuthenticationRequired`` otherwise."""
    expired = AuthenticationRequired("Your dashboard session has ended; sign in again.")
    if not token.startswith(SESSION_PREFIX):
        raise expired
    now = utcnow()
    with db.read() as session:
        row = session.execute(
            select(ApiToken, User).join(User, User.id == ApiToken.user_id)
            .where(ApiToken.token_hash == hash_token(token), ApiToken.name == SESSION_NAME)
        ).one_or_none()
    if row is None:
        raise expired
    api_token, user = row
    if api_token.revoked_at is not None or (api_token.expires_at is not None and api_token.expires_at <= now):
        raise expired
    if user.disabled:
        raise expired
    if not user.password_hash:
        # Without a password, only a linked single sign-on identity keeps a session alive.
        with db.read() as session:
            linked = session.scalar(select(UserIdentity.id).where(UserIdentity.user_id == user.id).limit(1))
        if linked is None:
            raise expired
    if api_token.last_used_at is None or now - api_token.last_used_at > dt.timedelta(minutes=1):
        with db.transaction() as session:
            session.execute(update(ApiToken).where(ApiToken.id == api_token.id).values(last_used_at=now))
    return Principal(user_id=user.id, name=user.name, is_admin=user.is_admin)


def end_session(db: Database, token: str) -> None:
    """Revoke a login session (logout). Unknown or already-ended sessions are fine."""
    if not token.startswith(SESSION_PREFIX):
        return
    now = utcnow()
    with db.transaction() as session:
        row = session.scalars(
            select(ApiToken).where(ApiToken.token_hash == hash_token(token), ApiToken.name == SESSION_NAME,
                                   ApiToken.revoked_at.is_(None))
        ).one_or_none()
        if row is None:
            return
        row.revoked_at = now
        record_event(session, module="dashboard", kind="user.logout", message="Signed out", user_id=row.user_id)


def new_login_csrf() -> str:
    """A value for the login form's double-submit cookie and hidden field."""
    return secrets.token_urlsafe(24)


def login_csrf_ok(cookie: str, field: str) -> bool:
    return bool(cookie) and bool(field) and hmac.compare_digest(cookie, field)
