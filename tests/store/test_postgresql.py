"""What only PostgreSQL does: its server can drop the store's connections.

Appends use pooled connections of their own, checked at checkout without a
round trip; a connection the server closed must be replaced, not fail the
append.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import closing

import psycopg
import pytest
import sqlalchemy as sa

from tests.store.builders import completed, meta, new_sandbox, started
from wrenn_engine.store import SqlEventStore, open_store


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[SqlEventStore]:
    opened = open_store(pg_url, auto_upgrade=True)
    assert isinstance(opened, SqlEventStore)
    with closing(opened):
        yield opened


def _terminate_other_backends(url: str) -> int:
    """Terminate every other session on the test database; wait until gone."""
    params = sa.engine.make_url(url).translate_connect_args(username="user")
    params["dbname"] = params.pop("database")
    with psycopg.connect(**params, autocommit=True) as admin:
        others = (
            "FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
        row = admin.execute(f"SELECT count(pg_terminate_backend(pid)) {others}")
        terminated = int(row.fetchone()[0])  # type: ignore[index]
        deadline = time.monotonic() + 10
        while admin.execute(f"SELECT count(*) {others}").fetchone() != (0,):
            assert time.monotonic() < deadline, "sessions outlived their termination"
            time.sleep(0.02)
    return terminated


def test_appends_survive_the_server_dropping_their_connections(
    pg_store: SqlEventStore,
    pg_url: str,
) -> None:
    new_sandbox(pg_store, "sb1")
    pg_store.append("sb1", [started()], expected_version=1, metadata=meta())

    assert _terminate_other_backends(pg_url) >= 1
    pg_store.append("sb1", [completed()], expected_version=2, metadata=meta())

    assert [e.version for e in pg_store.read_stream("sb1")] == [1, 2, 3]
    sb1 = pg_store.get_sandbox("sb1")
    assert sb1 is not None and sb1.state == "running"
    assert pg_store.verify_projections() == []
