"""Shared fixtures: a fresh database on SQLite (and PostgreSQL when configured), and one
finished pipeline run on the synthetic scenario that the pipeline and CLI tests share."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harmtrace.scenario.offensive_tweets import Scenario
from harmtrace.scenario.synthetic import build_synthetic
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


@dataclass(frozen=True)
class FinishedRun:
    """A workspace in which ``harmtrace run`` finished, and the config tables it ran."""

    config: Path
    workspace: Path
    tables: dict
    stderr: str


@pytest.fixture(scope="session")
def synthetic_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """The generated offensive-tweets scenario (seed 0), written once per session."""
    return build_synthetic(tmp_path_factory.mktemp("scenario"))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory,
                 synthetic_scenario: Scenario) -> FinishedRun:
    """``harmtrace run`` on the tiny config, once per session; copy it before changing it."""
    # Imported here: helpers loads torch, which the store and ledger tests do not need.
    from helpers import run_cli, tiny_pipeline_tables, toml_text

    root = tmp_path_factory.mktemp("run")
    tables = tiny_pipeline_tables(synthetic_scenario, root / "ws")
    config = root / "config.toml"
    config.write_text(toml_text(tables), encoding="utf-8")
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr
    return FinishedRun(config, root / "ws", tables, result.stderr)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for the test: many tiny models gain nothing from more threads
    on a shared machine, only contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
