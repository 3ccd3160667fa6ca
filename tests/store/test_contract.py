"""The event store contract, run on SQLite (a file) and on PostgreSQL.

Every test takes the ``store`` fixture, which the ``db_url`` parameter runs
once per backend. Assertions are on what the database returns.
"""

from __future__ import annotations

import threading
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from tests.store.builders import (
    completed,
    created,
    meta,
    new_sandbox,
    started,
    step_completed,
    step_started,
    step_undone,
    take_slot,
)
from wrenn_engine.domain.events import (
    ActivityRecorded,
    Metadata,
    NewEvent,
    ReconcileActed,
    host_stream,
)
from wrenn_engine.domain.state import fold, state_at
from wrenn_engine.errors import (
    ConcurrencyError,
    DatabaseError,
    IdempotencyError,
    SlotTaken,
    UnknownEventError,
)
from wrenn_engine.store import AppendResult, EventQuery, SqlEventStore, open_store
from wrenn_engine.store.schema import events, network_slots, resources, sandboxes

# --- append and read -------------------------------------------------------------


def test_append_then_read_stream_round_trips_everything(store: SqlEventStore) -> None:
    md = Metadata(
        actor="alice", correlation_id="req-1", causation_id="cause-1", host_id="h1"
    )
    first = store.append("sb1", [created()], expected_version=0, metadata=md)
    second = store.append(
        "sb1",
        [started(), completed()],
        expected_version=1,
        metadata=md,
        command_id="cmd-1",
        command="start",
    )

    assert (first.stream_id, first.version, first.replayed) == ("sb1", 1, False)
    assert first.first_position == first.last_position
    assert second.version == 3
    assert second.first_position > first.last_position
    assert second.last_position > second.first_position

    events = store.read_stream("sb1")
    assert [e.version for e in events] == [1, 2, 3]
    assert [e.type for e in events] == [
        "sandbox.created",
        "transition.started",
        "transition.completed",
    ]
    assert [e.position for e in events] == sorted(e.position for e in events)
    assert events[0].data == created().data
    assert events[0].metadata == md
    assert events[1].metadata == Metadata(
        actor="alice",
        correlation_id="req-1",
        causation_id="cause-1",
        command_id="cmd-1",
        host_id="h1",
    )
    for event in events:
        assert event.recorded_at.tzinfo is UTC
        assert event.schema_version == 1
    assert store.last_position() == second.last_position
    assert store.read_stream("nobody") == []


def test_expected_version_mismatch_is_a_typed_error(store: SqlEventStore) -> None:
    new_sandbox(store, "sb1")

    with pytest.raises(ConcurrencyError) as caught:
        store.append("sb1", [created()], expected_version=0, metadata=meta())
    assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == (
        "sb1",
        0,
        1,
    )

    with pytest.raises(ConcurrencyError) as ahead:
        store.append("sb1", [started()], expected_version=4, metadata=meta())
    assert (ahead.value.expected, ahead.value.actual) == (4, 1)
    assert "sb1" in str(ahead.value)
    assert len(store.read_stream("sb1")) == 1


def test_a_failing_batch_leaves_nothing_behind(store: SqlEventStore) -> None:
    take_slot(store, "sb1", 3)
    new_sandbox(store, "sb2")
    before = store.last_position()

    with pytest.raises(SlotTaken) as caught:
        store.append(
            "sb2",
            [started(), step_started("network.prepare", ("slot", "3"))],
            expected_version=1,
            metadata=meta(),
        )

    assert (caught.value.host_id, caught.value.slot, caught.value.holder) == (
        "h1",
        3,
        "sb1",
    )
    assert store.last_position() == before
    assert [e.version for e in store.read_stream("sb2")] == [1]
    sb2 = store.get_sandbox("sb2")
    assert sb2 is not None
    assert (sb2.state, sb2.version, sb2.resources) == ("pending", 1, {})
    assert store.network_slots("h1") == {3: "sb1"}
    assert store.verify_projections() == []


def test_unknown_event_type_is_refused_before_writing(store: SqlEventStore) -> None:
    new_sandbox(store, "sb1")

    with pytest.raises(UnknownEventError) as caught:
        store.append(
            "sb1",
            [started(), NewEvent("no.such.event", {})],
            expected_version=1,
            metadata=meta(),
        )

    assert (caught.value.stream_id, caught.value.version) == ("sb1", 3)
    assert len(store.read_stream("sb1")) == 1


def test_empty_append_is_refused(store: SqlEventStore) -> None:
    with pytest.raises(ValueError, match="at least one event"):
        store.append("sb1", [], expected_version=0, metadata=meta())


def test_a_first_append_may_create_the_row_and_claim_a_slot(
    store: SqlEventStore,
) -> None:
    store.append(
        "sb1",
        [
            created(),
            started(),
            step_started("network.prepare", ("slot", "7"), ("netns", "ns-sb1")),
        ],
        expected_version=0,
        metadata=meta(),
    )

    assert store.network_slots("h1") == {7: "sb1"}
    assert {(r.kind, r.name, r.status) for r in store.held_resources()} == {
        ("slot", "7", "intended"),
        ("netns", "ns-sb1", "intended"),
    }
    with pytest.raises(SlotTaken):
        store.append(
            "sb2",
            [created(), started(), step_started("network.prepare", ("slot", "7"))],
            expected_version=0,
            metadata=meta(),
        )
    assert store.get_sandbox("sb2") is None
    assert store.read_stream("sb2") == []
    assert store.verify_projections() == []


def test_host_streams_have_versions_and_commands_but_no_projection(
    store: SqlEventStore,
) -> None:
    stream = host_stream("h1")
    finished = ReconcileActed("finished").to_new()
    first = store.append(
        stream,
        [finished],
        expected_version=0,
        metadata=meta(),
        command_id="r-1",
        command="reconcile",
    )

    with pytest.raises(ConcurrencyError) as caught:
        store.append(stream, [finished], expected_version=0, metadata=meta())
    assert (caught.value.expected, caught.value.actual) == (0, 1)
    again = store.append(
        stream,
        [finished],
        expected_version=0,
        metadata=meta(),
        command_id="r-1",
        command="reconcile",
    )
    assert again == replace(first, replayed=True)
    store.append(stream, [finished, finished], expected_version=1, metadata=meta())

    assert [e.version for e in store.read_stream(stream)] == [1, 2, 3]
    assert store.get_sandbox(stream) is None
    assert store.list_sandboxes() == []
    assert store.verify_projections() == []


# --- idempotency -------------------------------------------------------------------


def test_a_repeated_command_id_returns_the_earlier_result(
    store: SqlEventStore,
) -> None:
    new_sandbox(store, "sb1")
    first = store.append(
        "sb1",
        [started(), completed()],
        expected_version=1,
        metadata=meta(),
        command_id="c-1",
        command="start",
    )
    last = store.last_position()

    again = store.append(
        "sb1",
        [started(), completed()],
        expected_version=1,
        metadata=meta(),
        command_id="c-1",
        command="start",
    )

    assert again.replayed is True
    assert (
        again.stream_id,
        again.version,
        again.first_position,
        again.last_position,
    ) == (first.stream_id, first.version, first.first_position, first.last_position)
    assert store.last_position() == last
    record = store.command("c-1")
    assert record is not None
    assert (
        record.stream_id,
        record.command,
        record.first_position,
        record.last_position,
    ) == ("sb1", "start", first.first_position, first.last_position)
    assert record.recorded_at.tzinfo is UTC
    assert store.command("c-unknown") is None


def test_a_command_id_reused_elsewhere_is_an_error(store: SqlEventStore) -> None:
    new_sandbox(store, "sb1")
    new_sandbox(store, "sb2")
    store.append(
        "sb1",
        [started()],
        expected_version=1,
        metadata=meta(),
        command_id="c-1",
        command="start",
    )

    with pytest.raises(IdempotencyError) as other_stream:
        store.append(
            "sb2",
            [started()],
            expected_version=1,
            metadata=meta(),
            command_id="c-1",
            command="start",
        )
    with pytest.raises(IdempotencyError) as other_command:
        store.append(
            "sb1",
            [started("stop")],
            expected_version=2,
            metadata=meta(),
            command_id="c-1",
            command="stop",
        )

    assert other_stream.value.command_id == "c-1"
    assert "sb1" in other_stream.value.recorded
    assert "sb2" in other_stream.value.given
    assert "stop" in other_command.value.given
    assert [e.version for e in store.read_stream("sb2")] == [1]
    assert [e.version for e in store.read_stream("sb1")] == [1, 2]


def _race(
    store: SqlEventStore, version: int, command_id: str
) -> tuple[list[AppendResult], list[BaseException]]:
    """Two threads append the same command at the same moment."""
    barrier = threading.Barrier(2)
    results: list[AppendResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(
                store.append(
                    "sb1",
                    [started()],
                    expected_version=version,
                    metadata=meta(),
                    command_id=command_id,
                    command="start",
                )
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def test_two_threads_racing_with_one_command_id_append_once(
    store: SqlEventStore,
) -> None:
    new_sandbox(store, "sb1")

    for round_ in range(5):
        version = round_ + 1
        results, errors = _race(store, version, f"race-{round_}")

        assert errors == []
        assert sorted(r.replayed for r in results) == [False, True]
        assert results[0].last_position == results[1].last_position
        assert len(store.read_stream("sb1")) == version + 1


# --- projections -------------------------------------------------------------------


def test_projection_matches_a_fold_of_the_stream(
    store: SqlEventStore,
    raw: sa.Engine,
) -> None:
    take_slot(store, "sb1", 5)
    store.append(
        "sb1",
        [started("stop", "running", "stopping"), completed("stop", "stopped")],
        expected_version=5,
        metadata=meta(),
    )

    projected = store.get_sandbox("sb1")
    folded = fold(store.read_stream("sb1"))
    assert projected is not None and folded is not None
    assert projected == folded
    assert projected.state == "stopped"
    assert projected.created_at is not None and projected.created_at.tzinfo is UTC
    assert store.get_sandbox("nobody") is None

    with raw.connect() as conn:
        row = (
            conn.execute(sa.select(sandboxes).where(sandboxes.c.id == "sb1"))
            .mappings()
            .one()
        )
    assert (row["state"], row["version"], row["host_id"], row["last_error"]) == (
        "stopped",
        7,
        "h1",
        None,
    )
    assert row["config_summary"] == {
        "template_id": "base",
        "vcpus": 2,
        "memory_mb": 512,
        "guest_ip": None,
    }
    assert row["created_at"] == folded.created_at
    assert row["updated_at"] == folded.updated_at


def test_list_sandboxes_filters_and_orders_oldest_first(
    store: SqlEventStore,
) -> None:
    new_sandbox(store, "sb-b", host_id="h1")
    new_sandbox(store, "sb-a", host_id="h2")
    take_slot(store, "sb-c", 1, host_id="h1")

    assert [s.id for s in store.list_sandboxes()] == ["sb-b", "sb-a", "sb-c"]
    assert [s.id for s in store.list_sandboxes(states=["pending"])] == [
        "sb-b",
        "sb-a",
    ]
    assert [s.id for s in store.list_sandboxes(host_id="h1")] == ["sb-b", "sb-c"]
    assert [s.id for s in store.list_sandboxes(states=["running"], host_id="h2")] == []


def test_slots_are_unique_per_host_and_freed_by_the_fold(
    store: SqlEventStore,
) -> None:
    take_slot(store, "sb1", 3)
    take_slot(store, "sb2", 3, host_id="h2")  # same number, other host: fine
    new_sandbox(store, "sb3")

    with pytest.raises(SlotTaken):
        store.append(
            "sb3",
            [started(), step_started("network.prepare", ("slot", "3"))],
            expected_version=1,
            metadata=meta(),
        )

    # sb1 is destroyed: its teardown releases the slot and the namespace.
    store.append(
        "sb1",
        [
            started("destroy", "running", "destroying"),
            step_completed(
                "network.teardown",
                released=(("slot", "3"), ("netns", "ns-sb1")),
                transition="destroy",
            ),
            completed("destroy", "destroyed"),
        ],
        expected_version=5,
        metadata=meta(),
    )
    assert store.network_slots("h1") == {}
    assert store.network_slots("h2") == {3: "sb2"}
    sb1 = store.get_sandbox("sb1")
    assert sb1 is not None and sb1.state == "destroyed"
    assert [s.id for s in store.list_sandboxes(states=["destroyed"])] == ["sb1"]
    assert [r.sandbox_id for r in store.held_resources("h1")] == []

    store.append(
        "sb3",
        [started(), step_started("network.prepare", ("slot", "3"))],
        expected_version=1,
        metadata=meta(),
    )
    assert store.network_slots("h1") == {3: "sb3"}
    assert store.verify_projections() == []


def test_resources_follow_intent_result_and_undo(store: SqlEventStore) -> None:
    new_sandbox(store, "sb1")
    store.append(
        "sb1",
        [
            started(),
            step_started(
                "rootfs.prepare", ("cow", "/d/sb1.cow"), ("loop", "/dev/loop7")
            ),
        ],
        expected_version=1,
        metadata=meta(),
    )

    held = {(r.kind, r.name): r.status for r in store.held_resources()}
    assert held == {
        ("cow", "/d/sb1.cow"): "intended",
        ("loop", "/dev/loop7"): "intended",
    }

    # The step created only the CoW file; the loop device was never made.
    store.append(
        "sb1",
        [
            step_completed("rootfs.prepare", ("cow", "/d/sb1.cow")),
            step_started("network.prepare", ("slot", "2")),
        ],
        expected_version=3,
        metadata=meta(),
    )
    held_now = store.held_resources("h1")
    assert [(r.sandbox_id, r.host_id, r.kind, r.name, r.status) for r in held_now] == [
        ("sb1", "h1", "cow", "/d/sb1.cow", "created"),
        ("sb1", "h1", "slot", "2", "intended"),
    ]
    assert store.held_resources("h2") == []

    store.append(
        "sb1",
        [step_undone("network.prepare"), step_undone("rootfs.prepare")],
        expected_version=5,
        metadata=meta(),
    )
    assert store.held_resources() == []
    assert store.network_slots("h1") == {}
    assert store.verify_projections() == []


def test_rebuild_and_verify_find_and_repair_tampering(
    store: SqlEventStore,
    raw: sa.Engine,
) -> None:
    take_slot(store, "sb1", 3)
    take_slot(store, "sb2", 4)
    new_sandbox(store, "sb3")
    assert store.verify_projections() == []

    with raw.begin() as conn:
        conn.execute(
            sa.update(sandboxes).where(sandboxes.c.id == "sb1").values(state="paused")
        )
        conn.execute(sa.delete(network_slots).where(network_slots.c.slot == 4))
        conn.execute(
            sa.insert(resources).values(
                sandbox_id="sb3",
                kind="dir",
                name="/stale",
                host_id="h1",
                status="created",
            )
        )

    found = {(d.table, d.key): d for d in store.verify_projections()}
    assert set(found) == {
        ("sandboxes", "sb1"),
        ("network_slots", "h1/4"),
        ("resources", "sb3/dir:/stale"),
    }
    assert found[("sandboxes", "sb1")].stored == {"state": "paused"}
    assert found[("sandboxes", "sb1")].rebuilt == {"state": "running"}
    assert (
        found[("network_slots", "h1/4")].stored,
        found[("network_slots", "h1/4")].rebuilt,
    ) == (None, "sb2")
    assert found[("resources", "sb3/dir:/stale")].rebuilt is None
    assert "paused" in str(found[("sandboxes", "sb1")])
    # verify wrote nothing
    sb1 = store.get_sandbox("sb1")
    assert sb1 is not None and sb1.state == "running"  # snapshot untouched
    assert store.network_slots("h1") == {3: "sb1"}

    assert store.rebuild_projections() == 11
    assert store.verify_projections() == []
    assert store.network_slots("h1") == {3: "sb1", 4: "sb2"}
    assert [s.id for s in store.list_sandboxes(states=["running"])] == ["sb1", "sb2"]


def test_an_append_builds_on_what_the_database_holds(
    store: SqlEventStore,
    raw: sa.Engine,
    db_url: str,
) -> None:
    """Whatever a store remembers of its own last append to a sandbox, the
    next append folds onto the projection row as the database holds it."""
    new_sandbox(store, "sb1")
    store.append("sb1", [started()], expected_version=1, metadata=meta())

    # Another writer (another process, another host) appends in between.
    with closing(open_store(db_url)) as other:
        other.append("sb1", [completed()], expected_version=2, metadata=meta())
    store.append(
        "sb1", [ActivityRecorded("a").to_new()], expected_version=3, metadata=meta()
    )
    sb1 = store.get_sandbox("sb1")
    assert sb1 is not None
    assert (sb1.state, sb1.version, sb1.transition) == ("running", 4, None)

    # The row is changed behind every store's back, at the same version.
    with raw.begin() as conn:
        snapshot = conn.execute(
            sa.select(sandboxes.c.snapshot).where(sandboxes.c.id == "sb1")
        ).scalar_one()
        conn.execute(
            sa.update(sandboxes)
            .where(sandboxes.c.id == "sb1")
            .values(snapshot={**snapshot, "labels": {"edited": "by hand"}})
        )
    store.append(
        "sb1", [ActivityRecorded("b").to_new()], expected_version=4, metadata=meta()
    )
    sb1 = store.get_sandbox("sb1")
    assert sb1 is not None
    assert (sb1.version, sb1.labels) == (5, {"edited": "by hand"})


def test_append_refolds_a_stream_whose_projection_lags(
    store: SqlEventStore,
    raw: sa.Engine,
) -> None:
    take_slot(store, "sb1", 3)
    with raw.begin() as conn:
        conn.execute(sa.delete(resources))
        conn.execute(sa.delete(network_slots))
        conn.execute(sa.delete(sandboxes))

    store.append(
        "sb1",
        [started("stop", "running", "stopping")],
        expected_version=5,
        metadata=meta(),
    )

    projected = store.get_sandbox("sb1")
    assert projected == fold(store.read_stream("sb1"))
    assert projected is not None and projected.state == "stopping"


# --- reads ---------------------------------------------------------------------------


def test_read_stream_up_to_a_version_or_a_time(store: SqlEventStore) -> None:
    new_sandbox(store, "sb1")
    store.append("sb1", [started()], expected_version=1, metadata=meta())
    store.append("sb1", [completed()], expected_version=2, metadata=meta())
    full = store.read_stream("sb1")

    assert [e.version for e in store.read_stream("sb1", to_version=2)] == [1, 2]
    assert store.read_stream("sb1", to_version=0) == []

    at = full[1].recorded_at
    expected = [e for e in full if e.recorded_at <= at]
    assert full[1] in expected
    assert store.read_stream("sb1", at=at) == expected
    # The same instant written with another offset selects the same events.
    east = at.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert store.read_stream("sb1", at=east) == expected
    assert store.read_stream("sb1", at=full[0].recorded_at - timedelta(days=1)) == []
    assert state_at(full, version=2) == fold(store.read_stream("sb1", to_version=2))

    with pytest.raises(ValueError, match="timezone"):
        store.read_stream("sb1", at=datetime(2030, 1, 1))


def test_read_all_in_batches_from_a_position(store: SqlEventStore) -> None:
    for i in range(7):
        store.append(
            f"sb{i}",
            [created(), started(), completed()],
            expected_version=0,
            metadata=meta(),
        )
    everything = list(store.read_all())
    positions = [e.position for e in everything]

    assert len(everything) == 21
    assert positions == sorted(set(positions))
    assert list(store.read_all(batch_size=4)) == everything
    assert list(store.read_all(limit=5, batch_size=2)) == everything[:5]
    after = positions[9]
    assert list(store.read_all(after_position=after, batch_size=3)) == everything[10:]
    assert list(store.read_all(after_position=positions[-1])) == []
    with pytest.raises(ValueError):
        list(store.read_all(batch_size=0))


def _audit_history(store: SqlEventStore) -> None:
    store.append(
        "sb-a", [created("h1")], expected_version=0, metadata=meta("alice", "h1")
    )
    store.append(
        "sb-b", [created("h2")], expected_version=0, metadata=meta("bob", "h2")
    )
    store.append(
        "sb-a", [started(), completed()], expected_version=1, metadata=meta("bob", "h1")
    )
    store.append(
        "sb-c",
        [created("h1"), started()],
        expected_version=0,
        metadata=meta("carol", "h1"),
    )
    store.append(
        "sb-b",
        [started(), completed()],
        expected_version=1,
        metadata=meta("alice", "h2"),
    )


def _matches(store: SqlEventStore, q: EventQuery) -> list[int]:
    """Positions the query must return, computed from the whole log."""
    out = [
        e.position
        for e in store.read_all()
        if e.position > q.after_position
        and (not q.sandbox_ids or e.stream_id in q.sandbox_ids)
        and (not q.types or e.type in q.types)
        and (not q.actors or e.metadata.actor in q.actors)
        and (not q.host_ids or e.metadata.host_id in q.host_ids)
        and (q.since is None or e.recorded_at >= q.since)
        and (q.until is None or e.recorded_at < q.until)
    ]
    return out[: q.limit]


def test_query_filters_combine(store: SqlEventStore) -> None:
    _audit_history(store)
    log = list(store.read_all())
    middle = log[3].recorded_at

    queries = [
        EventQuery(),
        EventQuery(sandbox_ids=["sb-a"]),
        EventQuery(sandbox_ids=["sb-a", "sb-c"], types=["transition.started"]),
        EventQuery(actors=["alice"]),
        EventQuery(actors=["bob"], host_ids=["h1"]),
        EventQuery(host_ids=["h2"], types=["sandbox.created", "transition.completed"]),
        EventQuery(since=middle),
        EventQuery(until=middle),
        EventQuery(
            since=log[1].recorded_at, until=log[5].recorded_at, actors=["alice", "bob"]
        ),
        EventQuery(limit=3),
        EventQuery(after_position=log[4].position, limit=2),
        EventQuery(sandbox_ids=["nobody"]),
    ]
    for q in queries:
        assert [e.position for e in store.query(q)] == _matches(store, q), q

    assert {e.stream_id for e in store.query(EventQuery(actors=["carol"]))} == {"sb-c"}
    # since is inclusive, until exclusive, at the exact recorded instant.
    at = [e for e in store.query(EventQuery(since=middle, until=middle))]
    assert at == []
    assert log[3] in store.query(EventQuery(since=middle))
    assert log[3] not in store.query(EventQuery(until=middle))


def test_query_times_accept_any_offset(store: SqlEventStore) -> None:
    _audit_history(store)
    log = list(store.read_all())
    since_utc = log[2].recorded_at
    until_utc = log[6].recorded_at

    minus_seven = timezone(timedelta(hours=-7))
    plus_nine = timezone(timedelta(hours=9, minutes=45))
    utc_result = store.query(EventQuery(since=since_utc, until=until_utc))
    shifted = store.query(
        EventQuery(
            since=since_utc.astimezone(minus_seven),
            until=until_utc.astimezone(plus_nine),
        )
    )

    assert shifted == utc_result
    assert [e.position for e in utc_result] == _matches(
        store, EventQuery(since=since_utc, until=until_utc)
    )
    assert all(e.recorded_at.utcoffset() == timedelta(0) for e in utc_result)
    with pytest.raises(ValueError, match="timezone"):
        store.query(EventQuery(since=datetime(2030, 1, 1)))
    with pytest.raises(ValueError):
        store.query(EventQuery(limit=0))


def test_keyset_pages_are_stable_on_shared_times_and_new_events(
    store: SqlEventStore,
) -> None:
    # One append: 25 events with the very same recorded_at.
    batch = [created()] + [started()] * 24
    store.append("sb1", batch, expected_version=0, metadata=meta())
    assert len({e.recorded_at for e in store.read_stream("sb1")}) == 1

    seen: list[int] = []
    after = 0
    pages = 0
    while True:
        page = store.query(
            EventQuery(sandbox_ids=["sb1"], after_position=after, limit=10)
        )
        if not page:
            break
        seen += [e.version for e in page]
        after = page[-1].position
        pages += 1
        if pages == 1:
            # New events arrive while the client pages: they come at the end.
            store.append("sb1", [completed()], expected_version=25, metadata=meta())
            store.append("sb2", [created()], expected_version=0, metadata=meta())

    assert seen == list(range(1, 27))
    assert pages == 3


def test_times_never_go_back_in_position_order(
    store: SqlEventStore,
    raw: sa.Engine,
) -> None:
    """An append takes the later of its clock and the last event's time, so a
    clock behind another host's (or stepped back) cannot make time go back."""
    new_sandbox(store, "sb1")
    ahead = datetime.now(UTC) + timedelta(hours=1)
    with raw.begin() as conn:  # the last event came from a clock an hour ahead
        conn.execute(
            sa.insert(events).values(
                stream_id=host_stream("h9"),
                version=1,
                type="reconcile.acted",
                schema_version=1,
                data={"action": "finished"},
                actor="h9",
                host_id="h9",
                recorded_at=ahead,
            )
        )

    store.append("sb1", [started(), completed()], expected_version=1, metadata=meta())

    log = list(store.read_all())
    assert [e.recorded_at for e in log] == sorted(e.recorded_at for e in log)
    assert [e.recorded_at for e in log[-2:]] == [ahead, ahead]
    sb1 = store.get_sandbox("sb1")
    assert sb1 is not None and sb1.updated_at == ahead
    assert store.query(EventQuery(since=ahead)) == log[-3:]
    assert store.query(EventQuery(until=ahead)) == log[:-3]


def test_a_time_range_is_a_range_of_positions(store: SqlEventStore) -> None:
    """Every window of time selects one contiguous run of positions: exactly
    the events recorded in it, also where appends share a timestamp."""
    for i in range(5):
        store.append(
            f"sb{i}",
            [created(f"h{i % 2}"), started(), completed()],
            expected_version=0,
            metadata=meta(host_id=f"h{i % 2}"),
        )
    log = list(store.read_all())
    times = sorted({e.recorded_at for e in log})
    assert len(times) < len(log)  # each append's events share their time
    micro = timedelta(microseconds=1)
    bounds = [None, times[0] - micro, *times, times[-1] + micro]
    bounds += [t + micro for t in times]

    for since in bounds:
        for until in bounds:
            query = EventQuery(since=since, until=until)
            expected = _matches(store, query)
            got = [e.position for e in store.query(query)]
            assert got == expected, (since, until)
            first = (
                log.index(next(e for e in log if e.position == got[0])) if got else 0
            )
            assert got == [e.position for e in log[first : first + len(got)]]
            hosted = EventQuery(since=since, until=until, host_ids=["h1"], limit=2)
            assert [e.position for e in store.query(hosted)] == _matches(store, hosted)

    # Paging through a window, one event per page.
    window = EventQuery(since=times[1], until=times[-1], limit=1)
    pages: list[int] = []
    while page := store.query(
        replace(window, after_position=pages[-1] if pages else 0)
    ):
        pages += [e.position for e in page]
    assert pages == _matches(store, replace(window, limit=len(log)))


# --- waiting -------------------------------------------------------------------------


def test_wait_for_events(store: SqlEventStore) -> None:
    assert store.wait_for_events(0, timeout=0.2) is False

    new_sandbox(store, "sb1")
    assert store.wait_for_events(0, timeout=0.0) is True
    last = store.last_position()
    assert store.wait_for_events(last, timeout=0.2) is False

    def later() -> None:
        store.append("sb1", [started()], expected_version=1, metadata=meta())

    timer = threading.Timer(0.3, later)
    timer.start()
    try:
        assert store.wait_for_events(last, timeout=30) is True
    finally:
        timer.join()
    assert store.last_position() > last
    if store.engine.dialect.name == "postgresql":
        # The wake-up came through LISTEN/NOTIFY, not through polling.
        assert store._listener is not None and not store._listener.failed
        assert store._listener._latest == store.last_position()


# --- stats, errors -------------------------------------------------------------------


def test_stats(store: SqlEventStore) -> None:
    take_slot(store, "sb1", 1)
    new_sandbox(store, "sb2")
    store.append(
        "sb2",
        [started()],
        expected_version=1,
        metadata=meta(),
        command_id="c1",
        command="start",
    )

    stats = store.stats()

    assert (stats.events, stats.streams) == (7, 2)
    assert stats.last_position == store.last_position()
    assert stats.extra["backend"] == store.engine.dialect.name
    assert stats.extra["sandboxes_by_state"] == {"running": 1, "starting": 1}
    assert (
        stats.extra["network_slots"],
        stats.extra["resources"],
        stats.extra["commands"],
    ) == (1, 2, 1)


def test_driver_errors_are_translated_with_their_cause(
    store: SqlEventStore,
    raw: sa.Engine,
) -> None:
    new_sandbox(store, "sb1")
    with raw.begin() as conn:
        conn.execute(sa.text("DROP TABLE commands"))

    with pytest.raises(DatabaseError) as caught:
        store.command("c1")

    assert caught.value.operation == "read command"
    assert isinstance(caught.value.__cause__, sa.exc.SQLAlchemyError)
    assert "commands" in caught.value.detail


def test_constraint_violations_become_typed_errors(
    store: SqlEventStore,
    raw: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A check that was misled (a projection behind the log, a writer that
    skipped the append lock) is caught by the constraints, and the violation
    still reads as the typed error, with the data."""
    take_slot(store, "sb1", 3)
    new_sandbox(store, "sb2")
    store.append(
        "sb2",
        [started()],
        expected_version=1,
        metadata=meta(),
        command_id="c-1",
        command="start",
    )

    # The projection row claims version 1, the log is at 2: the version check
    # passes, the unique (stream, version) constraint answers.
    with raw.begin() as conn:
        conn.execute(
            sa.update(sandboxes).where(sandboxes.c.id == "sb2").values(version=1)
        )
    with pytest.raises(ConcurrencyError) as conflict:
        store.append("sb2", [completed()], expected_version=1, metadata=meta())
    assert (conflict.value.expected, conflict.value.actual) == (1, 2)
    with raw.begin() as conn:
        conn.execute(
            sa.update(sandboxes).where(sandboxes.c.id == "sb2").values(version=2)
        )

    # Slot check skipped: the (host, slot) primary key answers.
    monkeypatch.setattr(store, "_slot_holder", _holder_unseen_once(store))
    with pytest.raises(SlotTaken) as taken:
        store.append(
            "sb2",
            [step_started("network.prepare", ("slot", "3"))],
            expected_version=2,
            metadata=meta(),
        )
    assert (taken.value.host_id, taken.value.slot, taken.value.holder) == (
        "h1",
        3,
        "sb1",
    )
    monkeypatch.undo()

    # Command lookup skipped: the command id primary key answers.
    monkeypatch.setattr(store, "_replay", lambda *a: None)
    with pytest.raises(IdempotencyError) as reused:
        store.append(
            "sb2",
            [completed()],
            expected_version=2,
            metadata=meta(),
            command_id="c-1",
            command="start",
        )
    assert reused.value.command_id == "c-1"
    monkeypatch.undo()

    assert [e.version for e in store.read_stream("sb2")] == [1, 2]
    assert store.verify_projections() == []


def _holder_unseen_once(store: SqlEventStore):  # type: ignore[no-untyped-def]
    real = store._slot_holder
    state = {"hidden": False}

    def holder(conn, host_id, slot):  # type: ignore[no-untyped-def]
        if not state["hidden"]:
            state["hidden"] = True
            return None
        return real(conn, host_id, slot)

    return holder
