"""Several engines sharing one database: PostgreSQL, as many hosts would."""

from __future__ import annotations

import threading

import pytest

from tests.lifecycle.conftest import EngineFactory, create, host_objects
from wrenn_engine.errors import NotOwner, SandboxBusy
from wrenn_engine.host.fake import FakeHost


def test_the_lifecycle_on_postgresql(make_engine: EngineFactory, files, pg_url):
    engine = make_engine(url=pg_url)
    sid = create(engine, files).id
    assert engine.pause(sid).state == "paused"
    assert engine.resume(sid).state == "running"
    assert engine.destroy(sid).state == "destroyed"
    assert host_objects(engine) == set()
    assert engine.store.verify_projections() == []


def test_an_engine_never_drives_another_hosts_sandbox(
    make_engine: EngineFactory, files, db_url
):
    a = make_engine(url=db_url)
    b = make_engine(url=db_url, host_id="host-b")
    sid = create(a, files).id

    with pytest.raises(NotOwner) as raised:
        b.pause(sid)

    assert raised.value.owner == "host-a"
    actions = b.reconcile()
    assert not any(sid in line for line in actions), actions
    assert a.get(sid).state == "running"
    assert b.list(host_id="host-a")[0].id == sid


def test_two_engines_on_one_host_never_both_act(
    make_engine: EngineFactory, files, pg_url
):
    host = FakeHost()
    a = make_engine(url=pg_url, host=host)
    b = make_engine(url=pg_url, host=host)
    sid = create(a, files).id
    outcomes: list[str] = []

    def pause(engine) -> None:  # type: ignore[no-untyped-def]
        try:
            engine.pause(sid)
            outcomes.append("paused")
        except SandboxBusy:
            outcomes.append("busy")
        except Exception as exc:  # any other outcome fails the assertion below
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=pause, args=(e,)) for e in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert sorted(outcomes) in (["busy", "paused"], ["InvalidTransition", "paused"])
    pauses = [
        e
        for e in a.history(sid)
        if e.type == "transition.started" and e.data["transition"] == "pause"
    ]
    assert len(pauses) == 1
