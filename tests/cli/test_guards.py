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
