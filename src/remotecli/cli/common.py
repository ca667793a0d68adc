"""Helpers shared by the ``remotecli`` commands: context, errors, tables, JSON.

The ``remotecli`` command: operate the controller from its host.

The CLI talks to the database and the drivers directly (it is the operator's tool on the host);
users reach the controller through the REST API and the dashboard. Errors print their message in
words and exit with status 1 (bad input: 2).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.errors import InvalidInput, RemotecliError
from remotecli.logging import configure_logging

F = TypeVar("F", bound=Callable[..., Any])


def settings_from_env() -> Settings:
    """The settings, or ``InvalidInput`` naming each bad setting in words (never its value)."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            (f"{'.'.join(str(part) for part in error['loc'])}: " if error["loc"] else "")
            + error["msg"].removeprefix("Value error, ")
            for error in exc.errors(include_input=False, include_url=False)
        )
        raise InvalidInput(f"The configuration is not valid: {problems}") from None


@contextmanager
def app_context(*, quiet_logs: bool = True) -> Iterator[AppContext]:
    settings = settings_from_env()
    settings.ensure_dirs()
    # Commands log to the file; stderr stays for messages meant for the operator.
    configure_logging(settings.log_level if not quiet_logs else "WARNING",
                      settings.logs_dir / "controller.log", stderr=False)
    ctx = AppContext.create(settings)
    try:
        yield ctx
    finally:
        ctx.close()


def fail(exc: RemotecliError) -> None:
    click.secho(f"error: {exc.message}", fg="red", err=True)
    click.echo(f"(code: {exc.code})", err=True)
    sys.exit(2 if isinstance(exc, InvalidInput) else 1)


def handle_errors(func: F) -> F:
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RemotecliError as exc:
            fail(exc)

    return wrapper  # type: ignore[return-value]


def fmt_time(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def age(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    seconds = int((dt.datetime.now(dt.UTC) - value).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) for i in range(len(headers))]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default))


