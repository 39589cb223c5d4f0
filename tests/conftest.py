"""Shared fixtures: a fresh database on SQLite and, when configured, on PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from harmtrace.store import Database
from harmtrace.store.schema import metadata

POSTGRES_URL_ENV = "HARMTRACE_TEST_POSTGRES_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """URL of an empty database; the PostgreSQL case is skipped unless its URL is set."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'harmtrace.db'}"
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(
            f"PostgreSQL not configured: set {POSTGRES_URL_ENV}="
            "postgresql+psycopg://USER:PASSWORD@HOST/DB (an expendable database) to run"
        )
    db = Database(url)
    metadata.drop_all(db.engine)  # start every test from empty tables
    db.dispose()
    return url


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """A :class:`Database` with every table created and no rows."""
    db = Database(database_url)
    db.create_all()
    yield db
    db.dispose()
