"""Migrations: upgrade from empty to head, and the models match the migrated schema."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from remotecli.db.models import Base
from remotecli.db.session import Database


def test_upgrade_from_empty_to_head_matches_models(empty_db_url: str) -> None:
    db = Database(empty_db_url)
    try:
        assert db.current_revision() is None
        db.migrate()
        assert db.current_revision() == db.head_revision()
        with db.engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
            assert diff == [], diff
            tables = set(inspect(connection).get_table_names())
        assert {"users", "api_tokens", "vms", "auth_sessions", "events"} <= tables
        db.migrate()  # a second run is a no-op
        assert db.current_revision() == db.head_revision()
    finally:
        db.dispose()


def test_partial_unique_index_exists(empty_db_url: str) -> None:
    db = Database(empty_db_url)
    try:
        db.migrate()
        with db.engine.connect() as connection:
            indexes = {ix["name"]: ix for ix in inspect(connection).get_indexes("vms")}
        assert indexes["uq_vms_one_live_cli_per_user"]["unique"]
    finally:
        db.dispose()
