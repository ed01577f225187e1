"""Suite-wide fixtures: a real PostgreSQL server (tests/pg.py), started once, on first use."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.pg import PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """The URL of an empty database of this test's own."""
    url = postgres.fresh_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def db_spec(request: pytest.FixtureRequest, tmp_path) -> str:
    """A `--db` value for each backend: a SQLite file path, or a PostgreSQL URL of a fresh database."""
    if request.param == "sqlite":
        return str(tmp_path / "control.db")
    return request.getfixturevalue("pg_url")
