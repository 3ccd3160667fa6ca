"""The installed ``wrenn-engine`` script, run as a real process."""

from __future__ import annotations

import os
import select
import signal
import subprocess
from pathlib import Path

import pytest

from tests.cli.conftest import append_sandbox, script
from wrenn_engine.store import open_store


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith("WRENN_ENGINE_")
    }
    environment.update(
        {
            "WRENN_ENGINE_HOME": str(tmp_path / "home"),
            "WRENN_ENGINE_DB": f"sqlite:///{tmp_path / 'engine.db'}",
            "WRENN_ENGINE_DRIVERS": "fake",
            "WRENN_ENGINE_FAKE_HOST": str(tmp_path / "fake-host.json"),
            "WRENN_ENGINE_RUN_DIR": str(run_dir),
        }
    )
    return environment


def run(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [script(), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_exit_statuses_of_the_real_process(env: dict[str, str], tmp_path: Path) -> None:
    helped = run(env, "--help")
    assert helped.returncode == 0
    assert "events" in helped.stdout and "replay" in helped.stdout

    usage = run(env, "replay", "--to-version", "x")
    assert usage.returncode == 2
    assert "usage:" in usage.stderr

    behind = run(env, "ls")
    assert behind.returncode == 1
    assert behind.stderr.count("\n") == 1
    assert "db upgrade" in behind.stderr
    assert "Traceback" not in behind.stderr

    assert run(env, "db", "upgrade").returncode == 0
    missing = run(env, "show", "sb-nosuch")
    assert missing.returncode == 1
    assert missing.stderr.startswith("wrenn-engine: error: sandbox sb-nosuch does not")

    names = run(env, "debug", "failpoints")
    assert names.returncode == 0
    assert "vmm.launch.done" in names.stdout.split()


def test_create_prints_only_the_id_on_stdout(
    env: dict[str, str], tmp_path: Path
) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"stand-in")
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"\0" * 4096)
    assert run(env, "db", "upgrade").returncode == 0

    created = run(
        env,
        "create",
        "--kernel",
        str(kernel),
        "--image",
        str(image),
        "--vmm",
        "simulator",
        "--id",
        "sb-proc",
        "-v",
    )
    assert created.returncode == 0, created.stderr
    assert created.stdout == "sb-proc\n"
    assert "start: vm.boot done" in created.stderr

    destroyed = run(env, "destroy", "sb-proc")
    assert destroyed.returncode == 0
    assert destroyed.stdout.split() == ["sb-proc", "destroyed"]


def test_follow_streams_until_sigterm(env: dict[str, str]) -> None:
    assert run(env, "db", "upgrade").returncode == 0
    follower = subprocess.Popen(
        [script(), "events", "--follow", "--jsonl"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        store = open_store(env["WRENN_ENGINE_DB"])
        try:
            append_sandbox(store, "sb-live", actor="ops")
        finally:
            store.close()
        assert follower.stdout is not None
        ready, _, _ = select.select([follower.stdout], [], [], 30)
        assert ready, "the follower printed nothing within 30 s"
        line = follower.stdout.readline()
        assert '"sandbox_id": "sb-live"' in line

        follower.send_signal(signal.SIGTERM)
        assert follower.wait(timeout=30) == 0
        assert follower.stderr is not None
        assert "Traceback" not in follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
