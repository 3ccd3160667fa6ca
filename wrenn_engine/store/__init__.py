"""The event store: append-only sandbox histories and their projections.

``open_store()`` is the way in::

    from wrenn_engine.store import open_store

    store = open_store()                       # the embedded SQLite default
    store = open_store("postgresql+psycopg://engine@db/wrenn")

The contract is ``EventStore`` (``base.py``); ``SqlEventStore`` implements it
on SQLite and PostgreSQL (``sql.py``); Alembic owns the schema
(``migrate.py`` and the top-level ``migrations/``).
"""

from __future__ import annotations

import logging
import os

from wrenn_engine import settings
from wrenn_engine.errors import SchemaError
from wrenn_engine.store.base import (
    AppendResult,
    CommandRecord,
    EventQuery,
    EventStore,
    HeldResource,
    ProjectionDifference,
    StoreStats,
)
from wrenn_engine.store.migrate import (
    check_schema,
    current_revision,
    head_revision,
    revision_of,
    upgrade,
    upgrade_connection,
)
from wrenn_engine.store.sql import (
    SqlEventStore,
    config_summary,
    is_memory_url,
    safe_url,
)

__all__ = [
    "AppendResult",
    "CommandRecord",
    "EventQuery",
    "EventStore",
    "HeldResource",
    "ProjectionDifference",
    "SqlEventStore",
    "StoreStats",
    "check_schema",
    "config_summary",
    "open_store",
]

logger = logging.getLogger(__name__)


def open_store(
    url: str | None = None, *, auto_upgrade: bool | None = None
) -> EventStore:
    """Open the event store at ``url`` with its schema at the head revision.

    ``url`` None means ``settings.default_db_url()``: ``$WRENN_ENGINE_DB`` if
    set, else the embedded SQLite file in the state directory. The embedded
    default creates its directory (mode 0700) and upgrades its own schema.
    Any other database whose schema is behind raises SchemaError naming
    ``wrenn-engine --db URL db upgrade``, unless ``auto_upgrade=True``;
    ``auto_upgrade=False`` never upgrades, not even the embedded default.
    An in-memory SQLite database (``sqlite://``) is always upgraded unless
    ``auto_upgrade=False``.
    """
    embedded = url is None and not os.environ.get("WRENN_ENGINE_DB")
    if url is None:
        url = settings.default_db_url()
    if auto_upgrade is None:
        # A fresh in-memory database can only be brought up from here.
        auto_upgrade = embedded or is_memory_url(url)
    if embedded:
        settings.state_dir().mkdir(mode=0o700, parents=True, exist_ok=True)

    store = SqlEventStore(url)
    try:
        _ensure_schema(store, url, auto_upgrade)
    except BaseException:
        store.close()
        raise
    return store


def _ensure_schema(store: SqlEventStore, url: str, auto_upgrade: bool) -> None:
    if store.is_memory:
        # One shared connection: migrate through it, or the schema would be
        # made in another, private, in-memory database.
        with store.engine.connect() as conn:
            if auto_upgrade:
                upgrade_connection(conn)
            current = revision_of(conn)
        head = head_revision()
        if current != head:
            raise SchemaError(safe_url(url), current, head)
        return

    current = current_revision(url)
    head = head_revision()
    if current == head:
        return
    if not auto_upgrade:
        raise SchemaError(safe_url(url), current, head)
    logger.info(
        "database %s is at %s; upgrading to %s",
        safe_url(url),
        current or "no schema",
        head,
    )
    upgrade(url)
