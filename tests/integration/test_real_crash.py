"""Crash at every failpoint with the real drivers, then reconcile.

A child process runs one command with a failpoint armed as ``crash`` and is
killed there with SIGKILL. The parent opens an engine (which reconciles) and
checks what the kernel reports: every namespace, link, nft table, VMM process
and loop device left is one the log says a live sandbox holds; projections
match a rebuild; and after destroy nothing at all remains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.integration.conftest import RealHost
from wrenn_engine.domain.state import STABLE_STATES
from wrenn_engine.lifecycle.pipelines import default_pipelines

pytestmark = [pytest.mark.host, pytest.mark.slow]

CHILD = textwrap.dedent("""
    import json, sys
    from wrenn_engine.engine import Engine, EngineSettings
    from wrenn_engine.host.network import NetworkSettings
    from wrenn_engine.host.rootfs import RootfsSettings
    from wrenn_engine.host.vmm.driver import VmmSettings

    host = json.loads(sys.argv[1])
    settings = EngineSettings(
        host_id="host-real", vmm="simulator", run_dir=host["run_dir"],
        workers=False, reconcile_on_open=False,
        network=NetworkSettings(prefix=host["prefix"], host_netns=host["host_netns"],
                                max_slots=64),
        rootfs=RootfsSettings(strategy="auto", work_dir=host["work_dir"]),
        vmm_driver=VmmSettings(owner=host["owner"]),
    )
    engine = Engine.open(host["url"], settings=settings, auto_upgrade=True)
    getattr(engine, sys.argv[2])("sb-crash")
    print("survived")
""")

SETUPS = {
    "start": [],
    "pause": ["start"],
    "resume": ["start", "pause"],
    "stop": ["start"],
    "destroy": ["start"],
}


def _cases() -> list[tuple[str, str]]:
    pipelines = default_pipelines()
    return [
        (command, point)
        for command in SETUPS
        for step in pipelines[command].names()
        for point in (step, f"{step}.done")
    ]


@pytest.mark.parametrize(("command", "failpoint"), _cases())
def test_real_crash_then_reconcile(real_host: RealHost, command, failpoint):
    setup = real_host.open()
    setup.create(
        kernel_path=real_host.kernel,
        rootfs_path=real_host.image,
        sandbox_id="sb-crash",
        start=False,
    )
    for step in SETUPS[command]:
        getattr(setup, step)("sb-crash")
    setup.close()
    real_host.engines.remove(setup)

    fields = {
        k: getattr(real_host, k)
        for k in ("prefix", "host_netns", "owner", "work_dir", "run_dir", "url")
    }
    env = {**os.environ, "WRENN_ENGINE_FAILPOINTS": f"{failpoint}=crash"}
    crashed = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(fields), command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert crashed.returncode == -9, (crashed.stdout, crashed.stderr)

    engine = real_host.open()
    sandbox = engine.get("sb-crash")
    assert sandbox.state in STABLE_STATES and sandbox.transition is None, (
        sandbox.to_dict()
    )
    assert engine.store.verify_projections() == []

    held = {(r.kind, r.name) for r in engine.store.held_resources("host-real")}
    assert {("netns", n) for n in real_host.namespaces()} <= held
    assert {("veth", n) for n in real_host.host_links() if n.endswith("h")} <= held
    assert {("nft_table", n) for n in real_host.nft_tables()} <= held
    assert {("vmm", str(p)) for p in real_host.vmm_pids()} <= held
    if sandbox.state == "running":
        assert len(real_host.vmm_pids()) == 1
        assert engine.pause("sb-crash").state == "paused"

    if sandbox.state != "destroyed":
        engine.destroy("sb-crash")
    assert real_host.leftovers() == {}
