"""Shared fixtures. Database tests run on SQLite always and on PostgreSQL when
``REMOTECLI_TEST_POSTGRES_URL`` names a server (CI starts one; see scripts/start-postgres.sh).
Set ``REMOTECLI_REQUIRE_POSTGRES=1`` (CI does) to make a missing server an error, not a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.crypto import SecretBox
from remotecli.db.session import Database, normalize_url
from remotecli.drivers.fake import FakeDriver

POSTGRES_URL = os.environ.get("REMOTECLI_TEST_POSTGRES_URL")
REQUIRE_POSTGRES = os.environ.get("REMOTECLI_REQUIRE_POSTGRES") == "1"


def _create_pg_database(base_url: str) -> tuple[str, str]:
    name = f"rcli_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalize_url(base_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(normalize_url(base_url)).set(database=name)
    return url.render_as_string(hide_password=False), name


def _drop_pg_database(base_url: str, name: str) -> None:
    admin = create_engine(normalize_url(base_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    if not POSTGRES_URL:
        if REQUIRE_POSTGRES:
            pytest.fail("REMOTECLI_REQUIRE_POSTGRES=1 but REMOTECLI_TEST_POSTGRES_URL is not set")
        pytest.skip("no PostgreSQL server (set REMOTECLI_TEST_POSTGRES_URL)")
    url, name = _create_pg_database(POSTGRES_URL)
    try:
        yield url
    finally:
        _drop_pg_database(POSTGRES_URL, name)


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        driver="fake",
        vm_boot_timeout_s=10,
    )


@pytest.fixture
def fake_driver() -> FakeDriver:
    return FakeDriver()


@pytest.fixture
def ctx(settings: Settings, fake_driver: FakeDriver) -> Iterator[AppContext]:
    context = AppContext.create(settings, driver=fake_driver)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def db(ctx: AppContext) -> Database:
    return ctx.db


@pytest.fixture
def box(tmp_path: Path) -> SecretBox:
    return SecretBox.from_key_file(tmp_path / "key")
