"""Upcasting on read: stored rows of an older shape come back in today's shape,
on every read path and in rebuilds; a type nobody knows fails loudly.

Old rows are written straight into the events table, the way an older
wrenn-engine would have left them. The test-only event type and its
upcasters are registered by a fixture and removed again afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa

from tests.store.builders import created, meta, new_sandbox, take_slot
from wrenn_engine.domain.events import EVENT_TYPES, Event, NewEvent, SandboxCreated
from wrenn_engine.domain.upcasting import UPCASTERS
from wrenn_engine.errors import UnknownEventError
from wrenn_engine.store import EventQuery, SqlEventStore
from wrenn_engine.store.schema import events


@dataclass(frozen=True, slots=True)
class Pinged(Event):
    """Test-only event at schema 3. v1 was {"host", "n"}; v2 lacked "note"."""

    type: ClassVar[str] = "test.pinged"
    schema_version: ClassVar[int] = 3
    target: str
    count: int
    note: str


@pytest.fixture
def pinged() -> Iterator[type[Pinged]]:
    EVENT_TYPES[Pinged.type] = Pinged
    UPCASTERS[(Pinged.type, 1)] = lambda d: {"target": d["host"], "count": d["n"]}
    UPCASTERS[(Pinged.type, 2)] = lambda d: {**d, "note": "(none)"}
    try:
        yield Pinged
    finally:
        EVENT_TYPES.pop(Pinged.type, None)
        UPCASTERS.pop((Pinged.type, 1), None)
        UPCASTERS.pop((Pinged.type, 2), None)


def _store_old_row(
    raw: sa.Engine,
    stream_id: str,
    version: int,
    type_: str,
    schema_version: int,
    data: dict[str, Any],
) -> None:
    with raw.begin() as conn:
        conn.execute(
            sa.insert(events).values(
                stream_id=stream_id,
                version=version,
                type=type_,
                schema_version=schema_version,
                data=data,
                actor="old-engine",
                host_id="h1",
                recorded_at=datetime.now(UTC),
            )
        )


def test_old_shapes_are_upcast_on_every_read_path(
    store: SqlEventStore,
    raw: sa.Engine,
    pinged: type[Pinged],
) -> None:
    new_sandbox(store, "sb1")
    _store_old_row(raw, "sb1", 2, "test.pinged", 1, {"host": "a", "n": 2})
    _store_old_row(raw, "sb1", 3, "test.pinged", 2, {"target": "b", "count": 5})
    store.append(
        "sb1", [pinged("c", 1, "fresh").to_new()], expected_version=3, metadata=meta()
    )

    expected = [
        {"target": "a", "count": 2, "note": "(none)"},
        {"target": "b", "count": 5, "note": "(none)"},
        {"target": "c", "count": 1, "note": "fresh"},
    ]
    paths = {
        "read_stream": store.read_stream("sb1")[1:],
        "read_all": list(store.read_all(batch_size=2))[1:],
        "query": store.query(EventQuery(types=["test.pinged"])),
    }
    for name, got in paths.items():
        assert [e.data for e in got] == expected, name
        assert {e.schema_version for e in got} == {3}, name
        assert [pinged(**e.data) for e in got] == [pinged(**d) for d in expected]


def test_rebuild_folds_upcast_events(
    store: SqlEventStore,
    raw: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sandbox.created v1 said "host"; pretend today's v2 says "host_id"."""
    monkeypatch.setattr(SandboxCreated, "schema_version", 2)
    monkeypatch.setitem(
        UPCASTERS,
        ("sandbox.created", 1),
        lambda d: {"config": d["config"], "host_id": d.pop("host")},
    )
    _store_old_row(
        raw, "sb-old", 1, "sandbox.created", 1, {"config": {"vcpus": 1}, "host": "h9"}
    )

    assert store.rebuild_projections() == 1

    old = store.get_sandbox("sb-old")
    assert old is not None
    assert (old.host_id, old.state, old.config) == ("h9", "pending", {"vcpus": 1})
    assert store.read_stream("sb-old")[0].data["host_id"] == "h9"
    assert store.verify_projections() == []


def test_an_unknown_type_fails_loudly_on_every_path(
    store: SqlEventStore,
    raw: sa.Engine,
) -> None:
    take_slot(store, "sb1", 1)
    _store_old_row(raw, "sb1", 6, "test.never_heard_of", 1, {})

    for read in (
        lambda: store.read_stream("sb1"),
        lambda: list(store.read_all()),
        lambda: store.query(EventQuery(sandbox_ids=["sb1"])),
        store.rebuild_projections,
        store.verify_projections,
    ):
        with pytest.raises(UnknownEventError) as caught:
            read()
        assert (caught.value.stream_id, caught.value.version) == ("sb1", 6)
        assert caught.value.event_type == "test.never_heard_of"
        assert "sb1" in str(caught.value) and "version 6" in str(caught.value)

    # The failed rebuild changed nothing.
    sb1 = store.get_sandbox("sb1")
    assert sb1 is not None and sb1.state == "running"
    assert store.read_stream("sb1", to_version=5)[-1].version == 5


def test_a_schema_newer_than_the_code_fails_loudly(
    store: SqlEventStore,
    raw: sa.Engine,
    pinged: type[Pinged],
) -> None:
    _store_old_row(raw, "sb2", 1, "test.pinged", 7, {"target": "x"})

    with pytest.raises(UnknownEventError) as caught:
        store.read_stream("sb2")

    assert (caught.value.version, caught.value.schema_version) == (1, 7)


def test_append_checks_types_against_the_registry(
    store: SqlEventStore,
    pinged: type[Pinged],
) -> None:
    store.append(
        "sb1",
        [created(), pinged("t", 1, "").to_new()],
        expected_version=0,
        metadata=meta(),
    )

    with pytest.raises(UnknownEventError):
        store.append(
            "sb1",
            [NewEvent("test.pinged", {"x": 1}, schema_version=9)],
            expected_version=2,
            metadata=meta(),
        )
    assert len(store.read_stream("sb1")) == 2
