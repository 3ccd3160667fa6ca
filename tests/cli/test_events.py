"""``wrenn-engine events``: filters, keyset pagination, time ranges, --follow."""

from __future__ import annotations

import threading
from datetime import timedelta, timezone
from typing import Any

import pytest

from tests.cli.conftest import Run, append_activity, append_sandbox
from tests.cli.test_commands import EVENT_KEYS
from wrenn_engine.domain.events import ActivityRecorded, Metadata
from wrenn_engine.store import EventStore, open_store
from wrenn_engine.store.sql import SqlEventStore


def build_log(store: EventStore) -> None:
    """Three sandboxes, two actors, two hosts, interleaved."""
    append_sandbox(store, "sb-a", actor="alice", host_id="host-a", activities=2)
    append_sandbox(store, "sb-b", actor="bob", host_id="host-b", activities=1)
    append_activity(store, "sb-a", actor="bob", host_id="host-a")
    append_sandbox(store, "sb-c", actor="alice", host_id="host-b", activities=2)


def keys(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["sandbox_id"], e["version"]) for e in events]


@pytest.mark.both_backends
def test_filters_combine_and_repeat(cli: Run, db: str, store: EventStore) -> None:
    build_log(store)

    def query(*argv: str) -> list[dict[str, Any]]:
        result = cli("--db", db, "events", "--json", *argv)
        assert result.code == 0, result.err
        found: list[dict[str, Any]] = result.json()
        return found

    everything = query()
    assert len(everything) == 9
    assert all(set(e) >= EVENT_KEYS for e in everything)
    positions = [e["position"] for e in everything]
    assert positions == sorted(positions) and len(set(positions)) == 9

    assert keys(query("--sandbox", "sb-b")) == [("sb-b", 1), ("sb-b", 2)]
    assert {
        e["sandbox_id"] for e in query("--sandbox", "sb-a", "--sandbox", "sb-c")
    } == {"sb-a", "sb-c"}
    assert keys(query("--type", "sandbox.created")) == [
        ("sb-a", 1),
        ("sb-b", 1),
        ("sb-c", 1),
    ]
    assert (
        len(query("--type", "sandbox.created", "--type", "sandbox.activity_recorded"))
        == 9
    )
    assert keys(query("--actor", "bob")) == [("sb-b", 1), ("sb-b", 2), ("sb-a", 4)]
    assert keys(query("--host", "host-b", "--actor", "alice")) == [
        ("sb-c", 1),
        ("sb-c", 2),
        ("sb-c", 3),
    ]
    assert query("--sandbox", "sb-a", "--host", "host-b") == []
    assert query("--sandbox", "sb-nosuch") == []

    jsonl = cli("--db", db, "events", "--jsonl", "--actor", "bob").jsonl()
    assert keys(jsonl) == keys(query("--actor", "bob"))
    table = cli("--db", db, "events", "--actor", "bob").out.splitlines()
    assert table[0].split()[:3] == ["POS", "TIME", "(UTC)"]
    assert len(table) == 4


@pytest.mark.both_backends
def test_keyset_pagination_is_stable_while_events_arrive(
    cli: Run,
    db: str,
    store: EventStore,
) -> None:
    append_sandbox(store, "sb-a", activities=4)
    append_sandbox(store, "sb-b")
    # One append of several events: they share a timestamp.
    version = len(store.read_stream("sb-b"))
    store.append(
        "sb-b",
        [ActivityRecorded(f"burst {i}").to_new() for i in range(7)],
        expected_version=version,
        metadata=Metadata(actor="tester"),
    )
    burst = store.read_stream("sb-b")[-7:]
    assert len({e.recorded_at for e in burst}) == 1

    seen: list[dict[str, Any]] = []
    after = 0
    pages = 0
    while True:
        page = cli(
            "--db", db, "events", "--jsonl", "--limit", "3", "--after", str(after)
        ).jsonl()
        if not page:
            break
        pages += 1
        seen += page
        after = page[-1]["position"]
        if pages <= 3:
            # New events land while the reader pages, some behind the reader's
            # filter cursor (same sandbox) and some ahead.
            append_activity(store, "sb-a")
            append_sandbox(store, f"sb-new{pages}")

    final = [e.to_dict() for e in store.read_all()]
    assert [e["position"] for e in seen] == [e["position"] for e in final]
    assert seen == final
    hint = cli("--db", db, "events", "--limit", "2")
    assert f"continue with --after {final[1]['position']}" in hint.err
    last = cli(
        "--db", db, "events", "--limit", "2", "--after", str(final[-2]["position"])
    )
    assert "continue with" not in last.err


@pytest.mark.both_backends
def test_time_filters_take_any_offset(cli: Run, db: str, store: EventStore) -> None:
    append_sandbox(store, "sb-early", activities=2)
    append_sandbox(store, "sb-late", activities=2)
    events = list(store.read_all())
    boundary = store.read_stream("sb-late")[0].recorded_at
    after = [e.position for e in events if e.recorded_at >= boundary]
    before = [e.position for e in events if e.recorded_at < boundary]
    assert after and before

    for offset in (timedelta(hours=5, minutes=30), timedelta(hours=-7)):
        text = boundary.astimezone(timezone(offset)).isoformat()
        since = cli("--db", db, "events", "--json", "--since", text)
        assert since.code == 0, since.err
        assert [e["position"] for e in since.json()] == after
        until = cli("--db", db, "events", "--json", "--until", text).json()
        assert [e["position"] for e in until] == before
        both = cli(
            "--db", db, "events", "--json", "--since", text, "--until", text
        ).json()
        assert both == []

    for event in cli("--db", db, "events", "--json").json():
        assert event["recorded_at"].endswith("+00:00")

    naive = cli("--db", db, "events", "--since", "2024-05-01T12:00:00")
    assert naive.code == 2
    assert "has no UTC offset" in naive.err
    assert cli("--db", db, "events", "--until", "yesterday").code == 2


@pytest.mark.postgres
def test_sqlite_and_postgresql_answer_alike(
    cli: Run, sqlite_url: str, pg_url: str
) -> None:
    answers = []
    for url in (sqlite_url, pg_url):
        assert cli("--db", url, "db", "upgrade").code == 0
        store = open_store(url)
        try:
            build_log(store)
        finally:
            store.close()
        results = []
        for argv in (
            (),
            ("--actor", "alice"),
            ("--host", "host-b"),
            ("--type", "sandbox.created", "--sandbox", "sb-c"),
            ("--limit", "4", "--after", "3"),
        ):
            found = cli("--db", url, "events", "--json", *argv).json()
            results.append(
                [
                    (
                        e["sandbox_id"],
                        e["version"],
                        e["type"],
                        e["actor"],
                        e["metadata"]["host_id"],
                        e["data"],
                    )
                    for e in found
                ]
            )
        answers.append(results)
    assert answers[0] == answers[1]


@pytest.mark.both_backends
def test_follow_prints_events_committed_by_another_thread(
    cli: Run,
    db: str,
    store: EventStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    append_sandbox(store, "sb-a", activities=1)
    following = threading.Event()
    original = SqlEventStore.wait_for_events

    def wait(self: SqlEventStore, after_position: int, timeout: float) -> bool:
        following.set()
        return original(self, after_position, timeout)

    monkeypatch.setattr(SqlEventStore, "wait_for_events", wait)

    def writer() -> None:
        # Only once the CLI is past its backlog and waiting for new events.
        assert following.wait(30)
        other = open_store(db)
        try:
            append_activity(other, "sb-a", 1, actor="carol")
            append_sandbox(other, "sb-b", actor="carol")
        finally:
            other.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = cli(
            "--db",
            db,
            "events",
            "--follow",
            "--jsonl",
            "--actor",
            "carol",
            "--limit",
            "2",
            "--follow-timeout",
            "60",
        )
    finally:
        thread.join()
    assert result.code == 0, result.err
    assert keys(result.jsonl()) == [("sb-a", 3), ("sb-b", 1)]


def test_follow_timeout_ends_quietly_and_prints_the_backlog(
    cli: Run,
    db: str,
    store: EventStore,
) -> None:
    append_sandbox(store, "sb-a", activities=1)
    result = cli("--db", db, "events", "--follow", "--follow-timeout", "0.3")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split()[:2] == ["POS", "TIME"]
    assert len(lines) == 3
    assert cli("--db", db, "events", "--follow-timeout", "1").code == 2
