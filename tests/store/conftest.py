"""Fixtures for the store tests: a store on each backend, and a plain engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from wrenn_engine.store import SqlEventStore, open_store


@pytest.fixture
def store(db_url: str) -> Iterator[SqlEventStore]:
    """A store on a fresh database (SQLite file or PostgreSQL), at head."""
    opened = open_store(db_url, auto_upgrade=True)
    assert isinstance(opened, SqlEventStore)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def raw(db_url: str) -> Iterator[sa.Engine]:
    """A plain SQLAlchemy engine on the same database, for looking behind
    the store's back (tampering, old-shape rows, schema inspection)."""
    engine = sa.create_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()
