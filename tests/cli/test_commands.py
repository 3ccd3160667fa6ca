"""The commands that act, the sandbox queries, exit statuses and error lines."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli.conftest import Run, listing
from wrenn_engine.cli import commands
from wrenn_engine.store.migrate import head_revision

SANDBOX_KEYS = {
    "id",
    "state",
    "version",
    "host_id",
    "config",
    "transition",
    "resources",
    "facts",
    "created_at",
    "updated_at",
    "last_error",
}
EVENT_KEYS = {
    "position",
    "sandbox_id",
    "version",
    "type",
    "schema_version",
    "recorded_at",
    "actor",
    "data",
    "metadata",
}


def fake_objects(tmp_path: Path) -> list[str]:
    data = json.loads((tmp_path / "fake-host.json").read_text())
    return list(data["objects"])


def test_help_is_status_0_and_usage_errors_are_2(cli: Run) -> None:
    assert cli("--help").code == 0
    assert cli().code == 2
    assert cli("no-such-command").code == 2
    missing = cli("create", "--kernel", "k")
    assert missing.code == 2
    assert "--image" in missing.err
    assert cli("events", "--limit", "0").code == 2
    assert cli("diff", "sb-x", "--from", "5", "--to", "2").code == 2
    assert cli("events", "--follow", "--json").code == 2
    assert cli("replay").code == 2


def test_db_current_reports_before_and_after_upgrade(cli: Run, db_url: str) -> None:
    before = cli("--db", db_url, "db", "current", "--json")
    assert before.code == 0, before.err
    assert before.json()["current"] is None
    assert before.json()["up_to_date"] is False

    assert cli("db", "upgrade", "--db", db_url).code == 0
    again = cli("db", "upgrade", "--db", db_url)
    assert again.code == 0
    assert "already" in again.err

    after = cli("db", "current", "--json", "--db", db_url).json()
    assert after["current"] == after["head"] == head_revision()
    assert after["up_to_date"] is True


def test_db_current_never_creates_a_sqlite_file(cli: Run, tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    result = cli("--db", f"sqlite:///{path}", "db", "current")
    assert result.code == 0
    assert "no schema" in result.out
    assert not path.exists()


def test_a_database_behind_is_refused_with_the_upgrade_command(
    cli: Run,
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    result = cli("--db", url, "ls")
    assert result.code == 1
    assert "db upgrade" in result.err
    assert len(result.err.strip().splitlines()) == 1


@pytest.mark.both_backends
def test_a_sandbox_lives_through_every_command(
    cli: Run,
    db: str,
    create: Callable[..., str],
    tmp_path: Path,
) -> None:
    sandbox_id = create("--vcpus", "2", "--memory-mb", "256", "--label", "team=a")
    assert sandbox_id.startswith("sb-")

    shown = cli("--db", db, "show", sandbox_id, "--json").json()
    assert set(shown) >= SANDBOX_KEYS
    assert shown["state"] == "running"
    assert shown["config"]["vcpus"] == 2
    assert shown["labels"] == {"team": "a"}
    assert fake_objects(tmp_path)

    for command, state in (
        ("pause", "paused"),
        ("resume", "running"),
        ("stop", "stopped"),
        ("start", "running"),
        ("destroy", "destroyed"),
    ):
        result = cli("--db", db, command, sandbox_id)
        assert result.code == 0, result.err
        assert result.out.split() == [sandbox_id, state]

    listed = cli("ls", "--db", db, "--json").json()
    assert [(s["id"], s["state"]) for s in listed] == [(sandbox_id, "destroyed")]
    assert fake_objects(tmp_path) == []

    text = cli("--db", db, "show", sandbox_id)
    assert "state:" in text.out and "destroyed" in text.out
    assert "holds: nothing" in text.out


def test_create_no_start_json_and_explicit_id(
    cli: Run, db: str, create: Callable[..., str]
) -> None:
    created = json.loads(
        create("--no-start", "--id", "sb-mine", "--timeout", "90", "--json")
    )
    assert created["id"] == "sb-mine"
    assert created["state"] == "pending"
    assert created["inactivity_timeout_s"] == 90

    again = cli(
        "--db",
        db,
        "create",
        "--kernel",
        created["config"]["kernel_path"],
        "--image",
        created["config"]["rootfs_path"],
        "--id",
        "sb-mine",
        "--vmm",
        created["config"]["vmm_bin"],
    )
    assert again.code == 1
    assert "already exists" in again.err


def test_actor_and_command_id_are_recorded_and_replayed(
    cli: Run,
    db: str,
    create: Callable[..., str],
) -> None:
    sandbox_id = create("--actor", "alice")
    events = cli("--db", db, "events", "--sandbox", sandbox_id, "--json").json()
    assert {e["actor"] for e in events} == {"alice"}

    first = cli("--db", db, "pause", sandbox_id, "--command-id", "op-1")
    assert first.code == 0
    count = len(cli("--db", db, "events", "--sandbox", sandbox_id, "--json").json())
    second = cli("--db", db, "pause", sandbox_id, "--command-id", "op-1")
    assert second.code == 0
    assert second.out.split() == [sandbox_id, "paused"]
    after = cli("--db", db, "events", "--sandbox", sandbox_id, "--json").json()
    assert len(after) == count
    assert after[-1]["metadata"]["command_id"] == "op-1"


def test_expected_errors_are_one_line_and_status_1(
    cli: Run,
    db: str,
    create: Callable[..., str],
) -> None:
    missing = cli("--db", db, "show", "sb-nosuch")
    assert missing.code == 1
    assert missing.err.count("\n") == 1
    assert "does not exist" in missing.err
    assert f"wrenn-engine --db {db} ls" in missing.err  # names the database given
    assert "Traceback" not in missing.err

    sandbox_id = create()
    wrong = cli("--db", db, "resume", sandbox_id)
    assert wrong.code == 1
    assert f"sandbox {sandbox_id}: cannot resume while running" in wrong.err
    assert wrong.err.count("\n") == 1


def test_a_failed_step_names_the_replay_that_explains_it(
    cli: Run,
    db: str,
    files: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    def create(sandbox_id: str, failpoint: str) -> str:
        monkeypatch.setenv("WRENN_ENGINE_FAILPOINTS", failpoint)
        failed = cli(
            "--db",
            db,
            "create",
            "--id",
            sandbox_id,
            "--kernel",
            files["kernel"],
            "--image",
            files["image"],
            "--vmm",
            files["vmm"],
        )
        monkeypatch.delenv("WRENN_ENGINE_FAILPOINTS")
        assert failed.code == 1
        assert failed.out == ""
        assert f"replay {sandbox_id} --explain" in failed.err
        return failed.err

    err = create("sb-back", "network.prepare=error")
    assert "step network.prepare failed" in err
    explained = cli("--db", db, "replay", "sb-back", "--explain")
    assert explained.code == 0
    assert "sandbox sb-back is pending" in explained.out
    assert (
        "The start command was rolled back: step network.prepare failed: "
        "failpoint network.prepare fired"
    ) in explained.out
    assert (
        "Undone, in order: network.prepare, rootfs.prepare, sandbox.dir."
        in explained.out
    )
    assert "It holds nothing on its host." in explained.out
    assert fake_objects(tmp_path) == []

    # A command that releases things cannot be taken back: it lands in
    # error, and the explanation says how to get rid of what is left.
    sandbox_id = "sb-stuck"
    assert (
        cli(
            "--db",
            db,
            "create",
            "--id",
            sandbox_id,
            "--kernel",
            files["kernel"],
            "--image",
            files["image"],
            "--vmm",
            files["vmm"],
        ).code
        == 0
    )
    monkeypatch.setenv("WRENN_ENGINE_FAILPOINTS", "network.release=error")
    failed = cli("--db", db, "destroy", sandbox_id)
    monkeypatch.delenv("WRENN_ENGINE_FAILPOINTS")
    assert failed.code == 1
    assert "step network.release failed" in failed.err
    stuck = cli("--db", db, "replay", sandbox_id, "--explain").out
    assert "sandbox sb-stuck is error" in stuck
    assert "The destroy command failed: step network.release failed" in stuck
    assert "Nothing was undone." in stuck
    assert "`wrenn-engine destroy sb-stuck` removes what it still holds." in stuck
    assert fake_objects(tmp_path)
    assert cli("--db", db, "destroy", sandbox_id).code == 0
    assert fake_objects(tmp_path) == []


def test_unexpected_errors_say_how_to_see_the_traceback(
    cli: Run,
    db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(args: object) -> int:
        raise RuntimeError("something odd")

    monkeypatch.setattr(commands, "ls", broken)
    plain = cli("--db", db, "ls")
    assert plain.code == 1
    assert plain.err.strip() == (
        "wrenn-engine: unexpected error: RuntimeError: "
        "something odd; run with --debug for the traceback"
    )

    debug = cli("--db", db, "ls", "--debug")
    assert debug.code == 1
    assert "Traceback" in debug.err


def test_host_commands_need_root_with_the_real_drivers(
    cli: Run,
    db: str,
    files: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WRENN_ENGINE_DRIVERS", "linux")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for argv in (
        ("create", "--kernel", files["kernel"], "--image", files["image"]),
        ("pause", "sb-x"),
        ("reconcile",),
    ):
        result = cli("--db", db, *argv)
        assert result.code == 1
        assert "needs root; run it with sudo" in result.err

    monkeypatch.setenv("WRENN_ENGINE_DRIVERS", "pretend")
    wrong = cli("--db", db, "pause", "sb-x")
    assert wrong.code == 1
    assert "WRENN_ENGINE_DRIVERS='pretend'" in wrong.err


def test_db_is_accepted_before_after_and_from_the_environment(
    cli: Run,
    db: str,
    create: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sandbox_id = create()
    before = cli("--db", db, "ls", "--json").json()
    after = cli("ls", "--json", "--db", db).json()
    monkeypatch.setenv("WRENN_ENGINE_DB", db)
    from_env = cli("ls", "--json").json()
    assert (
        [s["id"] for s in before]
        == [s["id"] for s in after]
        == [s["id"] for s in from_env]
        == [sandbox_id]
    )


@pytest.mark.both_backends
def test_ls_filters_by_state_and_host(
    cli: Run, db: str, create: Callable[..., str]
) -> None:
    running = create()
    pending = create("--no-start")
    by_state = cli("--db", db, "ls", "--state", "pending", "--json").json()
    assert [s["id"] for s in by_state] == [pending]
    both = cli("--db", db, "ls", "--state", "pending", "--state", "running", "--json")
    assert {s["id"] for s in both.json()} == {running, pending}
    assert cli("--db", db, "ls", "--host", "host-b", "--json").json() == []
    assert len(cli("--db", db, "ls", "--host", "host-a", "--json").json()) == 2
    assert cli("--db", db, "ls", "--state", "bogus").code == 2

    table = cli("--db", db, "ls")
    assert table.out.splitlines()[0].split()[:3] == ["ID", "STATE", "VER"]
    assert running in table.out and pending in table.out


def test_reconcile_reports_what_it_did(
    cli: Run, db: str, create: Callable[..., str], tmp_path: Path
) -> None:
    sandbox_id = create()
    data = json.loads((tmp_path / "fake-host.json").read_text())
    data["objects"].append("netns:wrenn-sb-stray")
    (tmp_path / "fake-host.json").write_text(json.dumps(data))

    result = cli("--db", db, "reconcile", "--json")
    assert result.code == 0, result.err
    actions = result.json()
    assert any("wrenn-sb-stray" in action for action in actions)
    assert "netns:wrenn-sb-stray" not in fake_objects(tmp_path)

    assert any(f"{sandbox_id}: adopted" in action for action in actions)
    # Reconcile records its removal on the host's own stream, not a sandbox.
    removed = cli("--db", db, "events", "--sandbox", "host.host-a", "--json").json()
    assert [e["data"]["name"] for e in removed] == ["wrenn-sb-stray"]
    assert [s["id"] for s in cli("--db", db, "ls", "--json").json()] == [sandbox_id]

    assert cli("--db", db, "destroy", sandbox_id).code == 0
    again = cli("--db", db, "reconcile")
    assert again.code == 0
    assert again.out == ""
    assert "nothing to do" in again.err


def test_debug_failpoints_lists_every_step_without_a_database(
    cli: Run,
    home: Path,
) -> None:
    from wrenn_engine.lifecycle.pipelines import default_pipelines

    result = cli("debug", "failpoints")
    assert result.code == 0
    names = result.out.split()
    steps = [
        "config.apply_defaults",
        "config.validate",
        *default_pipelines().step_names(),
    ]
    assert names == [n for step in steps for n in (step, f"{step}.done")]
    assert "network.prepare" in names and "vm.boot.done" in names
    assert cli("debug", "failpoints", "--json").json() == names
    assert listing(home) == []
