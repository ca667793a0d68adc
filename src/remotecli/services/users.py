"""Users, API tokens and the principal a request acts as."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from remotecli.db.models import ApiToken, User, utcnow
from remotecli.db.session import Database
from remotecli.errors import AlreadyExists, AuthenticationRequired, InvalidInput, NotFound, UserNotFound
from remotecli.services.transitions import record_event

TOKEN_PREFIX = "rcli_"
#: ``api_tokens.name`` of dashboard login sessions (see ``remotecli.services.dashboard_sessions``).
DASHBOARD_SESSION_NAME = "dashboard session"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Principal:
    """Who a request acts as."""

    user_id: str
    name: str
    is_admin: bool


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(db: Database, name: str, *, is_admin: bool = False) -> User:
    if not _NAME_RE.match(name):
        raise InvalidInput("A user name is 1-64 characters: lower-case letters, digits, '.', '_' or '-'.")
    user = User(id=str(uuid.uuid4()), name=name, is_admin=is_admin, created_at=utcnow())
    try:
        with db.transaction() as session:
            session.add(user)
            session.flush()
            record_event(session, module="users", kind="user.created", message=f"User {name} created",
                         user_id=user.id, details={"admin": is_admin})
    except IntegrityError:
        raise AlreadyExists(f"A user named {name!r} already exists.") from None
    return user


def get_user_by_name(db: Database, name: str) -> User:
    with db.read() as session:
        user = session.scalars(select(User).where(User.name == name)).one_or_none()
    if user is None:
        raise UserNotFound(f"No user named {name!r}; create one with 'remotecli users create {name}'.")
    return user


def list_users(db: Database) -> list[User]:
    with db.read() as session:
        return list(session.scalars(select(User).order_by(User.created_at)))


def create_token(db: Database, user: User, *, name: str = "", ttl: dt.timedelta | None = None) -> tuple[ApiToken, str]:
    """Create an API token; returns the row and the token itself, which is shown only once."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        id=str(uuid.uuid4()),
        user_id=user.id,
        name=name,
        token_hash=hash_token(token),
        prefix=token[: len(TOKEN_PREFIX) + 4],
        created_at=utcnow(),
        expires_at=utcnow() + ttl if ttl else None,
    )
    with db.transaction() as session:
        session.add(row)
        record_event(session, module="users", kind="token.created", message=f"API token {row.prefix}… created",
                     user_id=user.id)
    return row, token


def authenticate_token(db: Database, token: str) -> Principal:
    """The principal for a bearer token; ``AuthenticationRequired`` for unknown, expired or revoked ones."""
    if not token.startswith(TOKEN_PREFIX):
        raise AuthenticationRequired("That API token is not valid.")
    digest = hash_token(token)
    now = utcnow()
    with db.read() as session:
        row = session.execute(
            select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(ApiToken.token_hash == digest)
        ).one_or_none()
    if row is None:
        raise AuthenticationRequired("That API token is not valid.")
    api_token, user = row
    if api_token.revoked_at is not None:
        raise AuthenticationRequired("That API token was revoked; create a new one.")
    if api_token.expires_at is not None and api_token.expires_at <= now:
        raise AuthenticationRequired("That API token has expired; create a new one.")
    if user.disabled:
        raise AuthenticationRequired("This account is disabled.")
    # Write last_used_at at most once a minute: a write per request would serialize reads on SQLite.
    if api_token.last_used_at is None or now - api_token.last_used_at > dt.timedelta(minutes=1):
        with db.transaction() as session:
            session.execute(update(ApiToken).where(ApiToken.id == api_token.id).values(last_used_at=now))
    return Principal(user_id=user.id, name=user.name, is_admin=user.is_admin)


# ----------------------------------------------------------------------------------------------
# Dashboard passwords (Argon2id; argon2-cffi's defaults follow RFC 9106's second recommendation)

MIN_PASSWORD_LENGTH = 10
_hasher = PasswordHasher()
# Verified against when the user does not exist or has no password, so that a wrong name costs
# as much time as a wrong password (no user enumeration by timing).
@functools.cache
def _dummy_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(16))


def set_password(db: Database, name: str, password: str) -> User:
    """Set (or replace) the dashboard password of user ``name``; stored only as an Argon2id hash."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"A password needs at least {MIN_PASSWORD_LENGTH} characters.")
    if len(password) > 1024:
        raise InvalidInput("A password has at most 1024 characters.")
    user = get_user_by_name(db, name)
    digest = _hasher.hash(password)
    with db.transaction() as session:
        session.execute(update(User).where(User.id == user.id).values(password_hash=digest))
        # A new password ends every dashboard session signed in with the old one.
        session.execute(update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.name == DASHBOARD_SESSION_NAME,
                                               ApiToken.revoked_at.is_(None)).values(revoked_at=utcnow()))
        record_event(session, module="users", kind="user.password_set", message=f"Password of {name} set",
                     user_id=user.id)
    user.password_hash = digest
    return user


def verify_password(db: Database, name: str, password: str) -> Principal:
    """The principal for a dashboard login; ``AuthenticationRequired`` (one message for every
    reason: unknown user, no password, wrong password, disabled) otherwise."""
    failed = AuthenticationRequired("That user name and password do not match.")
    with db.read() as session:
        user = session.scalars(select(User).where(User.name == name.strip().lower())).one_or_none()
    stored = user.password_hash if user is not None and user.password_hash else None
    try:
        _hasher.verify(stored or _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        raise failed from None
    if user is None or stored is None or user.disabled:
        raise failed
    if _hasher.check_needs_rehash(stored):
        with db.transaction() as session:
            session.execute(update(User).where(User.id == user.id, User.password_hash == stored)
                            .values(password_hash=_hasher.hash(password)))
    return Principal(user_id=user.id, name=user.name, is_admin=user.is_admin)


def is_active(db: Database, user_id: str) -> bool:
    """Does user ``user_id`` still exist, not disabled? (Open websockets ask this now and then.)"""
    with db.read() as session:
        user = session.get(User, user_id)
    return user is not None and not user.disabled


def set_disabled(db: Database, name: str, disabled: bool) -> User:
    """Disable (or enable again) user ``name``: a disabled user's API tokens, dashboard sessions and
    single sign-ons are refused at once; nothing is deleted."""
    user = get_user_by_name(db, name)
    if user.disabled != disabled:
        with db.transaction() as session:
            session.execute(update(User).where(User.id == user.id).values(disabled=disabled))
            record_event(session, module="users", kind="user.disabled" if disabled else "user.enabled",
                         message=f"User {name} {'disabled' if disabled else 'enabled'}", user_id=user.id)
        user.disabled = disabled
    return user


def list_tokens(db: Database, user: User | None = None) -> list[tuple[ApiToken, str]]:
    """API tokens (newest first) with their owner's name; never the token itself."""
    stmt = select(ApiToken, User.name).join(User, User.id == ApiToken.user_id).order_by(ApiToken.created_at.desc())
    if user is not None:
        stmt = stmt.where(ApiToken.user_id == user.id)
    with db.read() as session:
        return [(token, name) for token, name in session.execute(stmt)]


def revoke_token(db: Database, token_id: str) -> ApiToken:
    """Revoke a token by id (or by its unique id prefix); later requests with it get 401."""
    with db.transaction() as session:
        matches = list(session.scalars(select(ApiToken).where(ApiToken.id.startswith(token_id))))
        if len(matches) != 1:
            raise NotFound(
                "No API token with that id." if not matches else "That id prefix matches several tokens; give more."
            )
        token = matches[0]
        if token.revoked_at is None:
            token.revoked_at = utcnow()
            record_event(session, module="users", kind="token.revoked", message=f"API token {token.prefix}… revoked",
                         user_id=token.user_id)
        return token
