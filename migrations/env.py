"""Alembic environment for wrenn-engine.

``wrenn_engine.store.migrate`` builds the Alembic config in code and passes
the database either as ``config.attributes["url"]`` or as an open
``config.attributes["connection"]``; the ``sqlalchemy.url`` main option is
the fallback for developers who run ``alembic`` by hand.

Migrations run in one transaction per run on both backends. Concurrent
upgrades of the same database (two processes opening a fresh embedded
database) are serialized before Alembic reads the current revision: SQLite
by ``BEGIN IMMEDIATE`` (the engine from ``create_sql_engine``), PostgreSQL by
a transaction-level advisory lock. The loser then finds the schema current
and does nothing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context
from sqlalchemy.pool import NullPool

from wrenn_engine.store.schema import VERSION_TABLE, metadata
from wrenn_engine.store.sql import MIGRATION_LOCK_KEY, create_sql_engine

config = context.config


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: set attributes['url'] or sqlalchemy.url")
    return str(url)


def run_offline() -> None:
    """Write the SQL to stdout (``alembic upgrade head --sql``)."""
    context.configure(
        url=_url(),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"),
                {"key": MIGRATION_LOCK_KEY},
            )
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return

    engine = create_sql_engine(_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
