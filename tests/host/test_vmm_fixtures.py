"""Fixtures and helpers shared by the VMM tests (this module holds no tests).

The other ``test_vmm_*`` modules import what they use from here. Every
process a fixture starts is killed and reaped in a ``finally``; every file
and socket lives under ``tmp_path``; every namespace is removed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root, skip_or_fail, unique
from wrenn_engine.domain.config import VMConfig
from wrenn_engine.host.base import DiskSpec, VmmProcess, VmmSpec
from wrenn_engine.host.vmm import launcher
from wrenn_engine.host.vmm.client import VmmClient
from wrenn_engine.host.vmm.config import build_vm_config
from wrenn_engine.host.vmm.driver import SIMULATOR, CloudHypervisorDriver, VmmSettings

OPENAPI_DEFAULT = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "cloud-hypervisor"
    / "cloud-hypervisor.yaml"
)
TAP = "tap0"
MEMORY_MB = 128


def openapi_path() -> Path:
    return Path(os.environ.get("WRENN_CH_OPENAPI", str(OPENAPI_DEFAULT)))


# --- network namespaces ---------------------------------------------------------------


def make_netns() -> str:
    from pyroute2 import netns as pr_netns

    name = unique("wvmm")
    pr_netns.create(name)
    return name


def remove_netns(name: str) -> None:
    from pyroute2 import netns as pr_netns

    if name in pr_netns.listnetns():
        pr_netns.remove(name)


def add_tap(netns: str, name: str = TAP) -> None:
    from pyroute2 import NetNS

    with NetNS(netns) as ns:
        ns.link("add", ifname=name, kind="tuntap", mode="tap")
        index = ns.link_lookup(ifname=name)[0]
        ns.link("set", index=index, state="up")


def link_carrier(netns: str, name: str = TAP) -> int:
    """IFLA_CARRIER of ``name`` in ``netns`` as the kernel reports it."""
    from pyroute2 import NetNS

    with NetNS(netns) as ns:
        index = ns.link_lookup(ifname=name)[0]
        return int(ns.get_links(index)[0].get_attr("IFLA_CARRIER"))


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace (needs root)."""
    require_root()
    name = make_netns()
    try:
        yield name
    finally:
        remove_netns(name)


@pytest.fixture
def tap_netns(netns: str) -> str:
    """A network namespace holding an up TAP device ``tap0``."""
    add_tap(netns)
    return netns


# --- a sandbox's files ----------------------------------------------------------------


@dataclass
class Sandbox:
    """Paths of one test sandbox, all under tmp_path."""

    id: str
    dir: Path
    kernel: Path
    disk: Path
    netns: str = ""
    binary: str = SIMULATOR

    @property
    def socket(self) -> str:
        return str(self.dir / "api.sock")

    @property
    def log(self) -> str:
        return str(self.dir / "vmm.log")

    @property
    def events(self) -> str:
        return str(self.dir / "events.json")

    def spec(self, restore_from: str = "") -> VmmSpec:
        return VmmSpec(
            sandbox_id=self.id,
            binary=self.binary,
            netns=self.netns,
            socket_path=self.socket,
            sandbox_dir=str(self.dir),
            log_path=self.log,
            event_monitor_path=self.events,
            restore_from=restore_from,
        )

    def vm_config(self) -> VMConfig:
        return VMConfig(
            sandbox_id=self.id,
            kernel_path=str(self.kernel),
            rootfs_path=str(self.disk),
            vcpus=1,
            memory_mb=MEMORY_MB,
            network_namespace=self.netns or "none",
            tap_device=TAP,
            tap_mac="02:FC:00:00:00:05",
            guest_ip="169.254.0.21",
            gateway_ip="169.254.0.22",
            netmask="255.255.255.252",
            socket_path=self.socket,
            sandbox_dir=str(self.dir),
            init_path="/usr/local/bin/wrenn-init",
            vmm_bin=self.binary,
        )

    def body(self, *, net: bool = True, **disk: Any) -> dict[str, Any]:
        """The engine's vm.create body; without ``net`` no TAP is needed."""
        spec = DiskSpec(path=str(disk.pop("path", self.disk)), **disk)
        config = build_vm_config(
            self.vm_config(), spec, serial_path=str(self.dir / "serial.log")
        )
        if not net:
            del config["net"]
        return config


def make_sandbox(root: Path, netns: str = "") -> Sandbox:
    sandbox_id = unique("sb")
    directory = root / sandbox_id
    directory.mkdir(mode=0o700)
    kernel = root / f"{sandbox_id}-vmlinux"
    kernel.write_bytes(b"\x7fELF not a real kernel")
    disk = root / f"{sandbox_id}-rootfs.raw"
    with open(disk, "wb") as handle:
        handle.truncate(4 << 20)
    return Sandbox(sandbox_id, directory, kernel, disk, netns)


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    return make_sandbox(tmp_path)


# --- processes ------------------------------------------------------------------------


def kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def kill_marked(owner: str) -> None:
    """SIGKILL every live process carrying ``owner``'s mark, and reap our own."""
    for pid, _ in launcher.find_marked(owner):
        info = launcher.read_stat(pid)
        argv = launcher.read_cmdline(pid)
        if info is not None and argv is not None:
            launcher.terminate(VmmProcess(pid, info[1], argv), grace=0, kill_wait=5)
    launcher.reap_children()


@dataclass
class SimulatorRun:
    """A simulator started directly by a test (no namespace, no driver)."""

    proc: subprocess.Popen[bytes]
    sandbox: Sandbox
    records: list[tuple[str, str, bytes | None, int, bytes]] = field(
        default_factory=list
    )

    def client(self, timeout: float = 5.0) -> VmmClient:
        return VmmClient(
            self.sandbox.socket, timeout, recorder=lambda *r: self.records.append(r)
        )

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.sandbox.events)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)


def read_events(path: str) -> list[dict[str, Any]]:
    """Upstream's format read plainly: objects separated by blank lines."""
    text = Path(path).read_text()
    return [json.loads(chunk) for chunk in text.split("\n\n") if chunk.strip()]


def event_names(path: str) -> list[str]:
    return [f"{e['source']}.{e['event']}" for e in read_events(path)]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def wait_for_socket(run: SimulatorRun, timeout: float = 10.0) -> None:
    def answering() -> bool:
        if run.proc.poll() is not None:
            tail = launcher.log_tail(run.sandbox.log)
            raise AssertionError(f"simulator exited {run.proc.returncode}: {tail}")
        return launcher.socket_state(run.sandbox.socket) == "live"

    assert wait_for(answering, timeout), "simulator API never answered"


@pytest.fixture
def start_simulator() -> Iterator[Callable[..., SimulatorRun]]:
    """Start simulators with extra options; all are killed and reaped at the end."""
    runs: list[SimulatorRun] = []

    def start(sandbox: Sandbox, *extra: str, wait: bool = True) -> SimulatorRun:
        argv = launcher.vmm_argv(
            sandbox.spec(), launcher.simulator_program(), extra=extra
        )
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        run = SimulatorRun(proc, sandbox)
        runs.append(run)
        if wait:
            wait_for_socket(run)
        return run

    try:
        yield start
    finally:
        for run in runs:
            kill_and_reap(run.proc)
            if run.proc.stderr is not None:
                run.proc.stderr.close()


@pytest.fixture
def owner() -> str:
    return unique("test-owner-")


@pytest.fixture
def make_driver(owner: str) -> Iterator[Callable[..., CloudHypervisorDriver]]:
    """Drivers marking their VMMs with a test-unique owner; whatever they leave
    running is killed at the end."""

    def make(**settings: Any) -> CloudHypervisorDriver:
        values: dict[str, Any] = {
            "owner": owner,
            "api_timeout_s": 5.0,
            "term_grace_s": 1.0,
            "kill_wait_s": 5.0,
        }
        values.update(settings)
        return CloudHypervisorDriver(VmmSettings(**values))

    try:
        yield make
    finally:
        kill_marked(owner)


@pytest.fixture
def driver(make_driver: Callable[..., CloudHypervisorDriver]) -> CloudHypervisorDriver:
    return make_driver()


def pid_gone(pid: int) -> bool:
    info = launcher.read_stat(pid)
    return info is None or info[0] in ("Z", "X")


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


__all__ = [
    "MEMORY_MB",
    "TAP",
    "Sandbox",
    "SimulatorRun",
    "add_tap",
    "driver",
    "event_names",
    "kill_and_reap",
    "link_carrier",
    "make_driver",
    "make_netns",
    "make_sandbox",
    "netns",
    "openapi_path",
    "owner",
    "pid_gone",
    "read_events",
    "remove_netns",
    "sandbox",
    "skip_or_fail",
    "start_simulator",
    "tap_netns",
    "wait_for",
    "wait_for_socket",
]
