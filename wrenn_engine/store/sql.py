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

Projections (``sandboxes``, ``network_slots``, ``resources``) are written in
the append's transaction by folding the new events onto the stored snapshot
with ``wrenn_engine.domain.state.evolve``. Every read passes stored rows
through ``wrenn_engine.domain.upcasting.upcast``.

Driver errors become StoreErrors in exactly one place: ``_translate``.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
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
    commands,
    events,
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


# --- error translation ----------------------------------------------------------

Conflict = Callable[[str], StoreError | None]
_DRIVER_ERRORS = (sa.exc.SQLAlchemyError, sqlite3.Error, psycopg.Error)


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
    except sa.exc.IntegrityError as exc:
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


def _constraint_name(exc: sa.exc.IntegrityError) -> str:
    diag = getattr(exc.orig, "diag", None)
    name = getattr(diag, "constraint_name", None)
    if name:
        return str(name)
    message = str(exc.orig)
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

    # --- append -------------------------------------------------------------

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

        # Refuse unknown types before anything is written; fold the shape
        # a reader will see.
        payloads = [_json_clean(e.data) for e in events]
        shapes = [
            upcast(stream_id, expected_version + i, e.type, e.schema_version, data)
            for i, (e, data) in enumerate(zip(events, payloads, strict=True), 1)
        ]

        attempt = _Attempt(stream_id, expected_version, command_id, command)
        conflict = partial(self._conflict, attempt=attempt)
        with _translate("append", conflict), self._write() as conn:
            if command_id is not None:
                earlier = self._replay(conn, command_id, stream_id, command)
                if earlier is not None:
                    logger.debug(
                        "sandbox %s: command %s already applied", stream_id, command_id
                    )
                    return earlier

            actual = self._stream_version(conn, stream_id)
            if actual != expected_version:
                raise ConcurrencyError(stream_id, expected_version, actual)

            # A host stream (reconcile's record) is no sandbox: no projection.
            project = is_sandbox_stream(stream_id)
            state, before = (
                self._projected_state(conn, stream_id, actual)
                if project
                else (None, None)
            )
            now = datetime.now(UTC)
            rows = [
                {
                    "stream_id": stream_id,
                    "version": expected_version + i,
                    "type": e.type,
                    "schema_version": e.schema_version,
                    "data": data,
                    "actor": metadata.actor,
                    "host_id": metadata.host_id,
                    "command_id": metadata.command_id,
                    "correlation_id": metadata.correlation_id,
                    "causation_id": metadata.causation_id,
                    "recorded_at": now,
                }
                for i, (e, data) in enumerate(zip(events, payloads, strict=True), 1)
            ]
            positions = self._insert_events(conn, rows)

            if project:
                for row, position, (schema_version, data) in zip(
                    rows, positions, shapes, strict=True
                ):
                    state = evolve(
                        state,
                        RecordedEvent(
                            position=position,
                            stream_id=stream_id,
                            version=row["version"],
                            type=row["type"],
                            schema_version=schema_version,
                            data=data,
                            metadata=metadata,
                            recorded_at=now,
                        ),
                    )
                assert state is not None
                self._write_projection(conn, before, state, attempt)

            result = AppendResult(
                stream_id, expected_version + len(rows), positions[0], positions[-1]
            )
            if command_id is not None:
                conn.execute(
                    sa.insert(commands),
                    {
                        "command_id": command_id,
                        "stream_id": stream_id,
                        "command": command,
                        "first_position": result.first_position,
                        "last_position": result.last_position,
                        "recorded_at": now,
                    },
                )
            if self._is_pg:
                conn.execute(
                    sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, str(positions[-1])))
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

    def _insert_events(self, conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
        if len(rows) == 1:
            key = conn.execute(sa.insert(events), rows[0]).inserted_primary_key
            assert key is not None
            return [int(key[0])]
        stmt = sa.insert(events).returning(
            events.c.position, sort_by_parameter_order=True
        )
        return [int(p) for p in conn.execute(stmt, rows).scalars()]

    def _stream_version(self, conn: Connection, stream_id: str) -> int:
        stmt = sa.select(sa.func.max(events.c.version)).where(
            events.c.stream_id == stream_id
        )
        return int(conn.execute(stmt).scalar() or 0)

    def _replay(
        self, conn: Connection, command_id: str, stream_id: str, command: str
    ) -> AppendResult | None:
        """The earlier result of ``command_id``, or None if it is new."""
        row = conn.execute(
            sa.select(commands).where(commands.c.command_id == command_id)
        ).first()
        if row is None:
            return None
        if row.stream_id != stream_id or row.command != command:
            raise IdempotencyError(
                command_id,
                f"{row.command or 'a command'} on sandbox {row.stream_id}",
                f"{command or 'a command'} on sandbox {stream_id}",
            )
        version = conn.execute(
            sa.select(events.c.version).where(events.c.position == row.last_position)
        ).scalar_one()
        return AppendResult(
            row.stream_id,
            int(version),
            int(row.first_position),
            int(row.last_position),
            replayed=True,
        )

    def _projected_state(
        self,
        conn: Connection,
        stream_id: str,
        version: int,
    ) -> tuple[SandboxState | None, SandboxState | None]:
        """The state at ``version`` to fold onto, and the one the tables show.

        Normally both are the stored snapshot. When the snapshot lags the
        log (events written by other means), the stream is folded afresh and
        the tables are brought in line by the diff.
        """
        row = conn.execute(
            sa.select(sandboxes.c.version, sandboxes.c.snapshot).where(
                sandboxes.c.id == stream_id
            )
        ).first()
        stored = SandboxState.from_dict(row.snapshot) if row is not None else None
        if (stored.version if stored else 0) == version:
            # evolve mutates its state, and from_dict shares the snapshot's
            # dicts: the picture of the tables needs its own copy.
            before = (
                SandboxState.from_dict(copy.deepcopy(row.snapshot)) if row else None
            )
            return stored, before

        logger.warning(
            "sandbox %s: projection at version %s but the log at %d; "
            "folding the stream afresh",
            stream_id,
            stored.version if stored else "none",
            version,
        )
        stmt = (
            sa.select(*RAW_EVENT_COLUMNS)
            .where(events.c.stream_id == stream_id, events.c.version <= version)
            .order_by(events.c.version)
        )
        state = fold(_decode(conn.execute(stmt)))
        return state, stored

    def _write_projection(
        self,
        conn: Connection,
        before: SandboxState | None,
        after: SandboxState,
        attempt: _Attempt,
    ) -> None:
        row = _sandbox_row(after)
        if before is None:
            conn.execute(sa.insert(sandboxes), row)
        else:
            conn.execute(
                sa.update(sandboxes).where(sandboxes.c.id == after.id),
                {k: v for k, v in row.items() if k != "id"},
            )

        old_slots = _slot_rows(before) if before is not None else {}
        new_slots = _slot_rows(after)
        gone = [k for k in old_slots if k not in new_slots]
        if gone:
            conn.execute(
                sa.delete(network_slots).where(
                    network_slots.c.sandbox_id == after.id,
                    sa.tuple_(network_slots.c.host_id, network_slots.c.slot).in_(gone),
                )
            )
        claims: list[tuple[str, int]] = []
        for host_id, slot in (k for k in new_slots if k not in old_slots):
            holder = self._slot_holder(conn, host_id, slot)
            if holder is not None and holder != after.id:
                raise SlotTaken(host_id, slot, holder)
            if holder is None:
                claims.append((host_id, slot))
        if claims:
            attempt.claimed_slots = claims
            conn.execute(
                sa.insert(network_slots),
                [{"host_id": h, "slot": s, "sandbox_id": after.id} for h, s in claims],
            )

        old_res = _resource_rows(before) if before is not None else {}
        new_res = _resource_rows(after)
        if old_res == new_res:
            return
        gone_res = [k for k in old_res if k not in new_res]
        if gone_res:
            conn.execute(
                sa.delete(resources).where(
                    resources.c.sandbox_id == after.id,
                    sa.tuple_(resources.c.kind, resources.c.name).in_(gone_res),
                )
            )
        added = [
            {"sandbox_id": after.id, "kind": k, "name": n, "host_id": h, "status": s}
            for (k, n), (h, s) in new_res.items()
            if (k, n) not in old_res
        ]
        if added:
            conn.execute(sa.insert(resources), added)
        changed = [
            {"b_kind": k, "b_name": n, "b_host": h, "b_status": s}
            for (k, n), (h, s) in new_res.items()
            if (k, n) in old_res and old_res[(k, n)] != (h, s)
        ]
        if changed:
            conn.execute(
                sa.update(resources)
                .where(
                    resources.c.sandbox_id == after.id,
                    resources.c.kind == sa.bindparam("b_kind"),
                    resources.c.name == sa.bindparam("b_name"),
                )
                .values(
                    host_id=sa.bindparam("b_host"), status=sa.bindparam("b_status")
                ),
                changed,
            )

    def _slot_holder(self, conn: Connection, host_id: str, slot: int) -> str | None:
        return conn.execute(
            sa.select(network_slots.c.sandbox_id).where(
                network_slots.c.host_id == host_id, network_slots.c.slot == slot
            )
        ).scalar()

    def _conflict(self, constraint: str, attempt: _Attempt) -> StoreError | None:
        """The typed error behind a constraint violation of an append.

        The explicit checks in ``append`` come first and normally answer; a
        violation means someone wrote without taking the append lock.
        """
        if constraint == "uq_events_stream_version":
            with self._read() as conn:
                actual = self._stream_version(conn, attempt.stream_id)
            return ConcurrencyError(attempt.stream_id, attempt.expected_version, actual)
        if constraint == "pk_commands" and attempt.command_id is not None:
            return IdempotencyError(
                attempt.command_id,
                "another append that committed first",
                f"{attempt.command or 'a command'} on sandbox {attempt.stream_id}",
            )
        if constraint == "pk_network_slots":
            with self._read() as conn:
                for host_id, slot in attempt.claimed_slots:
                    holder = self._slot_holder(conn, host_id, slot)
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
        stmt = sa.select(*RAW_EVENT_COLUMNS).where(
            events.c.position > query.after_position
        )
        if query.sandbox_ids:
            stmt = stmt.where(events.c.stream_id.in_(list(query.sandbox_ids)))
        if query.types:
            stmt = stmt.where(events.c.type.in_(list(query.types)))
        if query.actors:
            stmt = stmt.where(events.c.actor.in_(list(query.actors)))
        if query.host_ids:
            stmt = stmt.where(events.c.host_id.in_(list(query.host_ids)))
        if query.since is not None:
            stmt = stmt.where(events.c.recorded_at >= _aware(query.since, "since"))
        if query.until is not None:
            stmt = stmt.where(events.c.recorded_at < _aware(query.until, "until"))
        stmt = stmt.order_by(events.c.position).limit(query.limit)
        with _translate("query events"), self._read() as conn:
            rows = conn.execute(stmt).all()
        return _decode(rows)

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
            if rows.sandboxes:
                conn.execute(sa.insert(sandboxes), list(rows.sandboxes.values()))
            if rows.slots:
                conn.execute(
                    sa.insert(network_slots),
                    [
                        {"host_id": h, "slot": s, "sandbox_id": sid}
                        for (h, s), sid in rows.slots.items()
                    ],
                )
            if rows.resources:
                conn.execute(
                    sa.insert(resources),
                    [
                        {
                            "sandbox_id": sid,
                            "kind": k,
                            "name": n,
                            "host_id": h,
                            "status": st,
                        }
                        for (sid, k, n), (h, st) in rows.resources.items()
                    ],
                )
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
                    stream_id = recorded.stream_id
                    if is_sandbox_stream(stream_id):
                        states[stream_id] = evolve(states.get(stream_id), recorded)
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


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, not {value.isoformat()}")
    return value


class _Decoder:
    """Turns stored event rows into the events a reader sees, upcast.

    The one conversion for every read path. It takes the driver's raw values
    (``RAW_EVENT_COLUMNS``: JSON text or a dict, an ISO string or a
    datetime) because a full scan of a million events is dominated by
    per-row costs; consecutive rows of one append share their time and
    metadata, so the last of each is reused. One decoder per read: not
    shared between threads.
    """

    __slots__ = ("_current", "_meta", "_meta_key", "_time", "_time_key")

    def __init__(self) -> None:
        self._current: dict[tuple[str, int], bool] = {}
        self._meta_key: tuple[Any, ...] | None = None
        self._meta = Metadata()
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
        if meta_key != self._meta_key:
            self._meta_key = meta_key
            self._meta = Metadata(
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
            self._meta,
            self._time,
        )


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


def _utc(value: str | datetime) -> datetime:
    """A stored time as aware UTC (SQLite keeps naive UTC text)."""
    if isinstance(value, str):
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
