"""Database fixtures for service tests: each runs on SQLite and on PostgreSQL, both built by the migrations."""

from __future__ import annotations

import pytest

from app.core.db import Database


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Database:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    database = Database(url)
    yield database
    database.dispose()
