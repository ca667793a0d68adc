"""Password sign-in limits: failed attempts counted per account and per client address.

Failures live in the database (``login_failures``), so the limit holds across controller restarts
and across several controllers behind one load balancer. A sign-in is refused with
:class:`~remotecli.errors.TooManyLoginAttempts` (429 ``too_many_login_attempts``) once either the
account or the address has ``max_login_attempts_per_15min`` failures in the last 15 minutes;
the refusal itself is not counted (it would extend a lock-out forever).

A success clears the *account's* failures, not the address's: otherwise one valid account would
let an address reset its counter and go on guessing other accounts' passwords. The client address
is the socket's peer, or the ``X-Forwarded-For`` of a configured trusted proxy (uvicorn applies
``trusted_proxies``), never a header from anyone else. Old rows are purged by the GC.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, func, select

from remotecli.config import Settings
from remotecli.db.models import LoginFailure, utcnow
from remotecli.db.session import Database
from remotecli.errors import TooManyLoginAttempts

WINDOW = dt.timedelta(minutes=15)


def _keys(account: str, address: str) -> list[str]:
    keys = [f"account:{account.strip().lower()[:200]}"]
    if address:
        keys.append(f"address:{address[:64]}")
    return keys


def check(db: Database, settings: Settings, account: str, address: str) -> None:
    """Raise TooManyLoginAttempts when the account or the address is over the limit."""
    since = utcnow() - WINDOW
    limit = settings.max_login_attempts_per_15min
    with db.read() as session:
        for key in _keys(account, address):
            failures = session.scalar(
                select(func.count()).select_from(LoginFailure).where(LoginFailure.key == key, LoginFailure.at >= since)
            )
            if int(failures or 0) >= limit:
                scope = key.split(":", 1)[0]
                raise TooManyLoginAttempts(log_detail=f"{scope} over {limit} failures in 15 min", scope=scope)


def record_failure(db: Database, account: str, address: str) -> None:
    now = utcnow()
    with db.transaction() as session:
        for key in _keys(account, address):
            session.add(LoginFailure(key=key, at=now))


def record_success(db: Database, account: str) -> None:
    with db.transaction() as session:
        session.execute(delete(LoginFailure).where(LoginFailure.key == _keys(account, "")[0]))


def purge_old(db: Database) -> int:
    """Delete failures older than the window. Returns how many rows went."""
    with db.transaction() as session:
        result = session.execute(delete(LoginFailure).where(LoginFailure.at < utcnow() - WINDOW))
        return int(getattr(result, "rowcount", 0) or 0)
