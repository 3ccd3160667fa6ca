"""Section 1: appends, one event per durable transaction and batches of 100.

Three contenders per backend, each on a database of its own in the same
place, with the same durability:

- ``engine``: ``SqlEventStore.append`` with the expected version (the
  version check, the projection rows, on PostgreSQL the advisory lock and
  the NOTIFY all included: that is what an append costs);
- ``plain``: the plain driver (``sqlite3`` / ``psycopg``) inserting the same
  rows into the same migrated ``events`` table, one transaction per append,
  with the pragmas the store's own connections report (journal mode,
  synchronous, busy timeout); optimistic concurrency comes from the unique
  (stream, version) index alone. This is the floor;
- ``eventsourcing``: the library's application recorder (its own table and
  transaction handling) with the same pragmas.

Every contender serializes the same event data to JSON inside its timed
call. The contenders take turns, one fresh stream each, in rotating order, so
a burst of load from another process hits them alike. The figure is the
median time of one append divided by the events it carried (the median,
because the disk's flush time varies with what other processes write).
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from wrenn_engine.bench import dataset
from wrenn_engine.bench.common import (
    PgDatabase,
    Scratch,
    SectionSkipped,
    Sizes,
    percentile,
    pg_scratch_database,
    settle,
    sqlite_url,
)
from wrenn_engine.bench.profiling import hot_spots
from wrenn_engine.bench.report import Figure, Report, ratio_goal
from wrenn_engine.domain.events import Metadata, NewEvent
from wrenn_engine.store import open_store
from wrenn_engine.store.base import EventStore

log = logging.getLogger(__name__)

SECTION = "append"
HOST_ID = "bench-host"

_COLUMNS = ("stream_id, version, type, schema_version, data, actor, host_id, "
            "command_id, correlation_id, causation_id, recorded_at")


@dataclass(slots=True)
class Stream:
    """One fresh stream's events, prepared before the clock starts."""

    stream_id: str
    uid: uuid.UUID
    events: list[NewEvent]
    metadata: Metadata


class Contender:
    """One way of appending; subclasses for each contender and backend."""

    name = ""

    def append(self, stream: Stream, after: int, events: list[NewEvent]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


@dataclass
class Timings:
    """Per-append seconds and the events they carried, per contender."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, latency: float, events: int) -> None:
        self.latencies.setdefault(name, []).append(latency)
        self.events[name] = self.events.get(name, 0) + events
        self.seconds[name] = self.seconds.get(name, 0.0) + latency

    def us_per_event(self, name: str) -> float:
        """The median append's microseconds per event."""
        per_append = self.events[name] / len(self.latencies[name])
        return percentile(self.latencies[name], 50) / per_append * 1e6


# --- payloads -----------------------------------------------------------------------


class Payloads:
    """Realistic streams: the template lifecycle with the ids rewritten, and
    a network slot of its own per stream so streams never contend for one."""

    def __init__(self, template: dataset.Template) -> None:
        self.template = template
        self._count = 0

    def stream(self, length: int) -> Stream:
        self._count += 1
        index = self._count
        sid = dataset.sandbox_id(index)
        events = dataset.template_payloads(self.template.long_stream(length), sid,
                                           slot=index)
        metadata = Metadata(actor="api", correlation_id=uuid.uuid4().hex[:16],
                            host_id=HOST_ID)
        return Stream(sid, uuid.uuid4(), events, metadata)


# --- SQLite contenders --------------------------------------------------------------


def _sqlite_pragmas(store: EventStore) -> list[str]:
    """The pragmas the store's own connections run with, as statements."""
    engine = getattr(store, "engine", None)
    if engine is None:
        raise SectionSkipped("the store exposes no SQLAlchemy engine to read its "
                             "pragmas from")
    with engine.connect() as conn:
        read = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout")}
    sync = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[int(read["synchronous"])]
    return [f"PRAGMA journal_mode = {read['journal_mode']}",
            f"PRAGMA synchronous = {sync}",
            f"PRAGMA busy_timeout = {int(read['busy_timeout'])}"]


def _sqlite_time(value: datetime) -> str:
    """A time as the store keeps it in SQLite: naive UTC text."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


class EngineContender(Contender):
    name = "engine"

    def __init__(self, store: EventStore) -> None:
        self.store = store

    def append(self, stream: Stream, after: int, events: list[NewEvent]) -> None:
        self.store.append(stream.stream_id, events, expected_version=after,
                          metadata=stream.metadata)

    def close(self) -> None:
        self.store.close()


class PlainSqlite(Contender):
    name = "plain"

    def __init__(self, path: str, pragmas: list[str]) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None,
                                    check_same_thread=False)
        for pragma in pragmas:
            self.conn.execute(pragma)
        self.sql = (f"INSERT INTO events ({_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

    def append(self, stream: Stream, after: int, events: list[NewEvent]) -> None:
        meta = stream.metadata
        now = _sqlite_time(datetime.now(UTC))
        rows = [
            (stream.stream_id, after + i, e.type, e.schema_version, json.dumps(e.data),
             meta.actor, meta.host_id, meta.command_id, meta.correlation_id,
             meta.causation_id, now)
            for i, e in enumerate(events, 1)
        ]
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(self.sql, rows)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


def _es_sqlite_recorder(path: str, pragmas: list[str]) -> Any:
    """eventsourcing's SQLite application recorder, with the store's pragmas
    run on every connection its pool opens."""
    from eventsourcing.sqlite import (
        SQLiteApplicationRecorder,
        SQLiteConnection,
        SQLiteConnectionPool,
        SQLiteDatastore,
    )

    class Pool(SQLiteConnectionPool):
        def _create_connection(self) -> SQLiteConnection:
            connection = super()._create_connection()
            for pragma in pragmas:
                connection._sqlite_conn.execute(pragma)
            return connection

    datastore = SQLiteDatastore(path)
    datastore.pool.close()
    datastore.pool = Pool(db_name=path)
    recorder = SQLiteApplicationRecorder(datastore)
    recorder.create_table()
    return recorder


class EsContender(Contender):
    name = "eventsourcing"

    def __init__(self, recorder: Any) -> None:
        from eventsourcing.persistence import StoredEvent

        self.recorder = recorder
        self.stored = StoredEvent

    def append(self, stream: Stream, after: int, events: list[NewEvent]) -> None:
        self.recorder.insert_events([
            self.stored(originator_id=stream.uid, originator_version=after + i,
                        topic=e.type, state=json.dumps(e.data).encode())
            for i, e in enumerate(events, 1)
        ])

    def close(self) -> None:
        self.recorder.datastore.close()


def _sqlite_contenders(scratch: Scratch) -> tuple[list[Contender], list[str]]:
    base = scratch.mkdir("append-sqlite")
    contenders: list[Contender] = []
    try:
        store = open_store(sqlite_url(f"{base}/engine.db"), auto_upgrade=True)
        contenders.append(EngineContender(store))
        pragmas = _sqlite_pragmas(store)
        open_store(sqlite_url(f"{base}/plain.db"), auto_upgrade=True).close()
        contenders.append(PlainSqlite(f"{base}/plain.db", pragmas))
        contenders.append(EsContender(_es_sqlite_recorder(f"{base}/es.db", pragmas)))
    except BaseException:
        for contender in contenders:
            contender.close()
        raise
    return contenders, pragmas


# --- PostgreSQL contenders ----------------------------------------------------------


class PlainPg(Contender):
    name = "plain"

    def __init__(self, db: PgDatabase) -> None:
        import psycopg

        self.conn = psycopg.connect(**db.conninfo)
        self.sql = (f"INSERT INTO events ({_COLUMNS}) "
                    "VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s)")

    def append(self, stream: Stream, after: int, events: list[NewEvent]) -> None:
        meta = stream.metadata
        now = datetime.now(UTC)
        rows = [
            (stream.stream_id, after + i, e.type, e.schema_version, json.dumps(e.data),
             meta.actor, meta.host_id, meta.command_id, meta.correlation_id,
             meta.causation_id, now)
            for i, e in enumerate(events, 1)
        ]
        with self.conn.transaction(), self.conn.cursor() as cur:
            if len(rows) == 1:
                cur.execute(self.sql, rows[0], prepare=True)
            else:
                cur.executemany(self.sql, rows)

    def close(self) -> None:
        self.conn.close()


def _es_pg_recorder(db: PgDatabase) -> Any:
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    info = db.conninfo
    datastore = PostgresDatastore(
        dbname=info["dbname"], host=info["host"], port=info["port"],
        user=info["user"], password=info.get("password", ""), pool_size=1,
    )
    recorder = PostgresApplicationRecorder(datastore)
    recorder.create_table()
    return recorder


def _pg_contenders(scratch: Scratch, admin_url: str) -> list[Contender]:
    contenders: list[Contender] = []
    try:
        engine_db = pg_scratch_database(scratch, admin_url)
        contenders.append(EngineContender(open_store(engine_db.url, auto_upgrade=True)))
        plain_db = pg_scratch_database(scratch, admin_url)
        open_store(plain_db.url, auto_upgrade=True).close()
        contenders.append(PlainPg(plain_db))
        es_db = pg_scratch_database(scratch, admin_url)
        contenders.append(EsContender(_es_pg_recorder(es_db)))
    except BaseException:
        for contender in contenders:
            contender.close()
        raise
    return contenders


# --- the race ---------------------------------------------------------------------


def _race(contenders: list[Contender], payloads: Payloads, *, appends: int,
          batch: int) -> Timings:
    """Each contender appends ``appends`` times ``batch`` events.

    The contenders take turns one fresh stream at a time, in rotating order
    (single events: a stream of 18, one event per transaction; batches: one
    stream of ``batch`` events in one transaction), so a burst of load from
    another process lands on all of them alike.
    """
    timings = Timings()
    stream_length = 18 if batch == 1 else batch
    done = dict.fromkeys((c.name for c in contenders), 0)
    settle()
    turn = 0
    while any(n < appends for n in done.values()):
        shift = turn % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            stream = payloads.stream(stream_length)
            after = 0
            for i in range(0, len(stream.events), batch):
                if done[contender.name] >= appends:
                    break
                chunk = stream.events[i:i + batch]
                start = time.perf_counter()
                contender.append(stream, after, chunk)
                timings.add(contender.name, time.perf_counter() - start, len(chunk))
                after += len(chunk)
                done[contender.name] += 1
        turn += 1
    return timings


def _figures(report: Report, backend: str, mode: str, timings: Timings,
             note: str) -> None:
    ours = timings.us_per_event("engine")
    plain = timings.us_per_event("plain")
    es = timings.us_per_event("eventsourcing")
    name = f"{backend} {mode}"
    report.add(Figure(
        SECTION, f"{name}: engine vs plain driver", ours, "us/event",
        f"plain {'sqlite3' if backend == 'sqlite' else 'psycopg'}, same table "
        "and durability", plain,
        goal=ratio_goal("<=", 1.5, "within 1.5x of the plain driver"), note=note,
    ))
    report.add(Figure(
        SECTION, f"{name}: engine vs eventsourcing", ours, "us/event",
        f"eventsourcing {'SQLite' if backend == 'sqlite' else 'PostgreSQL'} "
        "application recorder", es,
        goal=ratio_goal("<=", 1.0, "at least as fast as eventsourcing"),
    ))
    if mode == "single":
        report.add(Figure(
            SECTION, f"{name}: engine p99 latency",
            percentile(timings.latencies["engine"], 99) * 1e3, "ms",
            "plain driver p99", percentile(timings.latencies["plain"], 99) * 1e3,
        ))


def _run_backend(report: Report, sizes: Sizes, backend: str,
                 make: Callable[[], list[Contender]], payloads: Payloads,
                 note: str, profile: bool) -> None:
    contenders = make()
    try:
        for mode, appends, batch in (("single", sizes.append_single, 1),
                                     (f"batch {sizes.batch_size}",
                                      sizes.append_batches, sizes.batch_size)):
            # One untimed append each: connections, statement caches, schema.
            _race(contenders, payloads, appends=1, batch=batch)
            timings = _race(contenders, payloads, appends=appends, batch=batch)
            _figures(report, backend, mode, timings, note)
            if profile and any(f.met is False for f in report.figures[-3:]):
                report.findings.append(hot_spots(
                    functools.partial(_race, contenders[:1], payloads,
                                      appends=max(10, appends // 4), batch=batch),
                    f"the engine's appends on {backend}, {mode}"))
    finally:
        for contender in contenders:
            contender.close()


def run(report: Report, scratch: Scratch, sizes: Sizes, template: dataset.Template,
        pg_admin_url: str, profile: bool = False) -> None:
    """Append figures on SQLite, then on PostgreSQL (skipped with a reason
    when the server cannot be reached)."""
    payloads = Payloads(template)
    holder: dict[str, list[str]] = {}

    def sqlite() -> list[Contender]:
        contenders, pragmas = _sqlite_contenders(scratch)
        holder["pragmas"] = pragmas
        return contenders

    _run_backend(report, sizes, "sqlite", sqlite, payloads,
                 note="SQLite file in " + scratch.root, profile=profile)
    log.info("sqlite pragmas used by every contender: %s", holder.get("pragmas"))
    if holder.get("pragmas"):
        report.findings.append("append on SQLite: every contender ran with "
                               + "; ".join(holder["pragmas"]))

    try:
        _run_backend(report, sizes, "postgresql",
                     lambda: _pg_contenders(scratch, pg_admin_url), payloads,
                     note="PostgreSQL on loopback, synchronous_commit as the server "
                          "sets it", profile=profile)
    except SectionSkipped as exc:
        report.skip(f"{SECTION} postgresql", str(exc))
