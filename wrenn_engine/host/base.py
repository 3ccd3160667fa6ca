"""The contract between the lifecycle and the host.

The lifecycle's steps call three drivers, one per host concern: rootfs,
network and vmm. Each takes a *plan*: plain data computed before anything is
touched, so the lifecycle can append the plan as the step's intent and a
crash can never forget what was about to be created. Every driver method
that removes something is idempotent (absent is success) and checks what the
kernel reports instead of assuming.

Real drivers live beside this module (``rootfs``, ``network``, ``vmm``);
``fake`` holds in-memory drivers for unit tests and the benchmark.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from wrenn_engine.domain.config import VMConfig

# --- rootfs -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RootfsPlan:
    """Where a sandbox's copy-on-write disk lives and how it is built.

    ``strategy`` is ``dm-snapshot``, ``qcow2`` or ``copy``. ``disk_path`` is
    what the VMM opens (``/dev/mapper/<dm_name>``, the qcow2 overlay, or the
    copy). ``cow_path`` is the per-sandbox file that holds the changes and
    survives pause and stop.
    """

    sandbox_id: str
    strategy: str
    template_path: str
    cow_path: str
    disk_path: str
    image_type: str  # "Raw" or "Qcow2", as the VMM's DiskConfig wants it
    backing_files: bool = False
    dm_name: str = ""
    cow_size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RootfsAttachment:
    """What ``prepare``/``attach`` created: loop devices and dm names."""

    template_loop: str = ""
    cow_loop: str = ""
    dm_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class RootfsDriver(Protocol):
    def plan(self, sandbox_id: str, template_path: str, sandbox_dir: str) -> RootfsPlan:
        """Choose the strategy and the paths; touch nothing."""
        ...

    def prepare(self, plan: RootfsPlan) -> RootfsAttachment:
        """Create the CoW disk and attach it. On failure, remove what it made."""
        ...

    def attach(self, plan: RootfsPlan) -> RootfsAttachment:
        """Attach an existing CoW disk again (after pause or stop)."""
        ...

    def detach(self, plan: RootfsPlan, attachment: RootfsAttachment) -> None:
        """Release loop devices and dm devices; keep the CoW file."""
        ...

    def remove(self, plan: RootfsPlan, attachment: RootfsAttachment) -> None:
        """Detach and delete the CoW file. Idempotent."""
        ...

    def leftovers(self, known: set[str]) -> list[tuple[str, str]]:
        """(kind, name) of rootfs objects this engine made that ``known`` omits."""
        ...

    def remove_leftover(self, kind: str, name: str) -> None: ...


# --- network ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetworkPlan:
    """Every name and address one sandbox's network uses, for one slot."""

    sandbox_id: str
    slot: int
    netns: str
    host_veth: str  # in the host namespace
    ns_veth: str  # inside the sandbox namespace
    tap: str  # inside the sandbox namespace, opened by the VMM
    tap_cidr: str  # "169.254.0.22/30"
    guest_ip: str  # "169.254.0.21"
    host_veth_cidr: str  # host side of the veth pair
    ns_veth_cidr: str  # namespace side of the veth pair
    host_reachable_ip: str  # the sandbox's address as seen from the host
    nft_table: str  # per-sandbox table in the host namespace

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resources(self) -> list[dict[str, Any]]:
        return [
            {"kind": "slot", "name": str(self.slot)},
            {"kind": "netns", "name": self.netns},
            {"kind": "veth", "name": self.host_veth},
            {"kind": "nft_table", "name": self.nft_table},
        ]


@runtime_checkable
class NetworkDriver(Protocol):
    def plan(self, sandbox_id: str, slot: int) -> NetworkPlan:
        """Names and addresses for ``slot``; touch nothing."""
        ...

    def slot_in_use(self, slot: int) -> bool:
        """True if any kernel object of ``slot`` exists (left by a crash)."""
        ...

    def prepare(self, plan: NetworkPlan) -> None:
        """Create namespace, veth, TAP, addresses, routes and the nft table."""
        ...

    def teardown(self, plan: NetworkPlan) -> None:
        """Remove all of it and check the kernel agrees. Idempotent."""
        ...

    def leftovers(self, known: set[str]) -> list[tuple[str, str]]:
        """(kind, name) of network objects with this engine's prefix not in
        ``known`` (a set of ``"kind:name"``)."""
        ...

    def remove_leftover(self, kind: str, name: str) -> None: ...


# --- vmm --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmmSpec:
    """How to start one VMM process for one sandbox."""

    sandbox_id: str
    binary: str  # path of cloud-hypervisor, or "simulator"
    netns: str
    socket_path: str
    sandbox_dir: str
    log_path: str
    event_monitor_path: str
    restore_from: str = ""  # snapshot directory for --restore, or empty

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class VmmProcess:
    """A launched VMM: enough to find it again after a restart."""

    pid: int
    start_time: int  # clock ticks since boot, /proc/<pid>/stat field 22
    argv: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.start_time, "argv": list(self.argv)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmmProcess:
        return cls(int(data["pid"]), int(data["start_time"]), tuple(data["argv"]))


@dataclass(frozen=True, slots=True)
class DiskSpec:
    path: str
    image_type: str = "Raw"
    backing_files: bool = False
    readonly: bool = False


@runtime_checkable
class VmmDriver(Protocol):
    def launch(self, spec: VmmSpec, timeout: float) -> VmmProcess:
        """Start the VMM in the sandbox's namespace and wait for its API.

        On failure nothing is left running and the socket is removed.
        """
        ...

    def create_vm(self, socket_path: str, config: VMConfig, disk: DiskSpec) -> None:
        """``vm.create`` with a VmConfig built from ``config`` and ``disk``."""
        ...

    def boot(self, socket_path: str) -> None:
        """``vm.boot`` then ``vm.info``; raise unless the VM is Running."""
        ...

    def pause(self, socket_path: str) -> None: ...

    def resume(self, socket_path: str) -> None: ...

    def snapshot(self, socket_path: str, destination: str) -> None:
        """Snapshot the paused VM into ``destination`` (a temp dir, renamed
        into place by the caller only on success)."""
        ...

    def restore(self, socket_path: str, source: str) -> None:
        """``vm.restore`` from ``source``; the VM stays paused."""
        ...

    def info(self, socket_path: str) -> dict[str, Any]: ...

    def shutdown(self, process: VmmProcess, socket_path: str, timeout: float) -> None:
        """``vm.shutdown`` and ``vmm.shutdown``, then SIGTERM and SIGKILL by
        pid (after checking the pid's command line is still this VMM).
        Idempotent: a VMM already gone is success."""
        ...

    def is_running(self, process: VmmProcess) -> bool:
        """True if ``process`` is alive and is still the same VMM."""
        ...

    def find(self, spec: VmmSpec) -> VmmProcess | None:
        """The live VMM this engine started for ``spec`` (same sandbox, same
        API socket), if any: how a launch whose result was never recorded
        (a failure or a crash right after it) is found and stopped."""
        ...

    def wait_exit(self, process: VmmProcess, timeout: float) -> int | None:
        """The exit code if the process exits within ``timeout``, else None."""
        ...

    def leftovers(self, known: set[str]) -> list[tuple[str, str]]:
        """("vmm", pid) of VMM processes this engine started not in ``known``."""
        ...

    def remove_leftover(self, kind: str, name: str) -> None: ...


@dataclass(slots=True)
class HostDrivers:
    """The three drivers one engine uses."""

    rootfs: RootfsDriver
    network: NetworkDriver
    vmm: VmmDriver
