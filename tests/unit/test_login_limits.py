"""Password sign-in limits per account and per address (services/login_limits.py), on both databases."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select

from remotecli.background.gc import GarbageCollector
from remotecli.context import AppContext
from remotecli.db.models import LoginFailure
from remotecli.errors import TooManyLoginAttempts
from remotecli.services import login_limits


def _rows(ctx: AppContext) -> int:
    with ctx.db.read() as session:
        return int(session.scalar(select(func.count()).select_from(LoginFailure)) or 0)


def test_account_locks_after_the_limit_from_any_address(ctx: AppContext) -> None:
    limit = ctx.settings.max_login_attempts_per_15min
    for attempt in range(limit):
        login_limits.check(ctx.db, ctx.settings, "alice", f"10.0.0.{attempt}")
        login_limits.record_failure(ctx.db, "alice", f"10.0.0.{attempt}")
    with pytest.raises(TooManyLoginAttempts) as refused:
        login_limits.check(ctx.db, ctx.settings, "Alice ", "10.9.9.9")  # same account, new address
    assert refused.value.http_status == 429 and refused.value.code == "too_many_login_attempts"
    assert "alice" not in refused.value.message  # the message names no account
    before = _rows(ctx)
    with pytest.raises(TooManyLoginAttempts):
        login_limits.check(ctx.db, ctx.settings, "alice", "10.9.9.9")
    assert _rows(ctx) == before  # a refusal is not counted and changes nothing
    login_limits.check(ctx.db, ctx.settings, "bob", "10.9.9.9")  # other accounts are unaffected


def test_address_locks_across_accounts_and_success_does_not_reset_it(ctx: AppContext) -> None:
    limit = ctx.settings.max_login_attempts_per_15min
    for attempt in range(limit):
        login_limits.record_failure(ctx.db, f"user{attempt}", "192.0.2.7")
    login_limits.record_success(ctx.db, "user0")  # one valid account does not clear the address
    with pytest.raises(TooManyLoginAttempts) as refused:
        login_limits.check(ctx.db, ctx.settings, "someone-new", "192.0.2.7")
    assert refused.value.context["scope"] == "address"
    login_limits.check(ctx.db, ctx.settings, "someone-new", "192.0.2.8")


def test_success_clears_the_accounts_failures(ctx: AppContext) -> None:
    limit = ctx.settings.max_login_attempts_per_15min
    for attempt in range(limit - 1):
        login_limits.record_failure(ctx.db, "carol", f"198.51.100.{attempt}")
    login_limits.record_success(ctx.db, "carol")
    for attempt in range(limit - 1):
        login_limits.record_failure(ctx.db, "carol", f"203.0.113.{attempt}")
    login_limits.check(ctx.db, ctx.settings, "carol", "203.0.113.200")


def test_old_failures_expire_and_the_gc_purges_them(ctx: AppContext) -> None:
    limit = ctx.settings.max_login_attempts_per_15min
    for _ in range(limit):
        login_limits.record_failure(ctx.db, "dave", "192.0.2.50")
    with ctx.db.transaction() as session:
        for row in session.scalars(select(LoginFailure)):
            row.at = row.at - login_limits.WINDOW - dt.timedelta(seconds=1)
    login_limits.check(ctx.db, ctx.settings, "dave", "192.0.2.50")  # outside the window
    report = GarbageCollector(ctx).run_once()
    assert any(f.kind == "login_failures" and f.result == "done" for f in report.findings)
    assert _rows(ctx) == 0
