"""Alembic owns the schema: up, down and up again on both backends, with data;
the store refuses (or, for the embedded default, fixes) a schema behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tests.store.builders import meta, new_sandbox, started, take_slot
from wrenn_engine.domain.events import ReconcileActed, host_stream
from wrenn_engine.errors import ConfigError, SchemaError, StoreError
from wrenn_engine.store import EventQuery, SqlEventStore, open_store
from wrenn_engine.store.migrate import (
    check_schema,
    current_revision,
    downgrade,
    head_revision,
    script_location,
    upgrade,
)
from wrenn_engine.store.schema import (
    TIMES_ORDERED_AFTER,
    VERSION_TABLE,
    events,
    log_marks,
    metadata,
)

TABLES = {
    "events",
    "commands",
    "sandboxes",
    "network_slots",
    "resources",
    "log_marks",
}
REPO = Path(__file__).resolve().parents[2]


def _tables(raw: sa.Engine) -> set[str]:
    return set(sa.inspect(raw).get_table_names())


def _event_indexes(raw: sa.Engine) -> set[str]:
    return {str(ix["name"]) for ix in sa.inspect(raw).get_indexes("events")}


def test_an_empty_database_is_behind_until_upgraded(db_url: str) -> None:
    assert current_revision(db_url) is None

    with pytest.raises(SchemaError) as caught:
        check_schema(db_url)
    assert (caught.value.current, caught.value.head) == (None, head_revision())
    assert f"wrenn-engine --db {caught.value.url} db upgrade" in str(caught.value)
    with pytest.raises(SchemaError, match="db upgrade"):
        open_store(db_url)

    upgrade(db_url)
    assert current_revision(db_url) == head_revision() == "0003"
    check_schema(db_url)


def test_up_down_up_keeps_the_data_and_base_drops_it(
    db_url: str,
    raw: sa.Engine,
) -> None:
    upgrade(db_url)
    with closing(open_store(db_url)) as store:
        take_slot(store, "sb1", 3)
        new_sandbox(store, "sb2")
        log = list(store.read_all())
        sb1 = store.get_sandbox("sb1")

    assert _times_ordered_after(raw) == 0  # the store kept times in order
    downgrade(db_url, "0001")
    assert current_revision(db_url) == "0001"
    assert "ix_events_correlation_position" not in _event_indexes(raw)
    assert "log_marks" not in _tables(raw)
    with raw.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM events")).scalar() == 6
    with pytest.raises(SchemaError) as behind:
        open_store(db_url)
    assert behind.value.current == "0001"

    upgrade(db_url)
    assert "ix_events_correlation_position" in _event_indexes(raw)
    assert _times_ordered_after(raw) == 0
    with closing(open_store(db_url)) as store:
        assert list(store.read_all()) == log
        assert store.get_sandbox("sb1") == sb1
        assert store.network_slots("h1") == {3: "sb1"}
        assert store.verify_projections() == []
        store.append("sb2", [started()], expected_version=1, metadata=meta())

    downgrade(db_url, "base")
    assert current_revision(db_url) is None
    assert _tables(raw) & TABLES == set()

    upgrade(db_url)
    assert _tables(raw) >= TABLES
    with closing(open_store(db_url)) as store:
        assert store.last_position() == 0
        new_sandbox(store, "sb3")
        assert [e.version for e in store.read_stream("sb3")] == [1]


def _times_ordered_after(raw: sa.Engine) -> int | None:
    with raw.connect() as conn:
        return conn.execute(
            sa.select(log_marks.c.position).where(
                log_marks.c.name == TIMES_ORDERED_AFTER
            )
        ).scalar()


def test_0003_marks_where_an_older_log_goes_back_in_time(
    db_url: str,
    raw: sa.Engine,
) -> None:
    """A log written before 0003 may go back in time (a clock stepped back,
    hosts that disagree). The upgrade marks the position before the last
    place where it does; time queries stay exact on both sides of the mark,
    and appends from then on keep time in order. Down and up keep the events
    and find the same mark."""
    upgrade(db_url, "0002")
    t0 = datetime(2024, 5, 1, 12, tzinfo=UTC)
    minutes = [0, 1, 2, 5, 3, 4, 4, 6, 7]  # back in time at the fifth event
    with raw.begin() as conn:
        conn.execute(
            sa.insert(events),
            [
                {
                    "stream_id": host_stream("h1"),
                    "version": version,
                    "type": "reconcile.acted",
                    "schema_version": 1,
                    "data": {"action": "finished", "detail": str(m)},
                    "actor": "old-engine",
                    "host_id": "h1",
                    "recorded_at": t0 + timedelta(minutes=m),
                }
                for version, m in enumerate(minutes, 1)
            ],
        )

    upgrade(db_url)
    with closing(open_store(db_url)) as store:
        log = list(store.read_all())
        assert _times_ordered_after(raw) == log[3].position  # the 5-minute event
        store.append(
            host_stream("h1"),
            [ReconcileActed("finished").to_new()],
            expected_version=len(minutes),
            metadata=meta(),
        )
        log = list(store.read_all())
        assert log[-1].recorded_at >= log[-2].recorded_at

        bounds = [
            None,
            *(t0 + timedelta(minutes=m, seconds=s) for m in range(9) for s in (0, 30)),
        ]
        for since in bounds:
            for until in bounds:
                for limit in (1, 3, 100):
                    query = EventQuery(since=since, until=until, limit=limit)
                    expected = [
                        e.position
                        for e in log
                        if (since is None or e.recorded_at >= since)
                        and (until is None or e.recorded_at < until)
                    ][:limit]
                    got = [e.position for e in store.query(query)]
                    assert got == expected, (since, until, limit)
        # Pages of one event walk across the mark in position order.
        window = EventQuery(since=t0 + timedelta(minutes=3), limit=1)
        pages: list[int] = []
        while page := store.query(
            replace(window, after_position=pages[-1] if pages else 0)
        ):
            pages += [e.position for e in page]
        assert pages == [
            e.position for e in log if e.recorded_at >= t0 + timedelta(minutes=3)
        ]
        # Without the mark, nothing is assumed about the order of times.
        with raw.begin() as conn:
            conn.execute(sa.delete(log_marks))
        for since in bounds[::3]:
            query = EventQuery(since=since, until=t0 + timedelta(minutes=5))
            assert store.query(query) == [
                e
                for e in log
                if (since is None or e.recorded_at >= since)
                and e.recorded_at < t0 + timedelta(minutes=5)
            ]

    downgrade(db_url, "0002")
    assert "log_marks" not in _tables(raw)
    with raw.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM events")).scalar() == 10
    upgrade(db_url)
    assert _times_ordered_after(raw) == log[3].position


def test_schema_module_matches_the_migrations(db_url: str, raw: sa.Engine) -> None:
    upgrade(db_url)

    with raw.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
        )
        assert compare_metadata(context, metadata) == []


UPGRADER = """
import os, sys, time
from wrenn_engine.store.migrate import upgrade
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.005)
upgrade(sys.argv[1])
"""


def test_concurrent_upgrades_of_a_fresh_database_all_succeed(
    db_url: str,
    tmp_path: Path,
) -> None:
    """Two processes and two threads upgrade one fresh database at once."""
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", UPGRADER, db_url, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            upgrade(db_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert errors == []
    for proc, (_out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    assert current_revision(db_url) == head_revision()


def test_an_unknown_revision_is_a_store_error(db_url: str) -> None:
    with pytest.raises(StoreError) as caught:
        upgrade(db_url, "0099")
    assert "0099" in str(caught.value)
    assert caught.value.__cause__ is not None


def test_revisions_come_from_the_source_tree() -> None:
    assert script_location() == REPO / "migrations"


# --- open_store ------------------------------------------------------------------


def test_the_embedded_default_makes_its_directory_and_schema(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "state" / "wrenn"
    monkeypatch.setenv("WRENN_ENGINE_HOME", str(home))
    monkeypatch.delenv("WRENN_ENGINE_DB", raising=False)

    with closing(open_store()) as store:
        new_sandbox(store, "sb1")
        assert store.url == f"sqlite:///{home / 'engine.db'}"

    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert (home / "engine.db").is_file()
    assert current_revision(f"sqlite:///{home / 'engine.db'}") == head_revision()
    with closing(open_store()) as again:
        assert len(again.read_stream("sb1")) == 1

    monkeypatch.setenv("WRENN_ENGINE_HOME", str(tmp_path / "other"))
    with pytest.raises(SchemaError):
        open_store(auto_upgrade=False)


def test_a_database_named_by_the_environment_is_explicit(
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WRENN_ENGINE_DB", db_url)

    with pytest.raises(SchemaError, match="db upgrade"):
        open_store()
    with closing(open_store(auto_upgrade=True)) as store:
        assert store.url == db_url
        assert store.last_position() == 0


def test_an_in_memory_store_works_from_many_threads() -> None:
    with closing(open_store("sqlite://")) as store:
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                new_sandbox(store, f"sb{i}")
                store.append(f"sb{i}", [started()], expected_version=1, metadata=meta())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert errors == []
        assert store.stats().events == 16
        assert store.verify_projections() == []


def test_sqlite_settings_and_readers_do_not_block_writers(sqlite_url: str) -> None:
    with closing(open_store(sqlite_url, auto_upgrade=True)) as store:
        assert isinstance(store, SqlEventStore)
        with store.engine.connect() as conn:
            pragma = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in (
                    "journal_mode",
                    "synchronous",
                    "foreign_keys",
                    "busy_timeout",
                )
            }
        assert pragma == {
            "journal_mode": "wal",
            "synchronous": 2,
            "foreign_keys": 1,
            "busy_timeout": 30000,
        }

        new_sandbox(store, "sb1")
        with store._read() as reader:
            reader.execute(sa.text("SELECT count(*) FROM events")).scalar()
            # A read transaction is open: a write still goes straight through.
            store.append("sb1", [started()], expected_version=1, metadata=meta())
            assert reader.execute(sa.text("SELECT count(*) FROM events")).scalar() == 1
        assert len(store.read_stream("sb1")) == 2


def test_unsupported_backends_are_refused() -> None:
    with pytest.raises(ConfigError, match="not supported"):
        SqlEventStore("mysql://user@localhost/db")
