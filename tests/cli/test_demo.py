"""``wrenn-engine demo`` end to end, and that it leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli.conftest import script
from tests.conftest import require_root, require_tool

DEMO_MARK = "wrenn-demo-"


@dataclass(frozen=True)
class Traces:
    """Everything on this machine that a demo run could have left."""

    tmp_dirs: frozenset[str]
    netns: frozenset[str]
    loops: frozenset[str]
    processes: frozenset[str]
    nft_tables: frozenset[str]


def traces() -> Traces:
    tmp = frozenset(n for n in os.listdir("/tmp") if n.startswith(DEMO_MARK))
    try:
        netns = frozenset(n for n in os.listdir("/run/netns") if "demo-" in n)
    except FileNotFoundError:
        netns = frozenset()
    loops: frozenset[str] = frozenset()
    if os.geteuid() == 0:
        listed = subprocess.run(
            ["losetup", "-J", "-l"], capture_output=True, text=True, check=False
        ).stdout
        devices = json.loads(listed)["loopdevices"] if listed.strip() else []
        loops = frozenset(
            d["name"] for d in devices if DEMO_MARK in (d.get("back-file") or "")
        )
    processes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if f"/tmp/{DEMO_MARK}" in cmdline:
            processes.add(f"{pid} {cmdline}")
    tables: frozenset[str] = frozenset()
    if os.geteuid() == 0 and _has("nft"):
        listed = subprocess.run(
            ["nft", "list", "tables"], capture_output=True, text=True, check=False
        ).stdout
        tables = frozenset(
            line for line in listed.splitlines() if re.search(r"\bwd[0-9a-f]{4}-", line)
        )
    return Traces(tmp, netns, loops, frozenset(processes), tables)


def _has(tool: str) -> bool:
    from shutil import which

    return which(tool) is not None


def demo_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WRENN_ENGINE_")}
    env["WRENN_ENGINE_HOME"] = str(tmp_path / "home")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_demo(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [script(), "demo", *argv],
        env=demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def check_story(out: str) -> None:
    for command, state in (
        ("create", "running"),
        ("pause", "paused"),
        ("resume", "running"),
        ("destroy", "destroyed"),
    ):
        assert re.search(rf"^{command}\s+-> {state}\b", out, re.M), out
    assert "Timeline of demo-" in out
    assert "transition.completed" in out
    assert "Replay --explain" in out
    assert re.search(r"sandbox demo-\w+ is destroyed at version \d+", out)
    assert "left on the host after destroy: nothing" in out


def test_demo_on_stand_in_drivers_leaves_nothing(tmp_path: Path) -> None:
    before = traces()
    result = run_demo(tmp_path, "--fake")
    assert result.returncode == 0, result.stdout + result.stderr
    check_story(result.stdout)
    assert "in-memory stand-ins" in result.stdout
    assert traces() == before
    assert not (tmp_path / "home").exists()


@pytest.mark.host
def test_demo_with_the_real_drivers_leaves_nothing(tmp_path: Path) -> None:
    require_root()
    require_tool("nft", "mkfs.ext4", "ip")
    before = traces()
    result = run_demo(tmp_path)
    after = traces()
    assert result.returncode == 0, result.stdout + result.stderr
    check_story(result.stdout)
    assert "drivers: real rootfs, network and VMM drivers" in result.stdout
    assert after == before


@pytest.mark.host
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_demo_cleans_up(tmp_path: Path, signum: int) -> None:
    require_root()
    require_tool("nft", "mkfs.ext4", "ip")
    before = traces()
    demo = subprocess.Popen(
        [script(), "demo"],
        env=demo_env(tmp_path),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 60
        seen = ""
        while not re.search(r"^create\s+->", seen, re.M):
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([demo.stdout], [], [], 1)
            if ready:
                line = demo.stdout.readline()
                assert line, f"the demo ended early: {seen}"
                seen += line
        demo.send_signal(signum)
        code = demo.wait(timeout=60)
        rest = demo.stdout.read()
        assert demo.stderr is not None
        errors = demo.stderr.read()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert code in (0, 130), seen + rest + errors
    if code == 130:
        assert "interrupted" in errors
    assert "Traceback" not in errors
    assert traces() == before


def test_demo_without_root_says_what_it_skips(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from wrenn_engine.cli.main import main

    monkeypatch.setenv("WRENN_ENGINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WRENN_ENGINE_DB", raising=False)
    from wrenn_engine.cli import demo

    monkeypatch.setattr(demo, "is_root", lambda: False)
    before = traces()
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    check_story(out)
    assert "the real rootfs, network and VMM drivers need root" in out
    assert "run `sudo wrenn-engine demo`" in out
    assert traces() == before
    assert not (tmp_path / "home").exists()
