"""Crash at every failpoint, reconcile, and check nothing is left behind.

A child process runs a command with one failpoint armed as ``crash`` (it is
killed with SIGKILL there). The fake host lives in a JSON file so the child's
"host objects" outlive it. The parent then opens an engine, which reconciles,
and checks: the sandbox rests in a stable state, the projections match a
rebuild from the events, every object on the host is one the log says a live
sandbox holds, and after destroy nothing at all remains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.lifecycle.conftest import settings_for
from wrenn_engine.domain.state import STABLE_STATES
from wrenn_engine.engine import Engine
from wrenn_engine.host.fake import FakeHost
from wrenn_engine.lifecycle.failpoints import Failpoints
from wrenn_engine.lifecycle.machine import COMMANDS
from wrenn_engine.lifecycle.pipelines import default_pipelines

CHILD = textwrap.dedent("""
    import json, sys
    from wrenn_engine.engine import Engine, EngineSettings
    from wrenn_engine.host.fake import FakeHost
    from wrenn_engine.lifecycle.settings import LifecycleSettings

    url, host_file, files_json, setup, command = sys.argv[1:6]
    files = json.loads(files_json)
    settings = EngineSettings(host_id="host-a", vmm=files["vmm"],
                              run_dir=files["run_dir"], workers=False,
                              reconcile_on_open=False)
    engine = Engine.open(url, drivers=FakeHost(path=host_file).drivers(),
                         settings=settings, auto_upgrade=True)
    if setup == "create":
        engine.create(kernel_path=files["kernel"], rootfs_path=files["image"],
                      sandbox_id="sb-crash", start=False)
    getattr(engine, command)("sb-crash")
    print("survived")
""")

# (command, how to bring the sandbox to the state the command starts from)
SETUPS = {
    "start": [],
    "pause": ["start"],
    "resume": ["start", "pause"],
    "stop": ["start"],
    "destroy": ["start"],
}


def _cases() -> list[tuple[str, str]]:
    pipelines = default_pipelines()
    cases = []
    for command in SETUPS:
        for step in pipelines[command].names():
            cases += [(command, step), (command, f"{step}.done")]
    return cases


def _finished_state(command: str, failpoint: str) -> str | None:
    """Where a crash at ``failpoint`` must leave the sandbox when the command's
    point of no return had completed before it."""
    spec = COMMANDS[command]
    if not spec.roll_forward_after:
        return None
    names = default_pipelines()[command].names()
    step = failpoint.removesuffix(".done")
    point = names.index(spec.roll_forward_after)
    past = names.index(step) > point
    return str(spec.target) if past else None


def _child(
    url: str,
    host_file: str,
    files: dict[str, str],
    setup: str,
    command: str,
    failpoint: str | None,
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("WRENN_ENGINE_FAILPOINTS", None)
    if failpoint:
        env["WRENN_ENGINE_FAILPOINTS"] = f"{failpoint}=crash"
    return subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            url,
            host_file,
            json.dumps(files),
            setup,
            command,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("command", "failpoint"), _cases())
def test_crash_then_reconcile_leaves_host_and_log_agreeing(
    tmp_path, files, sqlite_url, command, failpoint
):
    host_file = str(tmp_path / "host.json")
    setup = Engine.open(
        sqlite_url,
        drivers=FakeHost(path=host_file).drivers(),
        settings=settings_for(files),
        failpoints=Failpoints({}),
        auto_upgrade=True,
    )
    try:
        setup.create(
            kernel_path=files["kernel"],
            rootfs_path=files["image"],
            sandbox_id="sb-crash",
            start=False,
        )
        for step in SETUPS[command]:
            getattr(setup, step)("sb-crash")
    finally:
        setup.close()
    setup_done = "none"

    crashed = _child(sqlite_url, host_file, files, setup_done, command, failpoint)
    assert crashed.returncode == -9, (crashed.stdout, crashed.stderr)

    host = FakeHost(path=host_file)
    engine = Engine.open(
        sqlite_url,
        drivers=host.drivers(),
        settings=settings_for(files),
        failpoints=Failpoints({}),
        auto_upgrade=True,
    )
    try:
        sandbox = engine.get("sb-crash")
        assert sandbox.state in STABLE_STATES, sandbox.to_dict()
        assert sandbox.transition is None
        finished = _finished_state(command, failpoint)
        if finished:  # past the point of no return: finished, not undone
            assert sandbox.state == finished, sandbox.last_error
        assert engine.store.verify_projections() == []
        held = {f"{r.kind}:{r.name}" for r in engine.store.held_resources("host-a")}
        assert host.objects <= held, (host.objects, held)

        if sandbox.state != "destroyed":
            engine.destroy("sb-crash")
        assert host.objects == set()
        assert not os.path.exists(os.path.join(files["run_dir"], "sb-crash"))
        assert engine.store.verify_projections() == []
    finally:
        engine.close()
