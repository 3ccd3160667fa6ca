"""The event store on SQLite and PostgreSQL, with SQLAlchemy 2 Core.

Appends are serialized, so positions are committed in position order and a
follower reading "after position P" never misses an event:

- SQLite: every write transaction starts with ``BEGIN IMMEDIATE`` (the
  driver's own BEGIN is switched off and SQLAlchemy's ``begin`` event emits
  ours), the database runs in WAL mode with a 30 s busy timeout, so writers
  queue for the lock instead of failing with "database is locked", and
  readers (plain ``BEGIN``) never take the write lock nor block a writer.
  ``synchronous=FULL``: a commit is on disk before append returns, even
  across a power cut; the log records resources before they are created,
  so losing the last commits could forget a resource that exists.
- PostgreSQL: every write transaction first takes one transaction-level
  advisory lock (``pg_advisory_xact_lock``). The append sends ``NOTIFY
  wrenn_events, '<last position>'`` inside its transaction; waiters LISTEN on
  one dedicated connection.

Under that lock an append also takes the later of its clock and the last
event's time as its ``recorded_at``, so times never decrease in position
order: an audit query answers a time range as a range of positions.

Projections (``sandboxes``, ``network_slots``, ``resources``) are written in
the append's transaction by folding the new events onto the stored snapshot
with ``wrenn_engine.domain.state.evolve``. Every read passes stored rows
through ``wrenn_engine.domain.upcasting.upcast``.

The append is the one hot path written against the driver (see ``append``);
everything else goes through SQLAlchemy Core. Driver errors become
StoreErrors in exactly one place: ``_translate``.
"""

from __future__ import annotations

import gc
import json
import logging
import select
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import psycopg
import sqlalchemy as sa
from alembic.util import CommandError
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import Pool, StaticPool

from wrenn_engine.domain.events import (
    Metadata,
    NewEvent,
    RecordedEvent,
    is_sandbox_stream,
)
from wrenn_engine.domain.state import SandboxState, evolve, fold
from wrenn_engine.domain.upcasting import current_version, upcast
from wrenn_engine.errors import (
    ConcurrencyError,
    ConfigError,
    DatabaseError,
    IdempotencyError,
    SlotTaken,
    StoreError,
    WrennError,
)
from wrenn_engine.store.base import (
    AppendResult,
    CommandRecord,
    EventQuery,
    EventStore,
    HeldResource,
    ProjectionDifference,
    StoreStats,
)
from wrenn_engine.store.schema import (
    EVENT_COLUMNS,
    TIMES_ORDERED_AFTER,
    commands,
    events,
    log_marks,
    network_slots,
    resources,
    sandboxes,
)

logger = logging.getLogger(__name__)

#: Advisory lock keys (PostgreSQL): b"wrennevt" and b"wrennmig" as bigints.
APPEND_LOCK_KEY = int.from_bytes(b"wrennevt", "big")
MIGRATION_LOCK_KEY = int.from_bytes(b"wrennmig", "big")
#: The LISTEN/NOTIFY channel; the payload is the last position committed.
NOTIFY_CHANNEL = "wrenn_events"

BUSY_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05
REBUILD_BATCH = 20_000

#: Execution option marking a read-only connection: SQLite then opens a
#: deferred transaction that never takes the write lock.
_READONLY = "wrenn_readonly"
_SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

#: SQLite names no constraint in its message, only the columns.
_SQLITE_CONSTRAINTS = {
    "events.stream_id, events.version": "uq_events_stream_version",
    "commands.command_id": "pk_commands",
    "network_slots.host_id, network_slots.slot": "pk_network_slots",
}


#: The columns of ``events`` as the driver returns them (no JSON or time
#: processing by SQLAlchemy; ``_Decoder`` does that once, for every backend).
RAW_EVENT_COLUMNS = tuple(
    sa.type_coerce(c, sa.types.NullType()).label(c.name)
    if c.name in ("data", "recorded_at")
    else c
    for c in EVENT_COLUMNS
)


# --- engines ------------------------------------------------------------------


def normalize_url(url: str) -> sa.URL:
    """Parse ``url``; a bare ``postgresql://`` means psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            "database url",
            f"backend {backend!r} is not supported",
            limit="sqlite:///PATH or postgresql+psycopg://USER@HOST/DB",
        )
    return parsed


def is_memory_url(url: str | sa.URL) -> bool:
    parsed = make_url(url) if isinstance(url, str) else url
    return parsed.get_backend_name() == "sqlite" and parsed.database in (
        None,
        "",
        ":memory:",
    )


def safe_url(url: str | sa.URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    parsed = make_url(url) if isinstance(url, str) else url
    return parsed.render_as_string(hide_password=True)


def create_sql_engine(
    url: str,
    *,
    poolclass: type[Pool] | None = None,
    sqlite_synchronous: str = "FULL",
) -> Engine:
    """An Engine set up the way the store needs it (also used by migrations).

    SQLite: WAL, a 30 s busy timeout, ``synchronous`` as given, foreign keys
    on, usable from any thread, and transactions that begin with ``BEGIN
    IMMEDIATE`` unless the connection carries the read-only option.
    ``sqlite://`` (in memory) shares one connection through a StaticPool.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "postgresql":
        return sa.create_engine(parsed, poolclass=poolclass, pool_pre_ping=True)

    synchronous = sqlite_synchronous.upper()
    if synchronous not in _SQLITE_SYNCHRONOUS:
        raise ConfigError(
            "sqlite synchronous",
            f"{sqlite_synchronous!r} is unknown",
            limit=", ".join(_SQLITE_SYNCHRONOUS),
        )
    memory = is_memory_url(parsed)
    kwargs: dict[str, Any] = {
        "connect_args": {"check_same_thread": False, "timeout": BUSY_TIMEOUT_S},
    }
    if memory:
        kwargs["poolclass"] = StaticPool
    elif poolclass is not None:
        kwargs["poolclass"] = poolclass
    engine = sa.create_engine(parsed, **kwargs)

    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver must not emit BEGIN itself; _on_begin does.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if not memory:
                mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        readonly = connection.get_execution_options().get(_READONLY, False)
        connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def _pg_append_engine(url: sa.URL) -> Engine:
    """The pool of the append's PostgreSQL connections (autocommit, for
    pipeline mode; see ``SqlEventStore._append_tx``).

    Instead of a ping round trip at every checkout (``pool_pre_ping``), a
    connection is checked for something to read: an idle connection has
    nothing, unless the server closed it or announced why it will (a restart,
    an administrator's terminate). Such a connection is replaced before use.
    A connection that died silently (a network cut) fails in the append's
    first round trip instead, which sends nothing that could take effect.
    """
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")

    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The append's statements are keyed lookups whose best plan does not
        # depend on their parameters: plan them once per connection (psycopg
        # prepares a statement on its fifth use), not at every execution.
        dbapi_connection.execute("SET plan_cache_mode = force_generic_plan")

    @sa_event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if dbapi_connection.closed or dbapi_connection.broken:
            raise sa.exc.DisconnectionError("the connection is closed")
        readable, _, _ = select.select([dbapi_connection.fileno()], [], [], 0)
        if readable:
            raise sa.exc.DisconnectionError("the server closed the connection")

    return engine


# --- error translation ----------------------------------------------------------

Conflict = Callable[[str], StoreError | None]
_DRIVER_ERRORS = (sa.exc.SQLAlchemyError, sqlite3.Error, psycopg.Error)
#: Through SQLAlchemy, or straight from the driver (``append``).
_INTEGRITY_ERRORS = (
    sa.exc.IntegrityError,
    sqlite3.IntegrityError,
    psycopg.IntegrityError,
)


@contextmanager
def _translate(operation: str, conflict: Conflict | None = None) -> Iterator[None]:
    """The one place where driver and migration errors become StoreErrors.

    An integrity error names a constraint; ``conflict`` may turn it into the
    typed error it means (ConcurrencyError, SlotTaken, IdempotencyError).
    Everything else becomes DatabaseError. The cause is always chained.
    """
    try:
        yield
    except WrennError:
        raise
    except _INTEGRITY_ERRORS as exc:
        typed: StoreError | None = None
        if conflict is not None:
            try:
                typed = conflict(_constraint_name(exc))
            except _DRIVER_ERRORS:
                typed = None  # could not read the details: report the violation
        if typed is not None:
            raise typed from exc
        raise DatabaseError(operation, _detail(exc)) from exc
    except _DRIVER_ERRORS as exc:
        raise DatabaseError(operation, _detail(exc)) from exc
    except CommandError as exc:
        raise StoreError(f"{operation}: {exc}") from exc


def _constraint_name(exc: Exception) -> str:
    orig = getattr(exc, "orig", None) or exc
    diag = getattr(orig, "diag", None)
    name = getattr(diag, "constraint_name", None)
    if name:
        return str(name)
    message = str(orig)
    for columns, constraint in _SQLITE_CONSTRAINTS.items():
        if columns in message:
            return constraint
    return ""


def _detail(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0] if text else 'no message'}"


# --- projections ------------------------------------------------------------------


def config_summary(state: SandboxState) -> dict[str, Any]:
    """The few config fields worth a glance in a sandbox listing."""
    config = state.config
    return {
        "template_id": config.get("template_id") or None,
        "vcpus": config.get("vcpus") or None,
        "memory_mb": config.get("memory_mb") or None,
        "guest_ip": config.get("guest_ip") or None,
    }


def _sandbox_row(state: SandboxState) -> dict[str, Any]:
    return {
        "id": state.id,
        "state": str(state.state),
        "version": state.version,
        "host_id": state.host_id,
        "last_error": state.last_error,
        "created_at": state.created_at,
        "updated_at": state.updated_at,
        "config_summary": config_summary(state),
        "snapshot": state.to_dict(),
    }


def _slot_rows(state: SandboxState) -> dict[tuple[str, int], str]:
    """``(host_id, slot) -> sandbox id`` for every slot the state holds."""
    rows: dict[tuple[str, int], str] = {}
    for res in state.resources.values():
        if res["kind"] != "slot":
            continue
        try:
            slot = int(res["name"])
        except ValueError:
            raise ValueError(
                f"sandbox {state.id}: slot resource name {res['name']!r} is not "
                "a number"
            ) from None
        rows[(state.host_id, slot)] = state.id
    return rows


def _resource_rows(state: SandboxState) -> dict[tuple[str, str], tuple[str, str]]:
    """``(kind, name) -> (host_id, status)`` for every resource the state holds."""
    return {
        (res["kind"], str(res["name"])): (state.host_id, res["status"])
        for res in state.resources.values()
    }


def _json_clean(value: Any) -> Any:
    """What ``value`` reads back as after a trip through JSON."""
    return json.loads(json.dumps(value))


@dataclass(slots=True)
class _Projections:
    """Every projection row, computed from a fold of the whole log."""

    sandboxes: dict[str, dict[str, Any]] = field(default_factory=dict)
    slots: dict[tuple[str, int], str] = field(default_factory=dict)
    resources: dict[tuple[str, str, str], tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, states: Iterable[SandboxState]) -> _Projections:
        out = cls()
        for state in states:
            out.sandboxes[state.id] = _sandbox_row(state)
            for key, holder in _slot_rows(state).items():
                other = out.slots.get(key)
                if other is not None:
                    raise SlotTaken(key[0], key[1], other)
                out.slots[key] = holder
            for (kind, name), value in _resource_rows(state).items():
                out.resources[(state.id, kind, name)] = value
        return out


@dataclass(slots=True)
class _Attempt:
    """One append in flight: what a constraint violation must be reported with."""

    stream_id: str
    expected_version: int
    command_id: str | None
    command: str
    claimed_slots: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Head:
    """What an append reads first, in one statement: the stream's projection
    row (for a host stream only the log's version), the last event's time,
    and the record of the append's command id."""

    version: int | None  # None: no projection row
    state: str | None
    host_id: str | None
    snapshot: Any
    last_time: Any
    command_stream: str | None  # None: the command id is new
    command: str | None
    command_first: Any
    command_last: Any


@dataclass(frozen=True, slots=True)
class _Held:
    """What the projection tables hold for a sandbox before an append."""

    version: int | None  # None: no row
    state: str | None
    host_id: str | None
    slots: dict[tuple[str, int], str]
    resources: dict[tuple[str, str], tuple[str, str]]

    @classmethod
    def of(cls, head: _Head, stored: SandboxState | None) -> _Held:
        if stored is None:
            return cls(head.version, head.state, head.host_id, {}, {})
        return cls(
            head.version,
            head.state,
            head.host_id,
            _slot_rows(stored),
            _resource_rows(stored),
        )


@dataclass(slots=True)
class _Writes:
    """Everything one append writes, collected before any of it is sent."""

    stream_id: str
    expected_version: int
    events: Sequence[NewEvent]
    texts: list[str]  # the events' data as JSON
    metadata: Metadata
    now: Any  # recorded_at, as the driver binds it
    command_id: str | None
    command: str
    #: The sandboxes row (state, version, host_id, last_error, created_at,
    #: updated_at, config_summary, snapshot, id); None for a host stream.
    sandbox: tuple[Any, ...] | None = None
    new_sandbox: bool = False
    state_changed: bool = True
    host_changed: bool = True
    slots_gone: list[tuple[str, int]] = field(default_factory=list)
    slots_claimed: list[tuple[str, int]] = field(default_factory=list)
    resources_gone: list[tuple[str, str]] = field(default_factory=list)
    #: (kind, name, host_id, status)
    resources_added: list[tuple[str, str, str, str]] = field(default_factory=list)
    resources_changed: list[tuple[str, str, str, str]] = field(default_factory=list)

    def meta(self) -> tuple[Any, ...]:
        """The columns every event of the append shares, in insert order."""
        m = self.metadata
        return (
            m.actor,
            m.host_id,
            m.command_id,
            m.correlation_id,
            m.causation_id,
            self.now,
        )


class _StateCache:
    """The state each recent append left a sandbox in, with the snapshot text
    it stored: spares the next append to the sandbox parsing it again.

    SQLite only, where a snapshot reads back as the very text written. An
    entry is used only when the snapshot an append reads inside its write
    transaction is that text, so a change by any other writer (another
    process, a rebuild, an edit) is seen. It is taken out for use, as evolve
    mutates it, and put back only after a commit. Safe to share between
    threads; keeps the ``size`` most recently written sandboxes.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[str, SandboxState]] = {}

    def take(self, stream_id: str, snapshot: Any) -> SandboxState | None:
        with self._lock:
            entry = self._entries.pop(stream_id, None)
        if entry is None or entry[0] != snapshot:
            return None
        return entry[1]

    def put(self, stream_id: str, snapshot: str, state: SandboxState) -> None:
        with self._lock:
            self._entries[stream_id] = (snapshot, state)
            if len(self._entries) > self._size:
                del self._entries[next(iter(self._entries))]


# --- the append's statements ------------------------------------------------------

_INSERT_COLUMNS = (
    "stream_id, version, type, schema_version, data, actor, host_id, command_id, "
    "correlation_id, causation_id, recorded_at"
)
_SANDBOX_COLUMNS = (
    "state, version, host_id, last_error, created_at, updated_at, config_summary, "
    "snapshot"
)
#: The last event's time and a command id's record, beside the stream's head.
_HEAD_JOINS = (
    "FROM (SELECT (SELECT recorded_at FROM events ORDER BY position DESC LIMIT 1)"
    " AS recorded_at) AS t "
)
_HEAD_COMMAND = (
    "t.recorded_at, c.stream_id, c.command, c.first_position, c.last_position "
)

#: PostgreSQL writes an append with one statement, whatever the number of
#: events and changes: they travel as two JSON documents (``events``,
#: ``changes``) that the server unpacks, so psycopg adapts a few scalars and
#: the server plans the statement once. Every part runs exactly once, on one
#: snapshot, and no two parts touch the same row. The NOTIFY payload is the
#: last position.
_PG_WRITE = """
WITH new_events AS (
    INSERT INTO events ({columns})
    SELECT %(stream_id)s::text, e.version, e.type, e.schema_version, e.data,
        %(actor)s::text, %(host_id)s::text, %(command_id)s::text,
        %(correlation_id)s::text, %(causation_id)s::text, %(now)s::timestamptz
    FROM jsonb_to_recordset(%(events)s::jsonb)
        AS e(version int, type text, schema_version int, data jsonb)
    ORDER BY e.version
    RETURNING position, version
), new_command AS (
    INSERT INTO commands (command_id, stream_id, command, first_position,
        last_position, recorded_at)
    SELECT %(command_id)s::text, %(stream_id)s::text, %(command)s::text,
        min(position), max(position), %(now)s::timestamptz
    FROM new_events HAVING %(command_id)s::text IS NOT NULL
){projection}
SELECT position, version,
    (SELECT pg_notify(%(channel)s::text, max(position)::text) FROM new_events)
FROM new_events
"""
_PG_WRITE_PROJECTION = """, new_sandbox AS (
    INSERT INTO sandboxes (id, {sandbox_columns})
    SELECT %(stream_id)s::text, %(state)s::text, %(version)s::int,
        %(sandbox_host_id)s::text, %(last_error)s::text,
        %(created_at)s::timestamptz, %(updated_at)s::timestamptz,
        %(config_summary)s::jsonb, %(snapshot)s::jsonb
    WHERE %(new)s::boolean
), changed_sandbox AS (
    UPDATE sandboxes SET state = %(state)s::text, version = %(version)s::int,
        host_id = %(sandbox_host_id)s::text, last_error = %(last_error)s::text,
        created_at = %(created_at)s::timestamptz,
        updated_at = %(updated_at)s::timestamptz,
        config_summary = %(config_summary)s::jsonb, snapshot = %(snapshot)s::jsonb
    WHERE id = %(stream_id)s::text AND NOT %(new)s::boolean
), gone_slots AS (
    DELETE FROM network_slots
    WHERE sandbox_id = %(stream_id)s::text AND (host_id, slot) IN (
        SELECT * FROM jsonb_to_recordset(%(changes)s::jsonb -> 'gone_slots')
            AS g(host_id text, slot int))
), new_slots AS (
    INSERT INTO network_slots (host_id, slot, sandbox_id)
    SELECT n.host_id, n.slot, %(stream_id)s::text
    FROM jsonb_to_recordset(%(changes)s::jsonb -> 'new_slots')
        AS n(host_id text, slot int)
), gone_resources AS (
    DELETE FROM resources
    WHERE sandbox_id = %(stream_id)s::text AND (kind, name) IN (
        SELECT * FROM jsonb_to_recordset(%(changes)s::jsonb -> 'gone_resources')
            AS g(kind text, name text))
), new_resources AS (
    INSERT INTO resources (sandbox_id, kind, name, host_id, status)
    SELECT %(stream_id)s::text, n.kind, n.name, n.host_id, n.status
    FROM jsonb_to_recordset(%(changes)s::jsonb -> 'new_resources')
        AS n(kind text, name text, host_id text, status text)
), changed_resources AS (
    UPDATE resources SET host_id = c.host_id, status = c.status
    FROM jsonb_to_recordset(%(changes)s::jsonb -> 'changed_resources')
        AS c(kind text, name text, host_id text, status text)
    WHERE resources.sandbox_id = %(stream_id)s::text
        AND resources.kind = c.kind AND resources.name = c.name
)"""


def _driver_sql(template: str, backend: str) -> str:
    """``template`` in the driver's paramstyle: ``?`` is a parameter, ``?json``
    a JSON one (bound as text; JSONB on PostgreSQL)."""
    if backend == "postgresql":
        return template.replace("?json", "%s::jsonb").replace("?", "%s")
    return template.replace("?json", "?")


@dataclass(frozen=True, slots=True)
class _AppendSql:
    """Every statement of an append, in one backend's driver paramstyle.

    The head statements take (stream id, command id). On PostgreSQL the
    writes are ``write_sandbox`` or ``write_stream`` (one statement each,
    named parameters); on SQLite the statements from ``insert_events`` on.
    ``rebuild_projections`` fills the tables with the ``insert_*`` ones, on
    both backends.
    """

    lock: str
    sandbox_head: str
    stream_head: str
    version_at: str
    stream_version: str
    stream_events: str
    slot_holder: str
    write_sandbox: str
    write_stream: str
    insert_events: str
    positions: str
    insert_sandbox: str
    #: By (state changed, host changed): only those columns are set.
    update_sandbox: dict[tuple[bool, bool], str]
    delete_slot: str
    insert_slot: str
    delete_resource: str
    insert_resource: str
    update_resource: str
    insert_command: str

    @classmethod
    def of(cls, backend: str) -> _AppendSql:
        def sql(template: str) -> str:
            return _driver_sql(template, backend)

        def update(state: bool, host: bool) -> str:
            sets = ["state = ?"] if state else []
            sets += ["host_id = ?"] if host else []
            sets += [
                "version = ?",
                "last_error = ?",
                "created_at = ?",
                "updated_at = ?",
                "config_summary = ?json",
                "snapshot = ?json",
            ]
            return sql(f"UPDATE sandboxes SET {', '.join(sets)} WHERE id = ?")

        columns = ", ".join(c.name for c in EVENT_COLUMNS)
        return cls(
            lock=sql("SELECT pg_advisory_xact_lock(?)"),
            sandbox_head=sql(
                "SELECT s.version, s.state, s.host_id, s.snapshot, "
                + _HEAD_COMMAND
                + _HEAD_JOINS
                + "LEFT JOIN sandboxes AS s ON s.id = ? "
                "LEFT JOIN commands AS c ON c.command_id = ?"
            ),
            stream_head=sql(
                "SELECT (SELECT max(version) FROM events WHERE stream_id = ?), "
                "NULL, NULL, NULL, "
                + _HEAD_COMMAND
                + _HEAD_JOINS
                + "LEFT JOIN commands AS c ON c.command_id = ?"
            ),
            version_at=sql("SELECT version FROM events WHERE position = ?"),
            stream_version=sql("SELECT max(version) FROM events WHERE stream_id = ?"),
            stream_events=sql(
                f"SELECT {columns} FROM events "
                "WHERE stream_id = ? AND version <= ? ORDER BY version"
            ),
            slot_holder=sql(
                "SELECT sandbox_id FROM network_slots WHERE host_id = ? AND slot = ?"
            ),
            write_sandbox=_PG_WRITE.format(
                columns=_INSERT_COLUMNS,
                projection=_PG_WRITE_PROJECTION.format(
                    sandbox_columns=_SANDBOX_COLUMNS
                ),
            ),
            write_stream=_PG_WRITE.format(columns=_INSERT_COLUMNS, projection=""),
            insert_events=sql(
                f"INSERT INTO events ({_INSERT_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            positions=sql(
                "SELECT position FROM events "
                "WHERE stream_id = ? AND version > ? ORDER BY version"
            ),
            insert_sandbox=sql(
                f"INSERT INTO sandboxes ({_SANDBOX_COLUMNS}, id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?json, ?json, ?)"
            ),
            update_sandbox={
                (state, host): update(state, host)
                for state in (False, True)
                for host in (False, True)
            },
            delete_slot=sql(
                "DELETE FROM network_slots "
                "WHERE sandbox_id = ? AND host_id = ? AND slot = ?"
            ),
            insert_slot=sql(
                "INSERT INTO network_slots (host_id, slot, sandbox_id) VALUES (?, ?, ?)"
            ),
            delete_resource=sql(
                "DELETE FROM resources WHERE sandbox_id = ? AND kind = ? AND name = ?"
            ),
            insert_resource=sql(
                "INSERT INTO resources (sandbox_id, kind, name, host_id, status) "
                "VALUES (?, ?, ?, ?, ?)"
            ),
            update_resource=sql(
                "UPDATE resources SET host_id = ?, status = ? "
                "WHERE sandbox_id = ? AND kind = ? AND name = ?"
            ),
            insert_command=sql(
                "INSERT INTO commands (command_id, stream_id, command, "
                "first_position, last_position, recorded_at) VALUES (?, ?, ?, ?, ?, ?)"
            ),
        )


def _sqlite_time(value: datetime) -> str:
    """A time as SQLite keeps it: naive UTC text of one fixed width
    (``2024-05-01 12:00:00.000000``, as ``schema.UTCDateTime`` writes it)."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]  # without "+00:00"


def _bind_sqlite_time(value: datetime | None) -> str | None:
    return _sqlite_time(value) if value is not None else None


def _bind_pg_time(value: datetime | None) -> datetime | None:
    return value


def _second(pair: Sequence[Any]) -> Any:
    return pair[1]


# --- the store --------------------------------------------------------------------


class SqlEventStore(EventStore):
    """The event store on SQLite or PostgreSQL; safe to share between threads.

    Use ``wrenn_engine.store.open_store`` to get one: it checks (or brings
    up) the schema first. ``sqlite_synchronous`` trades durability for speed
    on SQLite (``FULL`` by default; ``NORMAL`` may lose the last commits on
    a power cut, never on a process crash).
    """

    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL") -> None:
        self.url = url
        self._engine = create_sql_engine(url, sqlite_synchronous=sqlite_synchronous)
        self._reader = self._engine.execution_options(**{_READONLY: True})
        self._backend = self._engine.dialect.name
        self._is_pg = self._backend == "postgresql"
        # An in-memory database is one shared connection: one user at a time.
        self._serial: threading.RLock | None = (
            threading.RLock() if is_memory_url(self._engine.url) else None
        )
        self._snapshot_reader = (
            self._reader.execution_options(isolation_level="REPEATABLE READ")
            if self._is_pg
            else self._reader
        )
        self._listener: _PgListener | None = None
        self._listener_lock = threading.Lock()
        # Appends use driver SQL (see ``append``); on PostgreSQL from a pool
        # of autocommit connections of their own, for pipeline mode.
        self._sql = _AppendSql.of(self._backend)
        self._bind_time = _bind_pg_time if self._is_pg else _bind_sqlite_time
        self._append_engine = (
            _pg_append_engine(self._engine.url) if self._is_pg else self._engine
        )
        # SQLite returns a snapshot as the very text an append wrote: the state
        # it came from can be kept and checked by comparing the two.
        self._states = None if self._is_pg else _StateCache()

    def __repr__(self) -> str:
        return f"SqlEventStore({safe_url(self._engine.url)!r})"

    def __enter__(self) -> SqlEventStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def is_memory(self) -> bool:
        """True for an in-memory SQLite database (``sqlite://``)."""
        return self._serial is not None

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for migrations on an in-memory database)."""
        return self._engine

    # --- transactions -------------------------------------------------------

    def _guard(self) -> AbstractContextManager[Any]:
        return self._serial if self._serial is not None else nullcontext()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction; appends and rebuilds are serialized."""
        with self._guard(), self._engine.begin() as conn:
            if self._is_pg:
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"),
                    {"key": APPEND_LOCK_KEY},
                )
            yield conn

    @contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[Connection]:
        """A read transaction; ``snapshot`` makes several statements agree."""
        engine = self._snapshot_reader if snapshot else self._reader
        with self._guard(), engine.begin() as conn:
            yield conn

    @contextmanager
    def _append_tx(self) -> Iterator[Any]:
        """The append's write transaction, on a pooled DBAPI connection.

        SQLite: ``BEGIN IMMEDIATE`` ... ``COMMIT`` on the store's own pool;
        each statement runs when it is sent.

        PostgreSQL: an autocommit connection of the append's own pool, in
        pipeline mode, with no BEGIN: everything up to the pipeline's Sync is
        one implicit transaction, which the server commits at the Sync, or
        rolls back if a statement failed. The lock and the reads go out
        together and come back in one round trip, when the first result is
        fetched; the one write statement goes with the Sync, in a second.
        Each statement gets a snapshot taken after the lock is held, so
        every read sees every append committed before this one. An append
        sends its write last, after every check: an error raised in Python
        before that leaves nothing to commit but reads.
        """
        with self._guard():
            raw = self._append_engine.raw_connection()
            conn: Any = raw.driver_connection
            try:
                if self._is_pg:
                    with conn.pipeline():
                        conn.execute(self._sql.lock, (APPEND_LOCK_KEY,))
                        yield conn
                else:
                    conn.execute("BEGIN IMMEDIATE")
                    yield conn
                    conn.execute("COMMIT")
            except BaseException:
                try:
                    conn.rollback()
                except _DRIVER_ERRORS:
                    raw.invalidate()  # broken: the pool must not hand it out again
                raise
            finally:
                raw.close()

    # --- append -------------------------------------------------------------
    #
    # The append is the store's hot path (a lifecycle command makes a dozen),
    # so it talks to the driver directly, with the statements of ``_AppendSql``
    # written out once per backend: SQLAlchemy Core costs about 80 us per
    # statement here, the driver a few. Everything else uses Core.
    #
    # Reads first, in one statement (the stream's head, the last event's time,
    # the command id's record). Then the projection is folded in Python
    # (evolve reads no positions, so it needs none), and everything to write
    # is collected in ``_Writes`` and sent: statement by statement on SQLite,
    # as one statement on PostgreSQL.

    def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int,
        metadata: Metadata,
        command_id: str | None = None,
        command: str = "",
    ) -> AppendResult:
        if not events:
            raise ValueError(f"sandbox {stream_id}: append needs at least one event")
        if command_id is not None:
            metadata = replace(metadata, command_id=command_id)

        # Serialize once: the text is stored, and its parse (one scan for the
        # batch) is what a reader will get back, upcast as a reader gets it.
        # Unknown types are refused before anything is written.
        texts = [json.dumps(e.data) for e in events]
        datas = _json_text(f"[{','.join(texts)}]")
        shapes = [
            (e.schema_version, data)
            if current_version(e.type) == e.schema_version
            else upcast(stream_id, expected_version + i, e.type, e.schema_version, data)
            for i, (e, data) in enumerate(zip(events, datas, strict=True), 1)
        ]

        project = is_sandbox_stream(stream_id)
        attempt = _Attempt(stream_id, expected_version, command_id, command)
        conflict = partial(self._conflict, attempt=attempt)
        with _translate("append", conflict), self._append_tx() as tx:
            head = _Head(
                *tx.execute(
                    self._sql.sandbox_head if project else self._sql.stream_head,
                    (stream_id, command_id),
                ).fetchone()
            )
            earlier = self._replay(tx, head, command_id, stream_id, command)
            if earlier is not None:
                logger.debug(
                    "sandbox %s: command %s already applied", stream_id, command_id
                )
                return earlier

            now, bound_now = self._append_time(head.last_time)
            writes = _Writes(
                stream_id,
                expected_version,
                events,
                texts,
                metadata,
                bound_now,
                command_id,
                command,
            )
            state: SandboxState | None = None
            if project:
                state, held = self._fold_base(tx, stream_id, expected_version, head)
                for i, (e, (schema_version, data)) in enumerate(
                    zip(events, shapes, strict=True), 1
                ):
                    state = evolve(
                        state,
                        RecordedEvent(
                            0,  # not read by evolve; not known until inserted
                            stream_id,
                            expected_version + i,
                            e.type,
                            schema_version,
                            data,
                            metadata,
                            now,
                        ),
                    )
                assert state is not None
                self._plan_projection(tx, writes, held, state, attempt)
            elif (head.version or 0) != expected_version:
                # A host stream (reconcile's record) is no sandbox: no projection.
                raise ConcurrencyError(stream_id, expected_version, head.version or 0)

            pending = self._send(tx, writes)

        if self._states is not None and state is not None and writes.sandbox:
            self._states.put(stream_id, writes.sandbox[7], state)
        positions = pending()
        result = AppendResult(
            stream_id, expected_version + len(events), positions[0], positions[-1]
        )
        logger.debug(
            "sandbox %s: appended versions %d-%d at positions %d-%d",
            stream_id,
            expected_version + 1,
            result.version,
            result.first_position,
            result.last_position,
        )
        return result

    def _replay(
        self,
        tx: Any,
        head: _Head,
        command_id: str | None,
        stream_id: str,
        command: str,
    ) -> AppendResult | None:
        """The earlier result of ``command_id``, or None if it is new."""
        if command_id is None or head.command_stream is None:
            return None
        if head.command_stream != stream_id or head.command != command:
            raise IdempotencyError(
                command_id,
                f"{head.command or 'a command'} on sandbox {head.command_stream}",
                f"{command or 'a command'} on sandbox {stream_id}",
            )
        (version,) = tx.execute(self._sql.version_at, (head.command_last,)).fetchone()
        return AppendResult(
            head.command_stream,
            int(version),
            int(head.command_first),
            int(head.command_last),
            replayed=True,
        )

    def _fold_base(
        self, tx: Any, stream_id: str, expected_version: int, head: _Head
    ) -> tuple[SandboxState | None, _Held]:
        """The state to fold the new events onto, and what the tables hold.

        ``head`` has the sandbox's projection row. When its version is the one
        expected, its snapshot is the base: if the log were ahead of it all
        the same, inserting the next version would violate the unique
        (stream, version) index, which reads as ConcurrencyError. Otherwise
        the log decides: another version is a ConcurrencyError; the same one
        means the projection lags the log (events written by other means), so
        the stream is folded afresh and the tables are brought in line by the
        difference from what the stale row says.
        """
        stored = self._states.take(stream_id, head.snapshot) if self._states else None
        if stored is None and head.snapshot is not None:
            stored = SandboxState.from_dict(_json_value(head.snapshot))
        # Taken before folding: evolve mutates the state it is given.
        held = _Held.of(head, stored)
        if (head.version or 0) == expected_version:
            return stored, held

        (actual,) = tx.execute(self._sql.stream_version, (stream_id,)).fetchone()
        actual = int(actual or 0)
        if actual != expected_version:
            raise ConcurrencyError(stream_id, expected_version, actual)
        logger.warning(
            "sandbox %s: projection at version %s but the log at %d; "
            "folding the stream afresh",
            stream_id,
            head.version if head.version is not None else "none",
            actual,
        )
        rows = tx.execute(self._sql.stream_events, (stream_id, actual)).fetchall()
        return fold(_decode(rows)), held

    def _append_time(self, last: Any) -> tuple[datetime, Any]:
        """The append's time, and the same as the driver binds it.

        The clock's time, but never before the last event's: under the append
        lock this keeps ``recorded_at`` non-decreasing in position order (even
        when a clock steps back or hosts disagree), which lets a time range be
        answered as a position range (``query``).
        """
        clock = datetime.now(UTC)
        if self._is_pg:
            now = max(clock, last.astimezone(UTC)) if last is not None else clock
            return now, now
        # SQLite keeps naive UTC text of one fixed width: in time order as text.
        text = _sqlite_time(clock)
        if last is not None and last > text:
            return _utc(last), last
        return clock, text

    def _plan_projection(
        self,
        tx: Any,
        writes: _Writes,
        before: _Held,
        after: SandboxState,
        attempt: _Attempt,
    ) -> None:
        """Add the sandbox row and the slot and resource changes to ``writes``.

        A slot newly held is checked first: held by another sandbox, SlotTaken.
        """
        bind_time = self._bind_time
        writes.new_sandbox = before.version is None
        writes.sandbox = (
            str(after.state),
            after.version,
            after.host_id,
            after.last_error,
            bind_time(after.created_at),
            bind_time(after.updated_at),
            json.dumps(config_summary(after)),
            json.dumps(after.to_dict()),
            after.id,
        )
        writes.state_changed = str(after.state) != before.state
        writes.host_changed = after.host_id != before.host_id

        new_slots = _slot_rows(after)
        writes.slots_gone = [k for k in before.slots if k not in new_slots]
        for host_id, slot in (k for k in new_slots if k not in before.slots):
            holder = self._slot_holder(tx, host_id, slot)
            if holder is not None and holder != after.id:
                raise SlotTaken(host_id, slot, holder)
            if holder is None:
                writes.slots_claimed.append((host_id, slot))
        attempt.claimed_slots = writes.slots_claimed

        new_res = _resource_rows(after)
        old_res = before.resources
        if new_res == old_res:
            return
        writes.resources_gone = [k for k in old_res if k not in new_res]
        for key, (host_id, status) in new_res.items():
            if key not in old_res:
                writes.resources_added.append((*key, host_id, status))
            elif old_res[key] != (host_id, status):
                writes.resources_changed.append((*key, host_id, status))

    def _slot_holder(self, tx: Any, host_id: str, slot: int) -> str | None:
        row = tx.execute(self._sql.slot_holder, (host_id, slot)).fetchone()
        return str(row[0]) if row is not None else None

    def _send(self, tx: Any, writes: _Writes) -> Callable[[], list[int]]:
        """Send every write of an append; return how to get the positions of
        its events once the transaction has ended."""
        if self._is_pg:
            return self._send_pg(tx, writes)
        positions = self._send_sqlite(tx, writes)
        return lambda: positions

    def _send_sqlite(self, tx: Any, w: _Writes) -> list[int]:
        sql = self._sql
        meta = w.meta()
        rows = [
            (w.stream_id, w.expected_version + i, e.type, e.schema_version, text, *meta)
            for i, (e, text) in enumerate(zip(w.events, w.texts, strict=True), 1)
        ]
        if len(rows) == 1:
            positions = [tx.execute(sql.insert_events, rows[0]).lastrowid]
        else:
            tx.cursor().executemany(sql.insert_events, rows)
            found = tx.execute(sql.positions, (w.stream_id, w.expected_version))
            positions = [p for (p,) in found.fetchall()]

        if w.sandbox is not None:
            sid = w.sandbox[-1]
            if w.new_sandbox:
                tx.execute(sql.insert_sandbox, w.sandbox)
            else:
                # An indexed column is written only when it changes: SQLite
                # rewrites an index entry for every column it is told to set.
                update = sql.update_sandbox[(w.state_changed, w.host_changed)]
                state, version, host_id, *rest = w.sandbox
                params = (
                    ((state,) if w.state_changed else ())
                    + ((host_id,) if w.host_changed else ())
                    + (version, *rest)
                )
                tx.execute(update, params)
            many = tx.cursor().executemany
            if w.slots_gone:
                many(sql.delete_slot, [(sid, h, s) for h, s in w.slots_gone])
            if w.slots_claimed:
                many(sql.insert_slot, [(h, s, sid) for h, s in w.slots_claimed])
            if w.resources_gone:
                many(sql.delete_resource, [(sid, k, n) for k, n in w.resources_gone])
            if w.resources_added:
                many(sql.insert_resource, [(sid, *r) for r in w.resources_added])
            if w.resources_changed:
                many(
                    sql.update_resource,
                    [(h, st, sid, k, n) for k, n, h, st in w.resources_changed],
                )
        if w.command_id is not None:
            tx.execute(
                sql.insert_command,
                (
                    w.command_id,
                    w.stream_id,
                    w.command,
                    positions[0],
                    positions[-1],
                    w.now,
                ),
            )
        return positions

    def _send_pg(self, tx: Any, w: _Writes) -> Callable[[], list[int]]:
        # The events' data is already JSON text: spliced in, not re-encoded.
        events = ",".join(
            f'{{"version":{w.expected_version + i},"type":{json.dumps(e.type)},'
            f'"schema_version":{int(e.schema_version)},"data":{text}}}'
            for i, (e, text) in enumerate(zip(w.events, w.texts, strict=True), 1)
        )
        actor, host_id, command_id, correlation_id, causation_id, now = w.meta()
        params: dict[str, Any] = {
            "stream_id": w.stream_id,
            "events": f"[{events}]",
            "actor": actor,
            "host_id": host_id,
            "command_id": command_id,
            "correlation_id": correlation_id,
            "causation_id": causation_id,
            "now": now,
            "command": w.command,
            "channel": NOTIFY_CHANNEL,
        }
        if w.sandbox is None:
            cursor = tx.execute(self._sql.write_stream, params)
        else:
            (
                params["state"],
                params["version"],
                params["sandbox_host_id"],
                params["last_error"],
                params["created_at"],
                params["updated_at"],
                params["config_summary"],
                params["snapshot"],
                _id,
            ) = w.sandbox
            params["new"] = w.new_sandbox
            params["changes"] = json.dumps(
                {
                    "gone_slots": [{"host_id": h, "slot": s} for h, s in w.slots_gone],
                    "new_slots": [
                        {"host_id": h, "slot": s} for h, s in w.slots_claimed
                    ],
                    "gone_resources": [
                        {"kind": k, "name": n} for k, n in w.resources_gone
                    ],
                    "new_resources": [
                        {"kind": k, "name": n, "host_id": h, "status": s}
                        for k, n, h, s in w.resources_added
                    ],
                    "changed_resources": [
                        {"kind": k, "name": n, "host_id": h, "status": s}
                        for k, n, h, s in w.resources_changed
                    ],
                }
            )
            cursor = tx.execute(self._sql.write_sandbox, params)
        # Sent with the pipeline's Sync: the rows come back with the commit.
        # RETURNING promises no order: sort by version.
        return lambda: [row[0] for row in sorted(cursor.fetchall(), key=_second)]

    def _conflict(self, constraint: str, attempt: _Attempt) -> StoreError | None:
        """The typed error behind a constraint violation of an append.

        The explicit checks in ``append`` come first and normally answer; a
        violation means a projection disagreed with the log, or someone
        wrote without taking the append lock.
        """
        if constraint == "uq_events_stream_version":
            with self._read() as conn:
                actual = conn.execute(
                    sa.select(sa.func.max(events.c.version)).where(
                        events.c.stream_id == attempt.stream_id
                    )
                ).scalar()
            return ConcurrencyError(
                attempt.stream_id, attempt.expected_version, int(actual or 0)
            )
        if constraint == "pk_commands" and attempt.command_id is not None:
            return IdempotencyError(
                attempt.command_id,
                "another append that committed first",
                f"{attempt.command or 'a command'} on sandbox {attempt.stream_id}",
            )
        if constraint == "pk_network_slots":
            with self._read() as conn:
                for host_id, slot in attempt.claimed_slots:
                    holder = conn.execute(
                        sa.select(network_slots.c.sandbox_id).where(
                            network_slots.c.host_id == host_id,
                            network_slots.c.slot == slot,
                        )
                    ).scalar()
                    if holder is not None and holder != attempt.stream_id:
                        return SlotTaken(host_id, slot, holder)
        return None

    # --- reads --------------------------------------------------------------

    def read_stream(
        self,
        stream_id: str,
        *,
        to_version: int | None = None,
        at: datetime | None = None,
    ) -> list[RecordedEvent]:
        stmt = sa.select(*RAW_EVENT_COLUMNS).where(events.c.stream_id == stream_id)
        if to_version is not None:
            stmt = stmt.where(events.c.version <= to_version)
        if at is not None:
            stmt = stmt.where(events.c.recorded_at <= _aware(at, "at"))
        with _translate("read stream"), self._read() as conn:
            rows = conn.execute(stmt.order_by(events.c.version)).all()
        return _decode(rows)

    def read_all(
        self,
        *,
        after_position: int = 0,
        limit: int | None = None,
        batch_size: int = 1000,
    ) -> Iterator[RecordedEvent]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        base = sa.select(*RAW_EVENT_COLUMNS).order_by(events.c.position)
        remaining = limit
        after = after_position
        while remaining is None or remaining > 0:
            size = batch_size if remaining is None else min(batch_size, remaining)
            stmt = base.where(events.c.position > after).limit(size)
            # One short transaction per batch: a slow consumer holds nothing.
            with _translate("read all"), self._read() as conn:
                rows = conn.execute(stmt).all()
            yield from _decode(rows)
            if len(rows) < size:
                return
            after = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

    def query(self, query: EventQuery) -> list[RecordedEvent]:
        if query.limit < 1:
            raise ValueError(f"query limit must be at least 1, not {query.limit}")
        since = _aware(query.since, "since") if query.since is not None else None
        until = _aware(query.until, "until") if query.until is not None else None
        stmt = sa.select(*RAW_EVENT_COLUMNS)
        if query.sandbox_ids:
            stmt = stmt.where(events.c.stream_id.in_(list(query.sandbox_ids)))
        if query.types:
            stmt = stmt.where(events.c.type.in_(list(query.types)))
        if query.actors:
            stmt = stmt.where(events.c.actor.in_(list(query.actors)))
        if query.host_ids:
            stmt = stmt.where(events.c.host_id.in_(list(query.host_ids)))
        stmt = stmt.order_by(events.c.position)

        timed = since is not None or until is not None
        with _translate("query events"), self._read(snapshot=timed) as conn:
            if not timed:
                page = stmt.where(events.c.position > query.after_position)
                rows = conn.execute(page.limit(query.limit)).all()
            else:
                rows = self._query_times(conn, stmt, query, since, until)
        return _decode(rows)

    def _query_times(
        self,
        conn: Connection,
        stmt: sa.Select[Any],
        query: EventQuery,
        since: datetime | None,
        until: datetime | None,
    ) -> list[Any]:
        """One page of ``stmt`` (the other filters) within a time range.

        After the ``times_ordered_after`` mark, ``recorded_at`` never decreases
        in position order, so the events from ``since`` (inclusive) to
        ``until`` (exclusive) are the positions from the first event at or
        after ``since`` to the first at or after ``until``: two probes of the
        time index, then a keyset range on position that reads one page,
        wherever the window lies. Up to the mark (a log written before revision
        0003 that goes back in time), the times are filtered as they are.
        """
        probe = sa.select(
            log_marks.c.position,
            _first_at(since) if since is not None else sa.null(),
            _first_at(until) if until is not None else sa.null(),
        ).where(log_marks.c.name == TIMES_ORDERED_AFTER)
        mark = conn.execute(probe).first()

        rows: list[Any] = []
        ordered_after = mark[0] if mark is not None else None
        if ordered_after is None or query.after_position < ordered_after:
            unordered = stmt.where(events.c.position > query.after_position)
            if ordered_after is not None:
                unordered = unordered.where(events.c.position <= ordered_after)
            if since is not None:
                unordered = unordered.where(events.c.recorded_at >= since)
            if until is not None:
                unordered = unordered.where(events.c.recorded_at < until)
            rows = list(conn.execute(unordered.limit(query.limit)).all())
        if mark is None or len(rows) == query.limit:
            return rows

        ordered_after, first, end = mark
        if since is not None and first is None:
            return rows  # nothing was recorded at or after since
        # One lower bound: SQLite would range over the first of several.
        lowest = max(query.after_position, ordered_after, (first or 0) - 1)
        page = stmt.where(events.c.position > lowest)
        if end is not None:
            page = page.where(events.c.position < end)
        rows += conn.execute(page.limit(query.limit - len(rows))).all()
        return rows

    def last_position(self) -> int:
        with _translate("read last position"), self._read() as conn:
            return int(
                conn.execute(sa.select(sa.func.max(events.c.position))).scalar() or 0
            )

    def wait_for_events(self, after_position: int, timeout: float) -> bool:
        deadline = time.monotonic() + max(timeout, 0.0)
        listener = self._ensure_listener() if self._is_pg else None
        if self.last_position() > after_position:
            return True
        if listener is not None and listener.wait(after_position, deadline):
            return True
        # SQLite, or the listener's connection failed: poll.
        while True:
            if self.last_position() > after_position:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL_INTERVAL_S, left))

    def _ensure_listener(self) -> _PgListener | None:
        with self._listener_lock:
            if self._listener is None or self._listener.failed:
                if self._listener is not None:
                    self._listener.stop()
                self._listener = _PgListener(self._engine)
            listener = self._listener
        return listener if listener.ready() else None

    # --- projections ----------------------------------------------------------

    def get_sandbox(self, sandbox_id: str) -> SandboxState | None:
        stmt = sa.select(sandboxes.c.snapshot).where(sandboxes.c.id == sandbox_id)
        with _translate("read sandbox"), self._read() as conn:
            snapshot = conn.execute(stmt).scalar()
        return SandboxState.from_dict(snapshot) if snapshot is not None else None

    def list_sandboxes(
        self,
        *,
        states: Sequence[str] = (),
        host_id: str | None = None,
    ) -> list[SandboxState]:
        stmt = sa.select(sandboxes.c.snapshot)
        if states:
            stmt = stmt.where(sandboxes.c.state.in_([str(s) for s in states]))
        if host_id is not None:
            stmt = stmt.where(sandboxes.c.host_id == host_id)
        stmt = stmt.order_by(sandboxes.c.created_at.asc().nulls_last(), sandboxes.c.id)
        with _translate("list sandboxes"), self._read() as conn:
            snapshots = conn.execute(stmt).scalars().all()
        return [SandboxState.from_dict(s) for s in snapshots]

    def network_slots(self, host_id: str) -> dict[int, str]:
        stmt = (
            sa.select(network_slots.c.slot, network_slots.c.sandbox_id)
            .where(network_slots.c.host_id == host_id)
            .order_by(network_slots.c.slot)
        )
        with _translate("read network slots"), self._read() as conn:
            return {int(slot): str(holder) for slot, holder in conn.execute(stmt)}

    def held_resources(self, host_id: str | None = None) -> list[HeldResource]:
        stmt = sa.select(
            resources.c.sandbox_id,
            resources.c.host_id,
            resources.c.kind,
            resources.c.name,
            resources.c.status,
        ).order_by(resources.c.sandbox_id, resources.c.kind, resources.c.name)
        if host_id is not None:
            stmt = stmt.where(resources.c.host_id == host_id)
        with _translate("read held resources"), self._read() as conn:
            return [HeldResource(*row) for row in conn.execute(stmt)]

    def command(self, command_id: str) -> CommandRecord | None:
        stmt = sa.select(
            commands.c.command_id,
            commands.c.stream_id,
            commands.c.command,
            commands.c.first_position,
            commands.c.last_position,
            commands.c.recorded_at,
        ).where(commands.c.command_id == command_id)
        with _translate("read command"), self._read() as conn:
            row = conn.execute(stmt).first()
        return CommandRecord(*row) if row is not None else None

    def rebuild_projections(self) -> int:
        with _translate("rebuild projections"), self._write() as conn:
            states, count = self._fold_all(conn)
            rows = _Projections.of(states.values())
            for table in (resources, network_slots, sandboxes):
                conn.execute(sa.delete(table))
            # The append's statements, through the driver: for a million
            # events, tens of thousands of rows (JSON serialized once here).
            sql = self._sql
            bind_time = self._bind_time
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.executemany(
                    sql.insert_sandbox,
                    [
                        (
                            row["state"],
                            row["version"],
                            row["host_id"],
                            row["last_error"],
                            bind_time(row["created_at"]),
                            bind_time(row["updated_at"]),
                            json.dumps(row["config_summary"]),
                            json.dumps(row["snapshot"]),
                            row["id"],
                        )
                        for row in rows.sandboxes.values()
                    ],
                )
                cursor.executemany(
                    sql.insert_slot,
                    [(h, s, sid) for (h, s), sid in rows.slots.items()],
                )
                cursor.executemany(
                    sql.insert_resource,
                    [
                        (sid, k, n, h, st)
                        for (sid, k, n), (h, st) in rows.resources.items()
                    ],
                )
            finally:
                cursor.close()
        logger.info(
            "rebuilt the projections of %d sandboxes from %d events", len(states), count
        )
        return count

    def verify_projections(self) -> list[ProjectionDifference]:
        with _translate("verify projections"), self._read(snapshot=True) as conn:
            states, _count = self._fold_all(conn)
            rebuilt = _Projections.of(states.values())
            stored_sandboxes = {
                row["id"]: dict(row)
                for row in conn.execute(sa.select(sandboxes)).mappings()
            }
            stored_slots = {
                (h, int(s)): sid
                for h, s, sid in conn.execute(
                    sa.select(
                        network_slots.c.host_id,
                        network_slots.c.slot,
                        network_slots.c.sandbox_id,
                    )
                )
            }
            stored_resources = {
                (sid, k, n): (h, st)
                for sid, k, n, h, st in conn.execute(
                    sa.select(
                        resources.c.sandbox_id,
                        resources.c.kind,
                        resources.c.name,
                        resources.c.host_id,
                        resources.c.status,
                    )
                )
            }

        differences: list[ProjectionDifference] = []
        for key in sorted(stored_sandboxes.keys() | rebuilt.sandboxes.keys()):
            stored = stored_sandboxes.get(key)
            fresh = rebuilt.sandboxes.get(key)
            if stored is None or fresh is None:
                differences.append(
                    ProjectionDifference("sandboxes", key, stored, fresh)
                )
                continue
            fresh = {
                **fresh,
                "config_summary": _json_clean(fresh["config_summary"]),
                "snapshot": _json_clean(fresh["snapshot"]),
            }
            columns = [c for c in fresh if stored.get(c) != fresh[c]]
            if columns:
                differences.append(
                    ProjectionDifference(
                        "sandboxes",
                        key,
                        {c: stored.get(c) for c in columns},
                        {c: fresh[c] for c in columns},
                    )
                )
        for slot_key in sorted(stored_slots.keys() | rebuilt.slots.keys()):
            if stored_slots.get(slot_key) != rebuilt.slots.get(slot_key):
                differences.append(
                    ProjectionDifference(
                        "network_slots",
                        f"{slot_key[0]}/{slot_key[1]}",
                        stored_slots.get(slot_key),
                        rebuilt.slots.get(slot_key),
                    )
                )
        for res_key in sorted(stored_resources.keys() | rebuilt.resources.keys()):
            if stored_resources.get(res_key) != rebuilt.resources.get(res_key):
                differences.append(
                    ProjectionDifference(
                        "resources",
                        f"{res_key[0]}/{res_key[1]}:{res_key[2]}",
                        stored_resources.get(res_key),
                        rebuilt.resources.get(res_key),
                    )
                )
        return differences

    def _fold_all(self, conn: Connection) -> tuple[dict[str, SandboxState], int]:
        """Fold every stream from one position-ordered scan of the log.

        This is the hot loop of a rebuild (a million events should take
        seconds), so it reads batches through the DBAPI cursor of ``conn``
        (same transaction, no SQLAlchemy row objects) and pauses the cyclic
        garbage collector, which otherwise rescans the growing states over
        and over; both are restored before returning.
        """
        states: dict[str, SandboxState] = {}
        host_streams: set[str] = set()
        decoder = _Decoder()
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        collecting = gc.isenabled()
        gc.disable()
        try:
            after = 0
            count = 0
            while True:
                cursor.execute(_scan_sql(conn.dialect, after, REBUILD_BATCH))
                rows = cursor.fetchall()
                for row in rows:
                    recorded = decoder(row)
                    state = states.get(recorded.stream_id)
                    if state is not None:
                        evolve(state, recorded)  # mutates the state in place
                    elif recorded.stream_id not in host_streams:
                        if is_sandbox_stream(recorded.stream_id):
                            states[recorded.stream_id] = evolve(None, recorded)
                        else:
                            host_streams.add(recorded.stream_id)
                count += len(rows)
                if len(rows) < REBUILD_BATCH:
                    return states, count
                after = rows[-1][0]
        finally:
            if collecting:
                gc.enable()
            cursor.close()

    # --- the rest ---------------------------------------------------------------

    def stats(self) -> StoreStats:
        with _translate("read stats"), self._read(snapshot=True) as conn:
            count = int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(events)
                ).scalar_one()
            )
            last = int(
                conn.execute(sa.select(sa.func.max(events.c.position))).scalar() or 0
            )
            by_state = {
                str(state): int(n)
                for state, n in conn.execute(
                    sa.select(sandboxes.c.state, sa.func.count()).group_by(
                        sandboxes.c.state
                    )
                )
            }
            extra: dict[str, Any] = {
                "backend": self._backend,
                "sandboxes_by_state": by_state,
            }
            for name, table in (
                ("network_slots", network_slots),
                ("resources", resources),
                ("commands", commands),
            ):
                extra[name] = int(
                    conn.execute(
                        sa.select(sa.func.count()).select_from(table)
                    ).scalar_one()
                )
        return StoreStats(
            events=count,
            streams=sum(by_state.values()),
            last_position=last,
            extra=extra,
        )

    def close(self) -> None:
        """Stop the listener and close every pooled connection. Idempotent."""
        with self._listener_lock:
            if self._listener is not None:
                self._listener.stop()
                self._listener = None
        self._append_engine.dispose()
        self._engine.dispose()


def _scan_sql(dialect: sa.Dialect, after: int, limit: int) -> str:
    """One keyset batch of the log as plain SQL (integers only, inlined)."""
    stmt = (
        sa.select(*RAW_EVENT_COLUMNS)
        .where(events.c.position > int(after))
        .order_by(events.c.position)
        .limit(int(limit))
    )
    return str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def _first_at(when: datetime) -> sa.ScalarSelect[Any]:
    """The first position after the ``times_ordered_after`` mark recorded at or
    after ``when``, in time order (one probe of ``ix_events_recorded_at``)."""
    return (
        sa.select(events.c.position)
        .where(events.c.recorded_at >= when, events.c.position > log_marks.c.position)
        .order_by(events.c.recorded_at, events.c.position)
        .limit(1)
        .scalar_subquery()
    )


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, not {value.isoformat()}")
    return value


class _Decoder:
    """Turns stored event rows into the events a reader sees, upcast.

    The one conversion for every read path. It takes the driver's raw values
    (``RAW_EVENT_COLUMNS``: JSON text or a dict, an ISO string or a
    datetime) because a full scan of a million events is dominated by
    per-row costs: consecutive rows of one append share their time, so the
    last one is reused, and the metadata of recent rows is kept by value
    (a log interleaves many streams, each with few distinct metadata). One
    decoder per read: not shared between threads.
    """

    __slots__ = ("_current", "_metas", "_time", "_time_key")

    def __init__(self) -> None:
        self._current: dict[tuple[str, int], bool] = {}
        self._metas: dict[tuple[Any, ...], Metadata] = {}
        self._time_key: Any = None
        self._time = datetime.min.replace(tzinfo=UTC)

    def __call__(self, row: Sequence[Any]) -> RecordedEvent:
        (
            position,
            stream_id,
            version,
            type_,
            schema_version,
            data,
            actor,
            host_id,
            command_id,
            correlation_id,
            causation_id,
            recorded_at,
        ) = row
        if isinstance(data, str):
            data = _json_text(data)

        key = (type_, schema_version)
        is_current = self._current.get(key)
        if is_current is None:
            is_current = current_version(type_) == schema_version
            self._current[key] = is_current
        if not is_current:
            schema_version, data = upcast(
                stream_id, version, type_, schema_version, data
            )

        meta_key = (actor, host_id, command_id, correlation_id, causation_id)
        meta = self._metas.get(meta_key)
        if meta is None:
            if len(self._metas) >= _METADATA_KEPT:
                self._metas.clear()
            meta = self._metas[meta_key] = Metadata(
                actor=actor,
                correlation_id=correlation_id,
                causation_id=causation_id,
                command_id=command_id,
                host_id=host_id,
            )
        if recorded_at != self._time_key:
            self._time_key = recorded_at
            self._time = _utc(recorded_at)

        return RecordedEvent(
            position,
            stream_id,
            version,
            type_,
            schema_version,
            data,
            meta,
            self._time,
        )


#: Distinct metadata a decoder keeps (a few MiB at most).
_METADATA_KEPT = 50_000

_scan_json = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _json_text(text: str) -> Any:
    """``json.loads`` without its per-call wrappers (JSON we wrote ourselves)."""
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:
        return json.loads(text)  # leading whitespace: let json say what is wrong
    if end != len(text):
        return json.loads(text)
    return value


def _json_value(value: str | Any) -> Any:
    """A JSON column's value: SQLite returns the text, psycopg the parse."""
    return _json_text(value) if isinstance(value, str) else value


def _utc(value: str | datetime) -> datetime:
    """A stored time as aware UTC (SQLite keeps naive UTC text)."""
    if isinstance(value, str):
        if len(value) == 26 and value[19] == ".":
            # The fixed width SQLite keeps (``YYYY-MM-DD HH:MM:SS.ffffff``):
            # parsed with its zone, several times faster than adding it after.
            return datetime.fromisoformat(value + "+00:00")
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _decode(rows: Iterable[Sequence[Any]]) -> list[RecordedEvent]:
    decoder = _Decoder()
    return [decoder(row) for row in rows]


class _PgListener:
    """One dedicated connection that LISTENs for appends and wakes waiters.

    A daemon thread owns the connection; ``wait`` blocks on a condition until
    a notification names a position past the one asked for. If the
    connection fails, ``failed`` turns true and callers fall back to polling.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._latest = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.failed = False
        self._thread = threading.Thread(
            target=self._run, name="wrenn-engine-listen", daemon=True
        )
        self._thread.start()

    def ready(self) -> bool:
        """Wait (briefly) until LISTEN is active; False if it failed."""
        self._ready.wait(BUSY_TIMEOUT_S)
        return self._ready.is_set() and not self.failed

    def wait(self, after_position: int, deadline: float) -> bool:
        with self._cond:
            while self._latest <= after_position and not self.failed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._latest > after_position

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        cargs, cparams = self._engine.dialect.create_connect_args(self._engine.url)
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = psycopg.connect(*cargs, **cparams, autocommit=True)
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self._ready.set()
            while not self._stop.is_set():
                for note in conn.notifies(timeout=0.5):
                    position = int(note.payload)
                    with self._cond:
                        if position > self._latest:
                            self._latest = position
                            self._cond.notify_all()
        except (psycopg.Error, ValueError) as exc:
            if not self._stop.is_set():
                logger.warning(
                    "listening for new events failed, polling instead: %s", exc
                )
            with self._cond:
                self.failed = True
                self._cond.notify_all()
        finally:
            self._ready.set()
            if conn is not None:
                conn.close()
