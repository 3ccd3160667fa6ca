"""The launcher and the driver: namespaces, sockets, failures, stopping,
recognising processes, leftovers; and the event monitor."""

# Fixtures imported from test_vmm_fixtures come back as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root, unique
from tests.host.test_vmm_fixtures import (  # noqa: F401 - fixtures
    Sandbox,
    driver,
    event_names,
    kill_and_reap,
    make_driver,
    make_sandbox,
    netns,
    owner,
    pid_gone,
    sandbox,
    wait_for,
)
from wrenn_engine.errors import ConfigError, HostError, ResourceBusy, VmmError
from wrenn_engine.host.base import VmmDriver, VmmProcess
from wrenn_engine.host.vmm import launcher
from wrenn_engine.host.vmm.driver import (
    CloudHypervisorDriver,
    VmmSettings,
    find_cloud_hypervisor,
)
from wrenn_engine.host.vmm.monitor import (
    PANIC,
    POWEROFF,
    VMM_EXIT,
    EventMonitor,
    GuestExit,
    VmmEvent,
    read_events,
)

MakeDriver = Callable[..., CloudHypervisorDriver]


def test_driver_implements_the_protocol(driver: CloudHypervisorDriver) -> None:
    assert isinstance(driver, VmmDriver)


def files_left(box: Sandbox) -> list[str]:
    return [p for p in (box.socket, box.socket + ".lock") if os.path.lexists(p)]


# --- launching ------------------------------------------------------------------------


@pytest.mark.host
def test_launch_runs_the_vmm_inside_the_namespace(
    netns: str,
    tmp_path: Path,
    driver: CloudHypervisorDriver,
    owner: str,
) -> None:
    box = make_sandbox(tmp_path, netns)
    os.rmdir(box.dir)
    process = driver.launch(box.spec(), 10)
    pid = process.pid

    namespace = os.stat(f"/proc/{pid}/ns/net").st_ino
    assert namespace == os.stat(f"/run/netns/{netns}").st_ino
    assert namespace != os.stat("/proc/self/ns/net").st_ino
    # Born there (no trampoline), and no thread of the engine stayed there.
    assert os.stat(f"/proc/{pid}/task/{pid}/ns/net").st_ino == namespace
    assert wait_for(lambda: namespace not in _thread_namespaces().values(), 5)
    assert launcher.read_cmdline(pid) == process.argv
    assert process.argv[:6] == tuple(launcher.simulator_program())
    assert process.argv[6:8] == ("--api-socket", f"path={box.socket}")
    assert (launcher.read_stat(pid) or ("", 0))[1] == process.start_time
    env = launcher.read_environ(pid) or {}
    assert env[launcher.OWNER_ENV] == owner
    assert env[launcher.SANDBOX_ENV] == box.id
    for fd in (1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == box.log
    assert os.getsid(pid) == pid != os.getsid(0)
    assert stat.S_IMODE(os.stat(box.dir).st_mode) == 0o700
    assert driver.is_running(process)

    driver.shutdown(process, box.socket, 5)
    assert pid_gone(pid)
    assert not driver.is_running(process)
    assert files_left(box) == []
    assert event_names(box.events)[-1] == "vmm.shutdown"
    driver.shutdown(process, box.socket, 5)


def _thread_namespaces() -> dict[int, int]:
    """Network namespace (inode) of each thread of this process. A thread
    that has been joined may still be listed for a moment while it exits."""
    found: dict[int, int] = {}
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):
            found[int(tid)] = os.stat(f"/proc/self/task/{tid}/ns/net").st_ino
    return found


@pytest.mark.host
def test_a_vmm_started_in_a_namespace_is_reaped_by_the_engine(
    netns: str, tmp_path: Path, driver: CloudHypervisorDriver
) -> None:
    """The thread that forked the VMM has ended; the engine still is its
    parent, reaps it and knows how it ended."""
    box = make_sandbox(tmp_path, netns)
    process = driver.launch(box.spec(), 10)

    assert launcher.read_stat(process.pid) is not None
    with open(f"/proc/{process.pid}/status") as handle:
        parent = [line for line in handle if line.startswith("PPid:")]
    assert parent == [f"PPid:\t{os.getpid()}\n"]
    os.kill(process.pid, signal.SIGKILL)
    assert driver.wait_exit(process, 5) == -signal.SIGKILL
    assert launcher.read_stat(process.pid) is None
    driver.shutdown(process, box.socket, 5)
    assert files_left(box) == []


@pytest.mark.host
def test_a_vmm_that_cannot_start_in_a_namespace_leaves_nothing(
    netns: str, tmp_path: Path, driver: CloudHypervisorDriver, owner: str
) -> None:
    box = make_sandbox(tmp_path, netns)
    box.binary = str(tmp_path / "broken-cloud-hypervisor")
    Path(box.binary).write_text("#!/no/such/interpreter\n")
    Path(box.binary).chmod(0o755)

    with pytest.raises(VmmError) as failure:
        driver.launch(box.spec(), 10)

    assert f"cannot start {box.binary}" in failure.value.detail
    assert launcher.find_marked(owner) == []
    assert files_left(box) == []
    namespace = os.stat(f"/run/netns/{netns}").st_ino
    assert wait_for(lambda: namespace not in _thread_namespaces().values(), 5)


def test_launch_into_a_missing_namespace_fails_cleanly(
    sandbox: Sandbox,
    driver: CloudHypervisorDriver,
    owner: str,
) -> None:
    sandbox.netns = unique("wnons")
    with pytest.raises(VmmError) as failure:
        driver.launch(sandbox.spec(), 10)
    assert f"cannot enter network namespace {sandbox.netns!r}" in (failure.value.detail)
    assert isinstance(failure.value.__cause__, FileNotFoundError)
    assert launcher.find_marked(owner) == []
    assert files_left(sandbox) == []


def test_a_stale_socket_is_removed_before_launch(
    sandbox: Sandbox, driver: CloudHypervisorDriver
) -> None:
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(sandbox.socket)
    leftover.close()
    assert launcher.socket_state(sandbox.socket) == "stale"

    process = driver.launch(sandbox.spec(), 10)
    assert driver.client(sandbox.socket).ping()["pid"] == process.pid
    driver.shutdown(process, sandbox.socket, 5)


def test_a_live_socket_or_other_file_refuses_launch(
    sandbox: Sandbox,
    driver: CloudHypervisorDriver,
    owner: str,
) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(sandbox.socket)
        listener.listen(1)
        with pytest.raises(ResourceBusy) as busy:
            driver.launch(sandbox.spec(), 10)
        assert busy.value.name == sandbox.socket
        assert launcher.find_marked(owner) == []
        assert launcher.socket_state(sandbox.socket) == "live"
        with pytest.raises(ResourceBusy):
            driver.remove_leftover("socket", sandbox.socket)
    os.unlink(sandbox.socket)

    Path(sandbox.socket).write_text("not a socket")
    with pytest.raises(ResourceBusy):
        driver.launch(sandbox.spec(), 10)
    assert Path(sandbox.socket).read_text() == "not a socket"
    assert launcher.find_marked(owner) == []


def test_a_missing_binary_fails_before_anything_starts(
    sandbox: Sandbox,
    driver: CloudHypervisorDriver,
    tmp_path: Path,
    owner: str,
) -> None:
    sandbox.binary = str(tmp_path / "no-such-cloud-hypervisor")
    with pytest.raises(VmmError) as failure:
        driver.launch(sandbox.spec(), 10)
    assert "is not an executable file" in failure.value.detail
    assert launcher.find_marked(owner) == []
    assert files_left(sandbox) == []


def fake_vmm(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-cloud-hypervisor"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return str(script)


def test_a_vmm_that_dies_at_start_leaves_nothing(
    sandbox: Sandbox,
    driver: CloudHypervisorDriver,
    tmp_path: Path,
    owner: str,
) -> None:
    sandbox.binary = fake_vmm(
        tmp_path,
        """
        import socket, sys
        path = sys.argv[sys.argv.index("--api-socket") + 1][len("path="):]
        socket.socket(socket.AF_UNIX).bind(path)
        sys.stderr.write("fake vmm: boom\\n")
        sys.exit(3)
    """,
    )
    with pytest.raises(VmmError) as failure:
        driver.launch(sandbox.spec(), 10)
    assert "status 3" in failure.value.detail
    assert "fake vmm: boom" in failure.value.detail
    assert launcher.find_marked(owner) == []
    assert files_left(sandbox) == []


def test_a_vmm_whose_api_never_answers_is_killed(
    sandbox: Sandbox,
    driver: CloudHypervisorDriver,
    tmp_path: Path,
    owner: str,
) -> None:
    sandbox.binary = fake_vmm(
        tmp_path,
        """
        import time
        print("fake vmm: sleeping", flush=True)
        time.sleep(60)
    """,
    )
    with pytest.raises(VmmError) as failure:
        driver.launch(sandbox.spec(), 0.5)
    assert "did not answer within 0.5s" in failure.value.detail
    assert "fake vmm: sleeping" in failure.value.detail
    assert launcher.find_marked(owner) == []


def test_a_vmm_started_through_a_script_is_recognised(
    sandbox: Sandbox,
    driver: CloudHypervisorDriver,
    tmp_path: Path,
) -> None:
    sandbox.binary = fake_vmm(
        tmp_path,
        """
        from wrenn_engine.host.vmm.simulator import main
        raise SystemExit(main())
    """,
    )
    process = driver.launch(sandbox.spec(), 10)
    assert process.argv[:2] == (sys.executable, sandbox.binary)
    assert driver.is_running(process)
    driver.shutdown(process, sandbox.socket, 5)
    assert pid_gone(process.pid)
    assert event_names(sandbox.events)[-1] == "vmm.shutdown"


def test_the_console_script_runs_the_simulator_directly(
    sandbox: Sandbox,
    driver: CloudHypervisorDriver,
) -> None:
    sandbox.binary = os.path.join(os.path.dirname(sys.executable), "wrenn-ch-simulator")
    assert driver.command(sandbox.spec())[:6] == [
        sys.executable,
        "-I",
        "-S",
        "-c",
        launcher.SIMULATOR_BOOT,
        launcher.SIMULATOR_PATH,
    ]
    process = driver.launch(sandbox.spec(), 10)
    assert driver.is_running(process)
    driver.shutdown(process, sandbox.socket, 5)


def test_spec_paths_are_checked(
    sandbox: Sandbox, driver: CloudHypervisorDriver, tmp_path: Path
) -> None:
    long_dir = tmp_path / ("d" * 100)
    spec = sandbox.spec()
    with pytest.raises(ConfigError) as too_long:
        driver.launch(
            spec.__class__(
                **{**spec.to_dict(), "socket_path": str(long_dir / "api.sock")}
            ),
            1,
        )
    assert too_long.value.field == "socket_path"
    with pytest.raises(ConfigError):
        driver.launch(
            spec.__class__(**{**spec.to_dict(), "log_path": str(tmp_path / "a,b.log")}),
            1,
        )


def test_the_sandbox_directory_is_created_safely(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ConfigError):
        launcher.ensure_sandbox_dir(str(link))

    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    launcher.ensure_sandbox_dir(str(loose))
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700

    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(ConfigError) as refused:
            launcher.ensure_sandbox_dir(str(foreign))
        assert "owned by uid 65534" in str(refused.value)


# --- stopping -------------------------------------------------------------------------


def boot_without_net(drv: CloudHypervisorDriver, box: Sandbox) -> None:
    client = drv.client(box.socket)
    client.create(box.body(net=False))
    client.boot()


def test_shutdown_of_a_paused_vm_is_graceful(
    sandbox: Sandbox,
    driver: CloudHypervisorDriver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    process = driver.launch(sandbox.spec(), 10)
    boot_without_net(driver, sandbox)
    driver.pause(sandbox.socket)
    caplog.set_level(logging.WARNING, logger="wrenn_engine.host.vmm")

    driver.shutdown(process, sandbox.socket, 5)
    assert pid_gone(process.pid)
    assert event_names(sandbox.events)[-3:] == [
        "vm.shutdown",
        "vm.deleted",
        "vmm.shutdown",
    ]
    assert not [r for r in caplog.records if "SIG" in r.getMessage()]
    assert files_left(sandbox) == []


def test_a_vmm_ignoring_shutdown_gets_sigterm_then_sigkill(
    sandbox: Sandbox,
    make_driver: MakeDriver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    drv = make_driver(simulator_args=("--sim-ignore-shutdown",), term_grace_s=0.2)
    process = drv.launch(sandbox.spec(), 10)
    boot_without_net(drv, sandbox)
    caplog.set_level(logging.WARNING, logger="wrenn_engine.host.vmm.launcher")

    drv.shutdown(process, sandbox.socket, 0.5)
    assert pid_gone(process.pid)
    sent = [r.getMessage() for r in caplog.records]
    assert any("SIGTERM" in m for m in sent) and any("SIGKILL" in m for m in sent)
    assert "vmm.shutdown" not in event_names(sandbox.events)
    assert files_left(sandbox) == []


def test_a_vmm_that_exited_by_itself_is_reaped(
    sandbox: Sandbox, driver: CloudHypervisorDriver
) -> None:
    process = driver.launch(sandbox.spec(), 10)
    boot_without_net(driver, sandbox)
    os.kill(process.pid, signal.SIGUSR1)
    assert driver.wait_exit(process, 5) == 0
    assert not driver.is_running(process)
    assert launcher.read_stat(process.pid) is None
    driver.shutdown(process, sandbox.socket, 5)
    assert files_left(sandbox) == []


def test_is_running_refuses_a_recycled_or_foreign_pid(
    sandbox: Sandbox,
    driver: CloudHypervisorDriver,
) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert wait_for(lambda: launcher.read_cmdline(sleeper.pid) == ("sleep", "60"))
        info = launcher.read_stat(sleeper.pid)
        assert info is not None
        itself = VmmProcess(sleeper.pid, info[1], ("sleep", "60"))
        assert driver.is_running(itself)

        vmm_argv = tuple(driver.command(sandbox.spec()))
        foreign = VmmProcess(sleeper.pid, info[1], vmm_argv)
        recycled = VmmProcess(sleeper.pid, info[1] + 1, ("sleep", "60"))
        assert not driver.is_running(foreign)
        assert not driver.is_running(recycled)

        driver.shutdown(foreign, sandbox.socket, 0.2)
        driver.shutdown(recycled, sandbox.socket, 0.2)
        assert launcher.terminate(recycled, grace=0, kill_wait=0)  # "ours is gone"
        with pytest.raises(HostError):
            driver.remove_leftover("vmm", str(sleeper.pid))
        assert sleeper.poll() is None
    finally:
        kill_and_reap(sleeper)


# --- leftovers ------------------------------------------------------------------------


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Make this process adopt orphans (so it can reap what a test orphans)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    assert libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


ORPHANING_ENGINE = """
import json, sys
from wrenn_engine.host.base import VmmSpec
from wrenn_engine.host.vmm.driver import CloudHypervisorDriver, VmmSettings
driver = CloudHypervisorDriver(VmmSettings(owner=sys.argv[2]))
process = driver.launch(VmmSpec(**json.loads(sys.argv[1])), 10)
print(json.dumps(process.to_dict()))
"""


def test_leftovers_finds_and_removes_an_orphaned_vmm(
    sandbox: Sandbox,
    make_driver: MakeDriver,
    owner: str,
) -> None:
    with subreaper():
        spec = json.dumps(sandbox.spec().to_dict())
        earlier = subprocess.run(
            [sys.executable, "-c", ORPHANING_ENGINE, spec, owner],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        process = VmmProcess.from_dict(json.loads(earlier.stdout))
        try:
            drv = make_driver()
            assert drv.is_running(process)
            assert drv.leftovers(set()) == [("vmm", str(process.pid))]
            assert drv.leftovers({str(process.pid)}) == []
            assert drv.leftovers({f"vmm:{process.pid}"}) == []
            stranger = CloudHypervisorDriver(VmmSettings(owner=unique("other-")))
            assert stranger.leftovers(set()) == []
            with pytest.raises(HostError):
                stranger.remove_leftover("vmm", str(process.pid))

            drv.remove_leftover("vmm", str(process.pid))
            assert pid_gone(process.pid)
            assert drv.wait_exit(process, 1) == launcher.EXIT_UNKNOWN
            assert drv.leftovers(set()) == []
            assert files_left(sandbox) == []
            drv.remove_leftover("vmm", str(process.pid))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(process.pid, 0)


def test_remove_leftover_refuses_unknown_kinds(driver: CloudHypervisorDriver) -> None:
    with pytest.raises(ConfigError):
        driver.remove_leftover("netns", "x")
    with pytest.raises(ConfigError):
        driver.remove_leftover("vmm", "not-a-pid")


def test_find_cloud_hypervisor(tmp_path: Path) -> None:
    binary = tmp_path / "cloud-hypervisor"
    binary.write_text("#!/bin/sh\n")
    assert find_cloud_hypervisor(str(binary)) == shutil.which("cloud-hypervisor")
    binary.chmod(0o755)
    assert find_cloud_hypervisor(str(binary)) == str(binary)


# --- the event monitor ----------------------------------------------------------------


PRETTY = json.dumps(
    {
        "timestamp": {"secs": 1, "nanos": 5},
        "source": "vm",
        "event": "booted",
        "properties": None,
    },
    indent=2,
)


def event_line(source: str, event: str, **properties: str) -> str:
    return (
        json.dumps(
            {
                "timestamp": {"secs": 0, "nanos": 1},
                "source": source,
                "event": event,
                "properties": properties or None,
            }
        )
        + "\n"
    )


@pytest.fixture
def monitored(
    tmp_path: Path,
) -> Iterator[tuple[Path, EventMonitor, list[VmmEvent], list[GuestExit]]]:
    path = tmp_path / "events.json"
    seen: list[VmmEvent] = []
    exits: list[GuestExit] = []
    monitor = EventMonitor(
        str(path),
        seen.append,
        on_exit=exits.append,
        sandbox_id="sbtest",
        poll_interval=0.01,
    )
    monitor.start()
    try:
        yield path, monitor, seen, exits
    finally:
        monitor.stop()
    assert not monitor.running


def append(path: Path, text: str) -> None:
    with open(path, "a") as handle:
        handle.write(text)


def test_monitor_reads_partial_pretty_and_one_line_events(
    monitored: tuple[Path, EventMonitor, list[VmmEvent], list[GuestExit]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, monitor, seen, exits = monitored
    half = len(PRETTY) // 2
    append(path, PRETTY[:half])
    time.sleep(0.05)
    assert seen == []
    append(path, PRETTY[half:] + "\n\n")
    assert wait_for(lambda: len(seen) == 1)
    assert seen[0] == VmmEvent("vm", "booted", 1, 5, {})

    caplog.set_level(logging.WARNING, logger="wrenn_engine.host.vmm.monitor")
    append(path, "this is not an event}\n")
    append(path, event_line("vm", "paused", id="x"))
    assert wait_for(lambda: len(seen) == 2)
    assert seen[1].name == "vm.paused" and seen[1].properties == {"id": "x"}
    assert any("not an event" in r.getMessage() for r in caplog.records)
    assert exits == []

    append(path, event_line("vm", "shutdown"))
    assert wait_for(lambda: len(exits) == 1)
    assert exits[0].kind == POWEROFF and exits[0].event == seen[-1]
    monitor.stop()
    assert not monitor.running
    assert [e.name for e in monitor.events] == ["vm.booted", "vm.paused", "vm.shutdown"]


def test_monitor_ignores_the_engines_own_stop_and_sees_a_panic(
    monitored: tuple[Path, EventMonitor, list[VmmEvent], list[GuestExit]],
) -> None:
    path, monitor, seen, exits = monitored
    monitor.expect_shutdown()
    append(path, event_line("vm", "shutdown") + event_line("vmm", "shutdown"))
    assert wait_for(lambda: len(seen) == 2)
    assert exits == []
    append(path, event_line("guest", "panic"))
    assert wait_for(lambda: len(exits) == 1)
    assert exits[0].kind == PANIC


def test_monitor_follows_a_truncated_file(
    monitored: tuple[Path, EventMonitor, list[VmmEvent], list[GuestExit]],
) -> None:
    path, _, seen, _ = monitored
    append(path, event_line("vmm", "starting") + event_line("vm", "booting"))
    assert wait_for(lambda: len(seen) == 2)
    path.write_text(event_line("vmm", "starting"))
    assert wait_for(lambda: len(seen) == 3)


def test_read_events_returns_complete_events_and_the_next_offset(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.json"
    assert read_events(str(path), 0) == ([], 0)
    path.write_text(PRETTY + "\n\n" + PRETTY[:20])
    events, offset = read_events(str(path), 0)
    assert [e.name for e in events] == ["vm.booted"]
    assert offset == len(PRETTY) + 2  # the object and the blank line after it

    append(path, PRETTY[20:] + "\n\n" + event_line("guest", "panic"))
    events, offset = read_events(str(path), offset)
    assert [e.name for e in events] == ["vm.booted", "guest.panic"]
    assert offset == path.stat().st_size
    assert read_events(str(path), offset) == ([], offset)

    path.write_text(event_line("vmm", "starting"))
    events, _ = read_events(str(path), offset)
    assert [e.name for e in events] == ["vmm.starting"]


def test_monitor_reports_a_vmm_that_vanished(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    path.write_text(event_line("vmm", "starting"))
    alive = [True]
    exits: list[GuestExit] = []
    monitor = EventMonitor(
        str(path),
        lambda e: None,
        on_exit=exits.append,
        is_alive=lambda: alive[0],
        poll_interval=0.01,
    ).start()
    try:
        assert wait_for(lambda: len(monitor.events) == 1)
        alive[0] = False
        assert wait_for(lambda: not monitor.running)
        assert [e.kind for e in exits] == [VMM_EXIT]
    finally:
        monitor.stop()


def test_follow_events_of_a_real_simulator(
    sandbox: Sandbox, driver: CloudHypervisorDriver
) -> None:
    exits: list[GuestExit] = []
    process = driver.launch(sandbox.spec(), 10)
    monitor = driver.follow_events(
        sandbox.spec(), process, lambda e: None, on_exit=exits.append
    )
    try:
        boot_without_net(driver, sandbox)
        os.kill(process.pid, signal.SIGUSR2)
        assert wait_for(lambda: not monitor.running)
        assert [e.kind for e in exits] == [PANIC]
        assert driver.wait_exit(process, 5) == 1
    finally:
        monitor.stop()
        driver.shutdown(process, sandbox.socket, 5)

    exits.clear()
    process = driver.launch(sandbox.spec(), 10)
    monitor = driver.follow_events(
        sandbox.spec(), process, lambda e: None, on_exit=exits.append
    )
    try:
        boot_without_net(driver, sandbox)
        monitor.expect_shutdown()
        driver.shutdown(process, sandbox.socket, 5)
        assert wait_for(lambda: not monitor.running)
        assert exits == []
        assert [e.name for e in monitor.events][-3:] == [
            "vm.shutdown",
            "vm.deleted",
            "vmm.shutdown",
        ]
    finally:
        monitor.stop()
        driver.shutdown(process, sandbox.socket, 5)


def test_real_cloud_hypervisor_answers_like_the_simulator(
    sandbox: Sandbox,
    driver: CloudHypervisorDriver,
) -> None:
    binary = find_cloud_hypervisor()
    if binary is None:
        pytest.skip(
            "cloud-hypervisor binary not installed (no Debian or PyPI package ships it)"
        )
    if not os.path.exists("/dev/kvm"):
        pytest.skip("cloud-hypervisor needs /dev/kvm, which this machine lacks")
    require_root()
    sandbox.binary = binary
    process = driver.launch(sandbox.spec(), 10)
    try:
        ping = driver.client(sandbox.socket).ping()
        assert ping["pid"] == process.pid and ping["version"]
        assert launcher.read_cmdline(process.pid) == process.argv
        assert event_names(sandbox.events)[0] == "vmm.starting"
    finally:
        driver.shutdown(process, sandbox.socket, 5)
    assert pid_gone(process.pid)
    assert files_left(sandbox) == []
