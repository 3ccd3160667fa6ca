"""The simulator touches the host as cloud-hypervisor does: TAP, disks,
snapshot files, events, signals; checked against what the kernel reports."""

# Fixtures imported from test_vmm_fixtures come back as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.host.test_vmm_fixtures import (  # noqa: F401 - fixtures
    MEMORY_MB,
    TAP,
    Sandbox,
    SimulatorRun,
    driver,
    event_names,
    link_carrier,
    make_driver,
    make_sandbox,
    netns,
    owner,
    read_events,
    sandbox,
    start_simulator,
    tap_netns,
    wait_for,
)
from wrenn_engine.errors import VmmError
from wrenn_engine.host.base import DiskSpec
from wrenn_engine.host.vmm import launcher
from wrenn_engine.host.vmm.driver import CloudHypervisorDriver
from wrenn_engine.host.vmm.monitor import EventParser

Start = Callable[..., SimulatorRun]


def held_files(pid: int) -> dict[str, str]:
    """fd number -> what /proc/<pid>/fd says it points at."""
    held = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
    return held


def tun_interfaces(pid: int) -> list[str]:
    """The interfaces ``pid`` holds through /dev/net/tun (fdinfo ``iff:``)."""
    names = []
    for fd, target in held_files(pid).items():
        if target == "/dev/net/tun":
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("iff:"):
                    names.append(line.split()[1])
    return names


def boot_error(run: SimulatorRun, body: dict[str, object]) -> VmmError:
    client = run.client()
    client.create(body)
    with pytest.raises(VmmError) as failure:
        client.boot()
    assert failure.value.status == 500
    return failure.value


# --- TAP ------------------------------------------------------------------------------


def test_boot_fails_when_the_tap_does_not_exist(
    sandbox: Sandbox, start_simulator: Start
) -> None:
    run = start_simulator(sandbox)
    body = sandbox.body()
    body["net"][0]["tap"] = "wnotap0"
    error = boot_error(run, body)
    assert "wnotap0" in error.detail and "no such device" in error.detail
    assert "/dev/net/tun" not in held_files(run.proc.pid).values()
    assert run.client().info()["state"] == "Created"


@pytest.mark.host
def test_boot_attaches_the_tap_in_the_sandbox_namespace(
    tap_netns: str,
    tmp_path: Path,
    driver: CloudHypervisorDriver,
) -> None:
    box = make_sandbox(tmp_path, tap_netns)
    process = driver.launch(box.spec(), 10)
    try:
        assert link_carrier(tap_netns) == 0
        driver.create_vm(box.socket, box.vm_config(), DiskSpec(str(box.disk)))
        driver.boot(box.socket)

        assert tun_interfaces(process.pid) == [TAP]
        assert link_carrier(tap_netns) == 1
        assert str(box.disk) in held_files(process.pid).values()

        driver.client(box.socket).shutdown()
        assert tun_interfaces(process.pid) == []
        assert link_carrier(tap_netns) == 0
        assert str(box.disk) not in held_files(process.pid).values()
    finally:
        driver.shutdown(process, box.socket, 5)


# --- disks, kernel, serial ------------------------------------------------------------


def test_boot_fails_on_a_missing_or_unusable_disk(
    sandbox: Sandbox, start_simulator: Start, tmp_path: Path
) -> None:
    run = start_simulator(sandbox)
    error = boot_error(run, sandbox.body(net=False, path=str(tmp_path / "nope.raw")))
    assert "nope.raw" in error.detail
    run.client().delete()

    directory = tmp_path / "a-directory"
    directory.mkdir()
    error = boot_error(run, sandbox.body(net=False, path=str(directory)))
    assert "a-directory" in error.detail
    run.client().delete()

    error = boot_error(run, sandbox.body(net=False, path=str(directory), readonly=True))
    assert "not a file or block device" in error.detail
    assert run.proc.poll() is None


def test_boot_fails_on_a_disk_another_process_locked(
    sandbox: Sandbox, start_simulator: Start
) -> None:
    run = start_simulator(sandbox)
    with open(sandbox.disk, "r+b") as disk:
        fcntl.lockf(disk, fcntl.LOCK_EX)
        error = boot_error(run, sandbox.body(net=False))
        assert "locked" in error.detail
        fcntl.lockf(disk, fcntl.LOCK_UN)
    run.client().boot()
    assert run.client().info()["state"] == "Running"


def test_a_readonly_disk_is_opened_readonly(
    sandbox: Sandbox, start_simulator: Start
) -> None:
    run = start_simulator(sandbox)
    run.client().create(sandbox.body(net=False, readonly=True))
    run.client().boot()
    for fd, target in held_files(run.proc.pid).items():
        if target == str(sandbox.disk):
            flags = Path(f"/proc/{run.proc.pid}/fdinfo/{fd}").read_text()
            mode = int(flags.split("flags:")[1].split()[0], 8) & os.O_ACCMODE
            assert mode == os.O_RDONLY
            break
    else:
        pytest.fail("the disk is not held open")


def test_boot_fails_on_a_missing_kernel(
    sandbox: Sandbox, start_simulator: Start
) -> None:
    run = start_simulator(sandbox)
    sandbox.kernel.unlink()
    error = boot_error(run, sandbox.body(net=False))
    assert "kernel" in error.detail


def test_serial_console_goes_to_its_file(
    sandbox: Sandbox, start_simulator: Start
) -> None:
    run = start_simulator(sandbox)
    run.client().create(sandbox.body(net=False))
    run.client().boot()
    serial = sandbox.dir / "serial.log"
    assert serial.stat().st_mode & 0o777 == 0o600
    assert "simulated" in serial.read_text()


def qcow2(tmp_path: Path, name: str, backing: Path | None = None) -> Path:
    require_tool("qemu-img")
    image = tmp_path / name
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "raw"]
    subprocess.run([*argv, str(image), "4M"], check=True)
    return image


def test_qcow2_overlay_needs_backing_files(
    sandbox: Sandbox, start_simulator: Start, tmp_path: Path
) -> None:
    overlay = qcow2(tmp_path, "overlay.qcow2", backing=sandbox.disk)
    run = start_simulator(sandbox)

    error = boot_error(
        run, sandbox.body(net=False, path=str(overlay), image_type="Qcow2")
    )
    assert "backing" in error.detail
    run.client().delete()

    run.client().create(
        sandbox.body(
            net=False, path=str(overlay), image_type="Qcow2", backing_files=True
        )
    )
    run.client().boot()
    held = held_files(run.proc.pid).values()
    assert str(overlay) in held and str(sandbox.disk) in held


def test_qcow2_with_a_missing_backing_file_or_bad_magic_fails(
    sandbox: Sandbox,
    start_simulator: Start,
    tmp_path: Path,
) -> None:
    template = tmp_path / "template.raw"
    template.write_bytes(b"\0" * 4096)
    overlay = qcow2(tmp_path, "overlay.qcow2", backing=template)
    template.unlink()
    run = start_simulator(sandbox)

    error = boot_error(
        run,
        sandbox.body(
            net=False, path=str(overlay), image_type="Qcow2", backing_files=True
        ),
    )
    assert "template.raw" in error.detail
    run.client().delete()

    error = boot_error(run, sandbox.body(net=False, image_type="Qcow2"))
    assert "not a qcow2 image" in error.detail


# --- snapshot and restore -------------------------------------------------------------


def booted(run: SimulatorRun, body: dict[str, object]) -> None:
    client = run.client()
    client.create(body)
    client.boot()


def test_snapshot_writes_config_state_and_memory(
    sandbox: Sandbox, start_simulator: Start, tmp_path: Path
) -> None:
    run = start_simulator(sandbox)
    body = sandbox.body(net=False)
    booted(run, body)
    client = run.client()
    client.pause()
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    client.snapshot(f"file://{snapshot}")

    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json",
        "memory-ranges",
        "state.json",
    ]
    assert json.loads((snapshot / "config.json").read_text()) == body
    state = json.loads((snapshot / "state.json").read_text())
    assert state["vm_state"] == "Paused"
    memory = (snapshot / "memory-ranges").stat()
    assert memory.st_size == MEMORY_MB << 20
    assert memory.st_blocks * 512 < memory.st_size // 100  # sparse
    for name in ("config.json", "state.json", "memory-ranges"):
        assert (snapshot / name).stat().st_mode & 0o777 == 0o600
    assert client.info()["state"] == "Paused"


def take_snapshot(sandbox: Sandbox, start_simulator: Start, tmp_path: Path) -> Path:
    run = start_simulator(sandbox)
    booted(run, sandbox.body(net=False))
    run.client().pause()
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    run.client().snapshot(f"file://{snapshot}")
    run.client().shutdown_vmm()
    assert run.proc.wait(5) == 0
    return snapshot


def test_restore_reads_the_snapshot_back(
    sandbox: Sandbox, start_simulator: Start, tmp_path: Path
) -> None:
    snapshot = take_snapshot(sandbox, start_simulator, tmp_path)
    run = start_simulator(sandbox)
    client = run.client()
    client.restore({"source_url": f"file://{snapshot}"})
    info = client.info()
    assert info["state"] == "Paused"
    assert info["config"] == json.loads((snapshot / "config.json").read_text())
    assert str(sandbox.disk) in held_files(run.proc.pid).values()
    client.resume()
    assert client.info()["state"] == "Running"
    assert event_names(sandbox.events)[-4:] == [
        "vm.restoring",
        "vm.restored",
        "vm.resuming",
        "vm.resumed",
    ]


def test_restore_with_resume_and_from_the_command_line(
    sandbox: Sandbox,
    start_simulator: Start,
    tmp_path: Path,
) -> None:
    snapshot = take_snapshot(sandbox, start_simulator, tmp_path)
    run = start_simulator(sandbox)
    run.client().restore({"source_url": f"file://{snapshot}", "resume": True})
    assert run.client().info()["state"] == "Running"
    run.client().shutdown_vmm()
    assert run.proc.wait(5) == 0

    run = start_simulator(sandbox, "--restore", f"source_url=file://{snapshot}")
    assert run.client().info()["state"] == "Paused"
    run.client().shutdown_vmm()
    run.proc.wait(5)

    run = start_simulator(
        sandbox, "--restore", f"source_url=file://{snapshot},resume=true"
    )
    assert run.client().info()["state"] == "Running"


def test_restore_from_a_broken_snapshot_fails(
    sandbox: Sandbox, start_simulator: Start, tmp_path: Path
) -> None:
    snapshot = take_snapshot(sandbox, start_simulator, tmp_path)
    (snapshot / "memory-ranges").unlink()
    run = start_simulator(sandbox)
    with pytest.raises(VmmError) as failure:
        run.client().restore({"source_url": f"file://{snapshot}"})
    assert failure.value.status == 500
    assert "memory-ranges" in failure.value.detail
    with pytest.raises(VmmError) as missing:
        run.client().info()
    assert missing.value.status == 404
    run.client().shutdown_vmm()
    assert run.proc.wait(5) == 0

    bad = start_simulator(
        sandbox, "--restore", f"source_url=file://{snapshot}", wait=False
    )
    assert bad.proc.wait(10) == 1
    assert "memory-ranges" in launcher.log_tail(sandbox.log)


# --- events ---------------------------------------------------------------------------


def test_event_monitor_lines_have_the_documented_fields(
    sandbox: Sandbox,
    start_simulator: Start,
    tmp_path: Path,
) -> None:
    run = start_simulator(sandbox)
    booted(run, sandbox.body(net=False))
    client = run.client()
    client.pause()
    client.snapshot(f"file://{tmp_path}")
    client.resume()
    client.shutdown_vmm()
    assert run.proc.wait(5) == 0

    events = read_events(sandbox.events)
    for event in events:
        assert set(event) == {"timestamp", "source", "event", "properties"}
        assert set(event["timestamp"]) == {"secs", "nanos"}
        assert all(isinstance(v, int) for v in event["timestamp"].values())
        assert event["properties"] is None or isinstance(event["properties"], dict)
    stamps = [(e["timestamp"]["secs"], e["timestamp"]["nanos"]) for e in events]
    assert stamps == sorted(stamps)
    assert event_names(sandbox.events) == [
        "vmm.starting",
        "vm.booting",
        "vm.booted",
        "vm.pausing",
        "vm.paused",
        "vm.snapshotting",
        "vm.snapshotted",
        "vm.resuming",
        "vm.resumed",
        "vm.shutdown",
        "vm.deleted",
        "vmm.shutdown",
    ]
    parser = EventParser()
    parsed = parser.feed(Path(sandbox.events).read_bytes())
    assert [e.name for e in parsed] == event_names(sandbox.events)
    assert parser.skipped == []


# --- signals and guest exits ----------------------------------------------------------


def test_sigusr1_is_a_guest_poweroff_and_the_vmm_exits(
    sandbox: Sandbox, start_simulator: Start
) -> None:
    run = start_simulator(sandbox)
    booted(run, sandbox.body(net=False))
    run.signal(signal.SIGUSR1)
    assert run.proc.wait(5) == 0
    assert event_names(sandbox.events)[-3:] == [
        "vm.shutdown",
        "vm.deleted",
        "vmm.shutdown",
    ]


def test_guest_poweroff_with_no_shutdown_keeps_the_vmm(
    sandbox: Sandbox, start_simulator: Start
) -> None:
    run = start_simulator(sandbox, "--no-shutdown")
    booted(run, sandbox.body(net=False))
    run.client().power_button()
    assert wait_for(lambda: event_names(sandbox.events)[-1] == "vm.shutdown")
    assert run.proc.poll() is None
    assert run.client().info()["state"] == "Created"
    assert str(sandbox.disk) not in held_files(run.proc.pid).values()


def test_sigusr2_is_a_guest_panic_and_the_vmm_dies(
    sandbox: Sandbox, start_simulator: Start
) -> None:
    run = start_simulator(sandbox)
    booted(run, sandbox.body(net=False))
    run.signal(signal.SIGUSR2)
    assert run.proc.wait(5) == 1
    assert event_names(sandbox.events)[-1] == "guest.panic"


def test_sigterm_shuts_down_cleanly(sandbox: Sandbox, start_simulator: Start) -> None:
    run = start_simulator(sandbox)
    booted(run, sandbox.body(net=False))
    run.client().pause()
    run.signal(signal.SIGTERM)
    assert run.proc.wait(5) == 0
    assert event_names(sandbox.events)[-3:] == [
        "vm.shutdown",
        "vm.deleted",
        "vmm.shutdown",
    ]
    assert launcher.socket_state(sandbox.socket) == "stale"


def test_ignore_shutdown_flag_ignores_sigterm_and_shutdown(
    sandbox: Sandbox,
    start_simulator: Start,
) -> None:
    run = start_simulator(sandbox, "--sim-ignore-shutdown")
    run.signal(signal.SIGTERM)
    with pytest.raises(VmmError) as hung:
        run.client(timeout=0.3).shutdown_vmm()
    assert hung.value.status is None
    assert run.proc.poll() is None
    assert run.client().ping()["pid"] == run.proc.pid


# --- HTTP and start-up details --------------------------------------------------------


def raw_exchange(path: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        return data


def test_http_details(sandbox: Sandbox, start_simulator: Start) -> None:
    start_simulator(sandbox)
    sock = sandbox.socket

    answer = raw_exchange(sock, b"GET /api/v1/vm.nothing HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ")
    answer = raw_exchange(sock, b"GET /api/v1/vm.boot HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    answer = raw_exchange(
        sock, b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
    answer = raw_exchange(
        sock,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: "
        b"5\r\nExpect: 100-continue\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 100 Continue")
    answer = raw_exchange(sock, b"garbage\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")

    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(sock)
        for _ in range(2):
            conn.sendall(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            head = conn.recv(4096)
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert b"Content-Type: application/json" in head
            assert b"Server: Cloud Hypervisor API" in head


def test_a_second_vmm_on_the_same_socket_is_refused(
    sandbox: Sandbox, start_simulator: Start
) -> None:
    first = start_simulator(sandbox)
    second = start_simulator(sandbox, wait=False)
    assert second.proc.wait(10) == 1
    assert first.client().ping()["pid"] == first.proc.pid
    assert (sandbox.dir / "api.sock.lock").exists()


def test_socket_and_files_are_private(sandbox: Sandbox, start_simulator: Start) -> None:
    start_simulator(sandbox)
    for path in (sandbox.socket, sandbox.log, sandbox.events):
        assert os.stat(path).st_mode & 0o077 == 0, path


@pytest.mark.parametrize(
    "program",
    [
        pytest.param(launcher.simulator_program(), id="as-the-engine-runs-it"),
        pytest.param(
            [sys.executable, "-I", "-S", launcher.SIMULATOR_PATH], id="script"
        ),
    ],
)
def test_unknown_options_are_refused(sandbox: Sandbox, program: list[str]) -> None:
    result = subprocess.run(
        [
            *program,
            "--api-socket",
            f"path={sandbox.socket}",
            "--kernel",
            "/vmlinux",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 2
    assert "--kernel" in result.stderr
    assert not os.path.exists(sandbox.socket)
