"""In-memory host drivers for unit tests and the lifecycle benchmark.

They keep the same contract as the real drivers (plans are pure, removal is
idempotent, a name that exists already is ResourceBusy) and record every
object they "create" in ``FakeHost.objects``, so a test can assert that
nothing is left behind. ``fail`` makes the next call of a method raise.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from wrenn_engine.domain.config import VMConfig
from wrenn_engine.errors import HostError, ResourceBusy, VmmError
from wrenn_engine.host.base import (
    DiskSpec,
    HostDrivers,
    NetworkPlan,
    RootfsAttachment,
    RootfsPlan,
    VmmProcess,
    VmmSpec,
)


@dataclass
class FakeHost:
    """The fake machine: a set of ``"kind:name"`` objects and VM states."""

    objects: set[str] = field(default_factory=set)
    vms: dict[str, str] = field(default_factory=dict)  # socket -> VmInfo state
    vmm_sockets: dict[int, str] = field(default_factory=dict)  # pid -> socket
    failures: dict[str, BaseException] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _pids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    #: When set, the host's objects live in this JSON file, so a child
    #: process that crashes leaves them for the parent to find (crash tests).
    path: str | None = None

    def __post_init__(self) -> None:
        if self.path and os.path.exists(self.path):
            with open(self.path) as f:
                saved = json.load(f)
            self.objects = set(saved["objects"])
            self.vms = dict(saved["vms"])
            self.vmm_sockets = {int(k): v for k, v in saved["vmm_sockets"].items()}
            self._pids = itertools.count(int(saved["next_pid"]))

    def _save(self) -> None:
        """Write the state through to ``path`` (called with the lock held)."""
        if not self.path:
            return
        next_pid = next(self._pids)
        self._pids = itertools.count(next_pid)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "objects": sorted(self.objects),
                    "vms": self.vms,
                    "vmm_sockets": self.vmm_sockets,
                    "next_pid": next_pid,
                },
                f,
            )
        os.replace(tmp, self.path)

    def fail(self, method: str, error: BaseException | None = None) -> None:
        """Make the next call of ``method`` (e.g. ``"network.prepare"``) raise."""
        self.failures[method] = error or HostError(f"injected failure in {method}")

    def _call(self, method: str) -> None:
        with self.lock:
            self.calls.append(method)
            error = self.failures.pop(method, None)
        if error is not None:
            raise error

    def add(self, kind: str, name: str) -> None:
        key = f"{kind}:{name}"
        with self.lock:
            if key in self.objects:
                raise ResourceBusy(kind, name)
            self.objects.add(key)
            self._save()

    def discard(self, kind: str, name: str) -> None:
        with self.lock:
            self.objects.discard(f"{kind}:{name}")
            self._save()

    def has(self, kind: str, name: str) -> bool:
        return f"{kind}:{name}" in self.objects

    def drivers(self) -> HostDrivers:
        return HostDrivers(FakeRootfs(self), FakeNetwork(self), FakeVmm(self))


class _Leftovers:
    host: FakeHost
    kinds: tuple[str, ...] = ()

    def leftovers(self, known: set[str]) -> list[tuple[str, str]]:
        with self.host.lock:
            found = sorted(self.host.objects - known)
        pairs = [key.split(":", 1) for key in found]
        return [(kind, name) for kind, name in pairs if kind in self.kinds]

    def remove_leftover(self, kind: str, name: str) -> None:
        self.host.discard(kind, name)
        if kind == "vmm":
            with self.host.lock:
                socket = self.host.vmm_sockets.pop(int(name), None)
                self.host.vms.pop(socket or "", None)
                self.host._save()


class FakeRootfs(_Leftovers):
    kinds = ("cow", "loop")

    def __init__(self, host: FakeHost):
        self.host = host

    def plan(self, sandbox_id: str, template_path: str, sandbox_dir: str) -> RootfsPlan:
        cow = os.path.join(sandbox_dir, "rootfs.qcow2")
        return RootfsPlan(sandbox_id, "fake", template_path, cow, cow, "Qcow2", True)

    def prepare(self, plan: RootfsPlan) -> RootfsAttachment:
        self.host._call("rootfs.prepare")
        self.host.add("cow", plan.cow_path)
        return RootfsAttachment()

    def attach(self, plan: RootfsPlan) -> RootfsAttachment:
        self.host._call("rootfs.attach")
        if not self.host.has("cow", plan.cow_path):
            raise HostError(f"{plan.cow_path} is missing")
        return RootfsAttachment()

    def detach(self, plan: RootfsPlan, attachment: RootfsAttachment) -> None:
        self.host._call("rootfs.detach")

    def remove(self, plan: RootfsPlan, attachment: RootfsAttachment) -> None:
        self.host._call("rootfs.remove")
        self.host.discard("cow", plan.cow_path)


class FakeNetwork(_Leftovers):
    kinds = ("netns", "veth", "nft_table")

    def __init__(self, host: FakeHost, prefix: str = "wrenn"):
        self.host = host
        self.prefix = prefix

    def plan(self, sandbox_id: str, slot: int) -> NetworkPlan:
        return NetworkPlan(
            sandbox_id=sandbox_id,
            slot=slot,
            netns=f"{self.prefix}-{sandbox_id}",
            host_veth=f"wr{slot}h",
            ns_veth=f"wr{slot}p",
            tap="tap0",
            tap_cidr="169.254.0.22/30",
            guest_ip="169.254.0.21",
            host_veth_cidr=f"10.200.{slot // 64}.{(slot % 64) * 4 + 1}/30",
            ns_veth_cidr=f"10.200.{slot // 64}.{(slot % 64) * 4 + 2}/30",
            host_reachable_ip=f"10.201.{slot // 256}.{slot % 256}",
            nft_table=f"{self.prefix}_{slot}",
        )

    def slot_in_use(self, slot: int) -> bool:
        return self.host.has("veth", f"wr{slot}h")

    def prepare(self, plan: NetworkPlan) -> None:
        self.host._call("network.prepare")
        made: list[tuple[str, str]] = []
        try:
            for kind, name in (
                ("netns", plan.netns),
                ("veth", plan.host_veth),
                ("nft_table", plan.nft_table),
            ):
                self.host.add(kind, name)
                made.append((kind, name))
                self.host._call(f"network.prepare.{kind}")
        except BaseException:
            for kind, name in made:
                self.host.discard(kind, name)
            raise

    def teardown(self, plan: NetworkPlan) -> None:
        self.host._call("network.teardown")
        for kind, name in (
            ("nft_table", plan.nft_table),
            ("veth", plan.host_veth),
            ("netns", plan.netns),
        ):
            self.host.discard(kind, name)


class FakeVmm(_Leftovers):
    kinds = ("vmm",)

    def __init__(self, host: FakeHost):
        self.host = host

    def launch(self, spec: VmmSpec, timeout: float) -> VmmProcess:
        self.host._call("vmm.launch")
        pid = next(self.host._pids)
        self.host.add("vmm", str(pid))
        with self.host.lock:
            self.host.vms[spec.socket_path] = "NotCreated"
            self.host.vmm_sockets[pid] = spec.socket_path
            self.host._save()
        return VmmProcess(pid, pid * 10, ("fake-vmm", spec.socket_path))

    def _vm(
        self, socket_path: str, method: str, expect: tuple[str, ...], then: str
    ) -> None:
        self.host._call(method)
        with self.host.lock:
            state = self.host.vms.get(socket_path)
            if state is None:
                raise VmmError(method, None, "no VMM listens on " + socket_path)
            if state not in expect:
                raise VmmError(method, 500, f"VM is {state}")
            self.host.vms[socket_path] = then
            self.host._save()

    def create_vm(self, socket_path: str, config: VMConfig, disk: DiskSpec) -> None:
        self._vm(socket_path, "vm.create", ("NotCreated",), "Created")

    def boot(self, socket_path: str) -> None:
        self._vm(socket_path, "vm.boot", ("Created",), "Running")

    def pause(self, socket_path: str) -> None:
        self._vm(socket_path, "vm.pause", ("Running",), "Paused")

    def resume(self, socket_path: str) -> None:
        self._vm(socket_path, "vm.resume", ("Paused",), "Running")

    def snapshot(self, socket_path: str, destination: str) -> None:
        self._vm(socket_path, "vm.snapshot", ("Paused",), "Paused")
        for name in ("config.json", "state.json", "memory-ranges"):
            with open(os.path.join(destination, name), "w") as f:
                f.write("{}")

    def restore(self, socket_path: str, source: str) -> None:
        if not os.path.isdir(source):
            raise VmmError("vm.restore", 500, f"{source} does not exist")
        self._vm(socket_path, "vm.restore", ("NotCreated",), "Paused")

    def info(self, socket_path: str) -> dict[str, Any]:
        with self.host.lock:
            state = self.host.vms.get(socket_path)
        if state is None:
            raise VmmError("vm.info", None, "no VMM listens on " + socket_path)
        return {"state": state}

    def shutdown(self, process: VmmProcess, socket_path: str, timeout: float) -> None:
        self.host._call("vmm.shutdown")
        self.host.discard("vmm", str(process.pid))
        with self.host.lock:
            self.host.vms.pop(socket_path, None)
            self.host.vmm_sockets.pop(process.pid, None)
            self.host._save()

    def is_running(self, process: VmmProcess) -> bool:
        return self.host.has("vmm", str(process.pid))

    def find(self, spec: VmmSpec) -> VmmProcess | None:
        with self.host.lock:
            for pid, socket in self.host.vmm_sockets.items():
                if socket == spec.socket_path and f"vmm:{pid}" in self.host.objects:
                    return VmmProcess(pid, pid * 10, ("fake-vmm", socket))
        return None

    def wait_exit(self, process: VmmProcess, timeout: float) -> int | None:
        return None if self.is_running(process) else 0

    def exit_on_its_own(self, process: VmmProcess) -> None:
        """Test helper: the VMM process dies as if the guest powered off."""
        self.remove_leftover("vmm", str(process.pid))
