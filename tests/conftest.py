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


_template: dict[str, str] = {}


def _migrated_template(base_url: str) -> str:
    """A database migrated to head once per test run; tests copy it (much faster than migrating)."""
    if "name" not in _template:
        url, name = _create_pg_database(base_url)
        template_db = Database(url)
        template_db.migrate()
        template_db.dispose()
        _template["name"] = name
    return _template["name"]


def _create_pg_database(base_url: str, template: str | None = None) -> tuple[str, str]:
    name = f"rcli_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalize_url(base_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        suffix = f' TEMPLATE "{template}"' if template else ""
        connection.execute(text(f'CREATE DATABASE "{name}"{suffix}'))
    admin.dispose()
    url = make_url(normalize_url(base_url)).set(database=name)
    return url.render_as_string(hide_password=False), name


def _drop_pg_database(base_url: str, name: str) -> None:
    admin = create_engine(normalize_url(base_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _database(kind: str, tmp_path: Path, *, migrated: bool) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    if not POSTGRES_URL:
        if REQUIRE_POSTGRES:
            pytest.fail("REMOTECLI_REQUIRE_POSTGRES=1 but REMOTECLI_TEST_POSTGRES_URL is not set")
        pytest.skip("no PostgreSQL server (set REMOTECLI_TEST_POSTGRES_URL)")
    template = _migrated_template(POSTGRES_URL) if migrated else None
    url, name = _create_pg_database(POSTGRES_URL, template)
    try:
        yield url
    finally:
        _drop_pg_database(POSTGRES_URL, name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database of each kind (PostgreSQL ones come migrated from a template)."""
    yield from _database(request.param, tmp_path, migrated=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind (for migration tests)."""
    yield from _database(request.param, tmp_path, migrated=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if POSTGRES_URL and "name" in _template:
        _drop_pg_database(POSTGRES_URL, _template.pop("name"))


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        driver="fake",
        vm_boot_timeout_s=10,
        browser_pool_size=0,  # the warm pool's tests turn it on (tests/unit/test_pool.py)
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
