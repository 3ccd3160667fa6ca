"""replay, export, replay --file (no database), diff and verify."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.cli.conftest import Run, listing
from wrenn_engine.domain.events import RecordedEvent
from wrenn_engine.domain.state import state_at
from wrenn_engine.store import EventStore
from wrenn_engine.store.schema import sandboxes


@pytest.fixture
def lived(cli: Run, db: str, create: Callable[..., str]) -> str:
    """A sandbox created, started, paused and resumed."""
    sandbox_id = create()
    for command in ("pause", "resume"):
        assert cli("--db", db, command, sandbox_id).code == 0
    return sandbox_id


def stream(store: EventStore, sandbox_id: str) -> list[RecordedEvent]:
    return store.read_stream(sandbox_id)


@pytest.mark.both_backends
def test_replay_to_a_version_or_a_time(
    cli: Run, db: str, lived: str, store: EventStore
) -> None:
    events = stream(store, lived)
    paused = next(
        e.version
        for e in events
        if e.type == "transition.completed" and e.data["to_state"] == "paused"
    )

    at_version = cli(
        "--db", db, "replay", lived, "--to-version", str(paused), "--json"
    ).json()
    expected = state_at(events, version=paused)
    assert expected is not None
    assert at_version == expected.to_dict()
    assert at_version["state"] == "paused"
    assert at_version["version"] == paused

    moment = events[paused - 1].recorded_at.astimezone(timezone(timedelta(hours=-3)))
    at_time = cli("--db", db, "replay", lived, "--at", moment.isoformat(), "--json")
    assert at_time.code == 0, at_time.err
    last_at_moment = max(
        e.version for e in events if e.recorded_at <= events[paused - 1].recorded_at
    )
    assert at_time.json()["version"] == last_at_moment

    # The fold of the whole log is the stored projection.
    full = cli("--db", db, "replay", lived, "--json").json()
    assert full == cli("--db", db, "show", lived, "--json").json()
    assert full["state"] == "running"

    text = cli("--db", db, "replay", lived, "--to-version", "1")
    assert "replayed 1 of" in text.out
    assert "pending" in text.out

    early = events[0].recorded_at - timedelta(days=1)
    none = cli("--db", db, "replay", lived, "--at", early.isoformat())
    assert none.code == 1
    assert "has no event at or before" in none.err
    assert (
        cli(
            "--db", db, "replay", lived, "--to-version", "2", "--at", early.isoformat()
        ).code
        == 2
    )
    assert cli("--db", db, "replay", "sb-nosuch").code == 1


def test_explain_lists_every_event_and_the_state_it_left(
    cli: Run,
    db: str,
    lived: str,
    store: EventStore,
) -> None:
    events = stream(store, lived)
    as_json = cli("--db", db, "replay", lived, "--explain", "--json").json()
    assert [item["event"] for item in as_json] == [e.to_dict() for e in events]
    for item in as_json:
        expected = state_at(events, version=item["event"]["version"])
        assert expected is not None
        assert item["state"] == expected.to_dict()

    as_lines = cli("--db", db, "replay", lived, "--explain", "--jsonl").jsonl()
    assert as_lines == as_json

    text = cli("--db", db, "replay", lived, "--explain", "--to-version", "30").out
    for version in range(1, 31):
        assert f"\nv{version} " in "\n" + text
    assert "\nv31 " not in text
    assert "=> paused" in text
    assert "The last command, pause by" in text


def test_export_then_replay_the_file_without_any_database(
    cli: Run,
    db: str,
    lived: str,
    tmp_path: Path,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    store: EventStore,
) -> None:
    export = tmp_path / "export.jsonl"
    written = cli("--db", db, "export", lived, "-o", str(export))
    assert written.code == 0, written.err
    assert written.out == ""
    lines = export.read_text().splitlines()
    assert [RecordedEvent.from_dict(json.loads(line)) for line in lines] == stream(
        store, lived
    )
    to_stdout = cli("--db", db, "export", lived)
    assert to_stdout.out.splitlines() == lines

    from_db = cli("--db", db, "replay", lived, "--explain", "--json").json()

    # A colleague's machine: no database anywhere, a state directory that
    # does not exist yet; replaying must not create either.
    elsewhere = tmp_path / "colleague"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("WRENN_ENGINE_HOME", str(elsewhere / "state"))
    monkeypatch.setenv("WRENN_ENGINE_DB", f"sqlite:///{elsewhere / 'never.db'}")
    from_file = cli("replay", "--file", str(export), "--explain", "--json")
    assert from_file.code == 0, from_file.err
    assert from_file.json() == from_db
    named = cli("replay", lived, "--file", str(export), "--to-version", "5", "--json")
    assert named.json()["version"] == 5
    diff = cli("diff", "--file", str(export), "--from", "3", "--to", "5", "--json")
    assert diff.code == 0
    assert listing(elsewhere) == []


def test_replay_file_errors_name_the_problem(
    cli: Run, db: str, lived: str, create: Callable[..., str], tmp_path: Path
) -> None:
    missing = cli("replay", "--file", str(tmp_path / "absent.jsonl"))
    assert missing.code == 1
    assert "cannot read" in missing.err

    bad = tmp_path / "bad.jsonl"
    good = cli("--db", db, "export", lived).out.splitlines()
    bad.write_text(good[0] + "\n{not json\n")
    broken = cli("replay", "--file", str(bad))
    assert broken.code == 1
    assert "line 2 is not an exported event" in broken.err

    other = create()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        "\n".join(good + cli("--db", db, "export", other).out.splitlines()) + "\n"
    )
    several = cli("replay", "--file", str(mixed))
    assert several.code == 1
    assert "several sandboxes" in several.err
    assert cli("replay", other, "--file", str(mixed), "--json").json()["id"] == other
    absent = cli("replay", "sb-nosuch", "--file", str(mixed))
    assert absent.code == 1
    assert "holds no events of sandbox sb-nosuch" in absent.err


def test_diff_shows_what_changed_between_versions(
    cli: Run, db: str, lived: str, store: EventStore
) -> None:
    events = stream(store, lived)
    running = next(e.version for e in events if e.type == "transition.completed")
    result = cli("--db", db, "diff", lived, "--from", "3", "--to", str(running))
    assert result.code == 0
    assert 'state: "pending" -> "running"' in result.out.splitlines()
    assert f"version: 3 -> {running}" in result.out.splitlines()

    changes = cli(
        "--db", db, "diff", lived, "--from", "3", "--to", str(running), "--json"
    ).json()
    by_path = {c["path"]: c for c in changes}
    assert by_path["state"] == {
        "path": "state",
        "old": "pending",
        "new": "running",
        "change": "changed",
    }
    added = [c for c in changes if c["path"].startswith("resources.")]
    assert added and all(c["change"] == "added" for c in added)

    from_nothing = cli(
        "--db", db, "diff", lived, "--from", "0", "--to", "1", "--json"
    ).json()
    assert {c["path"]: c["new"] for c in from_nothing}["id"] == lived
    assert all(c["path"] for c in from_nothing)  # no line for the whole state

    same = cli("--db", db, "diff", lived, "--from", "4", "--to", "4")
    assert same.code == 0 and same.out == ""
    assert "nothing changed" in same.err
    beyond = cli("--db", db, "diff", lived, "--from", "1", "--to", "9999")
    assert beyond.code == 1
    assert f"has versions 0 to {events[-1].version}" in beyond.err


@pytest.mark.both_backends
def test_verify_finds_a_tampered_projection_and_repair_fixes_it(
    cli: Run,
    db: str,
    lived: str,
) -> None:
    ok = cli("--db", db, "verify")
    assert ok.code == 0, ok.out + ok.err
    assert "projections agree" in ok.err
    assert cli("--db", db, "verify", "--json").json()["ok"] is True

    engine = sa.create_engine(db)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.update(sandboxes)
                .where(sandboxes.c.id == lived)
                .values(state="stopped")
            )
    finally:
        engine.dispose()

    bad = cli("--db", db, "verify")
    assert bad.code == 1
    assert f"sandboxes[{lived}]" in bad.out
    assert "'stopped'" in bad.out and "'running'" in bad.out
    assert "verify --repair" in bad.err
    report = cli("--db", db, "verify", "--json")
    assert report.code == 1
    assert report.json()["ok"] is False
    assert report.json()["differences"][0]["key"] == lived

    repaired = cli("--db", db, "verify", "--repair")
    assert repaired.code == 0, repaired.out + repaired.err
    assert cli("--db", db, "show", lived, "--json").json()["state"] == "running"
    assert cli("--db", db, "verify").code == 0
