"""The migrations build exactly the schema the models declare, on SQLite and PostgreSQL, and go back down."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from app.core.migrate import alembic_config, upgrade
from app.models import Base


def _diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()


def test_one_head() -> None:
    assert len(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()) == 1


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_migrations_match_the_models_and_downgrade(db: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}" if db == "sqlite" else request.getfixturevalue("pg_url")
    if db == "sqlite":
        upgrade(url)
    assert _diff(url) == []
    engine = create_engine(url)
    try:
        assert {"upload_sessions", "upload_files"} <= set(inspect(engine).get_table_names())
        command.downgrade(alembic_config(url), "0001")
        assert not {"upload_sessions", "upload_files"} & set(inspect(engine).get_table_names())
        upgrade(url)
        assert _diff(url) == []
    finally:
        engine.dispose()
