"""The store's tables as SQLAlchemy Core objects, for building queries.

Alembic owns the DDL (``migrations/versions``); these definitions mirror the
head revision so that queries are typed, and a test compares them with a
migrated database on both backends so the two cannot drift apart.

Tables:

- ``events``: the append-only log. ``position`` is the global order of
  truth; ``(stream_id, version)`` is unique.
- ``commands``: command ids (idempotency keys) and the append each produced.
- ``sandboxes``: one row per stream, the fold of its events (``snapshot`` is
  ``SandboxState.to_dict()``).
- ``network_slots``: ``(host_id, slot)`` held by a sandbox; the primary key
  makes a slot unique per host.
- ``resources``: every host resource the log says a sandbox holds.
- ``log_marks``: named positions in the log (revision 0003); see
  ``TIMES_ORDERED_AFTER``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

#: Alembic's bookkeeping table; named for this product so that a PostgreSQL
#: database shared with other Alembic users keeps the histories apart.
VERSION_TABLE = "wrenn_engine_version"


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A point in time stored in UTC and always read back timezone-aware UTC.

    PostgreSQL stores ``timestamptz``. SQLite stores a naive ISO string in
    UTC (``2024-05-01 12:00:00.000000``), which sorts and compares as text in
    time order. Naive datetimes are refused: their zone would be a guess.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: give a timezone")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


#: JSON everywhere, JSONB on PostgreSQL.
JSONType: sa.types.TypeEngine[Any] = sa.JSON().with_variant(
    postgresql.JSONB(), "postgresql"
)
#: BIGINT on PostgreSQL; INTEGER on SQLite, where only ``INTEGER PRIMARY
#: KEY`` is the rowid and autoincrements.
PositionType: sa.types.TypeEngine[int] = sa.BigInteger().with_variant(
    sa.Integer(), "sqlite"
)

metadata = sa.MetaData()

events = sa.Table(
    "events",
    metadata,
    sa.Column("position", PositionType, primary_key=True, autoincrement=True),
    sa.Column("stream_id", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("type", sa.String(128), nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("data", JSONType, nullable=False),
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("host_id", sa.String(255), nullable=True),
    sa.Column("command_id", sa.String(255), nullable=True),
    sa.Column("correlation_id", sa.String(255), nullable=True),
    sa.Column("causation_id", sa.String(255), nullable=True),
    sa.Column("recorded_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("position", name="pk_events"),
    sa.UniqueConstraint("stream_id", "version", name="uq_events_stream_version"),
    # Audit filters read "WHERE <filter> AND position > :after ORDER BY
    # position LIMIT n": (filter, position) serves that as one range scan.
    sa.Index("ix_events_type_position", "type", "position"),
    sa.Index("ix_events_actor_position", "actor", "position"),
    sa.Index("ix_events_host_position", "host_id", "position"),
    sa.Index("ix_events_recorded_at", "recorded_at"),
    # Revision 0002: follow one request through every sandbox it touched.
    sa.Index("ix_events_correlation_position", "correlation_id", "position"),
    sqlite_autoincrement=True,
)

commands = sa.Table(
    "commands",
    metadata,
    sa.Column("command_id", sa.String(255), nullable=False),
    sa.Column("stream_id", sa.String(128), nullable=False),
    sa.Column("command", sa.String(128), nullable=False),
    sa.Column("first_position", sa.BigInteger, nullable=False),
    sa.Column("last_position", sa.BigInteger, nullable=False),
    sa.Column("recorded_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("command_id", name="pk_commands"),
    sa.Index("ix_commands_stream_id", "stream_id"),
)

sandboxes = sa.Table(
    "sandboxes",
    metadata,
    sa.Column("id", sa.String(128), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("host_id", sa.String(255), nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=True),
    sa.Column("updated_at", UTCDateTime(), nullable=True),
    sa.Column("config_summary", JSONType, nullable=False),
    sa.Column("snapshot", JSONType, nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_sandboxes"),
    sa.Index("ix_sandboxes_state", "state"),
    sa.Index("ix_sandboxes_host_id", "host_id"),
)

network_slots = sa.Table(
    "network_slots",
    metadata,
    sa.Column("host_id", sa.String(255), nullable=False),
    sa.Column("slot", sa.Integer, nullable=False),
    sa.Column("sandbox_id", sa.String(128), nullable=False),
    sa.PrimaryKeyConstraint("host_id", "slot", name="pk_network_slots"),
    sa.ForeignKeyConstraint(
        ["sandbox_id"], ["sandboxes.id"], name="fk_network_slots_sandbox"
    ),
    sa.Index("ix_network_slots_sandbox_id", "sandbox_id"),
)

resources = sa.Table(
    "resources",
    metadata,
    sa.Column("sandbox_id", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("host_id", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.PrimaryKeyConstraint("sandbox_id", "kind", "name", name="pk_resources"),
    sa.ForeignKeyConstraint(
        ["sandbox_id"], ["sandboxes.id"], name="fk_resources_sandbox"
    ),
    sa.Index("ix_resources_host_id", "host_id"),
)

log_marks = sa.Table(
    "log_marks",
    metadata,
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("name", name="pk_log_marks"),
)

#: The ``log_marks`` row after whose position ``recorded_at`` never decreases
#: in position order. Appends keep it so (each takes the later of its clock
#: and the last event's time, under the append lock); revision 0003 set it
#: past the last place where an older log went back in time (0 if it never
#: did). Audit queries answer a time range there as a range of positions.
TIMES_ORDERED_AFTER = "times_ordered_after"

#: The projection tables, in the order they are filled (children last).
PROJECTION_TABLES = (sandboxes, network_slots, resources)

#: Columns of ``events`` in the order the store reads them.
EVENT_COLUMNS = (
    events.c.position,
    events.c.stream_id,
    events.c.version,
    events.c.type,
    events.c.schema_version,
    events.c.data,
    events.c.actor,
    events.c.host_id,
    events.c.command_id,
    events.c.correlation_id,
    events.c.causation_id,
    events.c.recorded_at,
)
