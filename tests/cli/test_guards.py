"""Guards a newcomer runs into: reading never creates a database, dropping
the log needs a confirmation, a mistyped event type is a usage error."""

from __future__ import annotations

from pathlib import Path

from tests.cli.conftest import Run


def test_reading_a_missing_database_creates_nothing(cli: Run, tmp_path: Path):
    missing = tmp_path / "typo.db"

    for argv in (["ls"], ["events"], ["verify"]):
        result = cli("--db", f"sqlite:///{missing}", *argv)
        assert result.code == 1, argv
        assert "no database at" in result.err and "db upgrade" in result.err

    assert not missing.exists()


def test_dropping_the_whole_log_needs_yes(cli: Run, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert cli("--db", url, "db", "upgrade").code == 0

    refused = cli("--db", url, "db", "downgrade", "base")
    assert refused.code == 1 and "--yes" in refused.err
    assert cli("--db", url, "ls").code == 0  # the schema is still there

    assert cli("--db", url, "db", "downgrade", "base", "--yes").code == 0


def test_an_unknown_event_type_is_a_usage_error(cli: Run, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    cli("--db", url, "db", "upgrade")

    result = cli("--db", url, "events", "--type", "step.faild")

    assert result.code == 2
    assert "'step.faild' is not an event type" in result.err


def test_a_damaged_export_is_refused(cli: Run, tmp_path: Path):
    import json
    from datetime import UTC, datetime

    from wrenn_engine.domain.events import (
        Metadata,
        RecordedEvent,
        SandboxCreated,
        StepStarted,
    )

    def line(version: int, event) -> str:  # type: ignore[no-untyped-def]
        new = event.to_new()
        return json.dumps(
            RecordedEvent(
                version,
                "sb-x",
                version,
                new.type,
                1,
                new.data,
                Metadata("a"),
                datetime.now(UTC),
            ).to_dict()
        )

    created = SandboxCreated({"sandbox_id": "sb-x"}, "host-a")
    step = StepStarted("start", "sandbox.dir", {})
    cases = {
        "gap": [line(1, created), line(3, step)],
        "repeat": [line(1, created), line(1, created)],
        "fields": [line(1, created).replace('"host_id": "host-a"', '"hostid": 1')],
    }
    for name, lines in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        result = cli("replay", "--file", str(path))
        assert result.code == 1, (name, result)
        assert "unexpected error" not in result.err
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    result = cli("replay", "--file", str(binary))
    assert result.code == 1 and "not UTF-8" in result.err
