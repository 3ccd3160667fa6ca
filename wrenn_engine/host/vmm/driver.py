"""The cloud-hypervisor driver: the lifecycle's ``VmmDriver`` for real hosts.

``VmmSpec.binary`` names the VMM: a path to cloud-hypervisor, or
``"simulator"`` (or a path to the ``wrenn-ch-simulator`` console script) for
the simulator shipped in this package, which takes the same command line and
speaks the same API (see ``simulator``). The simulator is run from its file
with this interpreter (``python -I -S``, see ``launcher.simulator_program``):
that skips ``site`` and the package import and starts in about half the time
of the console script. Each API call opens a fresh connection to the
sandbox's socket; the driver keeps no state a restart would lose beyond the
table of children it must reap, so it is safe to share between threads.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wrenn_engine import settings as engine_settings
from wrenn_engine.domain.config import VMConfig
from wrenn_engine.errors import ConfigError, HostError, ResourceBusy, VmmError
from wrenn_engine.host.base import DiskSpec, VmmProcess, VmmSpec
from wrenn_engine.host.procinfo import start_time
from wrenn_engine.host.vmm import launcher
from wrenn_engine.host.vmm.client import Recorder, VmmClient
from wrenn_engine.host.vmm.config import SERIAL_LOG_NAME, build_vm_config
from wrenn_engine.host.vmm.monitor import EventMonitor, GuestExit, VmmEvent

logger = logging.getLogger(__name__)

#: ``VmmSpec.binary`` value that selects the simulator.
SIMULATOR = "simulator"
#: The simulator's console script; a binary by this name is run as the simulator.
SIMULATOR_SCRIPT = "wrenn-ch-simulator"
CLOUD_HYPERVISOR = "cloud-hypervisor"

_MIN_CALL_S = 0.05


@dataclass(frozen=True, slots=True)
class VmmSettings:
    """Knobs of :class:`CloudHypervisorDriver`."""

    #: cloud-hypervisor to use when a spec names none; "" searches PATH.
    binary: str = ""
    #: Marks the VMMs this engine starts (``WRENN_ENGINE_OWNER``); "" means the
    #: engine's state directory. ``leftovers`` only ever sees VMMs with this mark.
    owner: str = ""
    #: Seconds each API request may take.
    api_timeout_s: float = 5.0
    #: Seconds between SIGTERM and SIGKILL when a VMM does not exit.
    term_grace_s: float = 2.0
    #: Seconds to wait for a process to vanish after SIGKILL.
    kill_wait_s: float = 5.0
    #: Pass ``-v`` so the VMM log has info lines.
    verbose: bool = True
    #: Send the guest's serial console to ``<sandbox_dir>/serial.log``.
    serial_log: bool = True
    #: Extra options for the simulator only (its test controls).
    simulator_args: tuple[str, ...] = ()
    #: Record every API exchange (tests check them against the OpenAPI document).
    recorder: Recorder | None = None


def find_cloud_hypervisor(configured: str | None = None) -> str | None:
    """``configured`` if it is an executable file, else cloud-hypervisor on PATH."""
    if configured and os.path.isfile(configured) and os.access(configured, os.X_OK):
        return configured
    return shutil.which(CLOUD_HYPERVISOR)


class CloudHypervisorDriver:
    """Starts, drives and stops cloud-hypervisor (or the simulator).

    Implements :class:`~wrenn_engine.host.base.VmmDriver`.
    """

    def __init__(self, settings: VmmSettings | None = None) -> None:
        self.settings = settings or VmmSettings()
        self.owner = self.settings.owner or str(engine_settings.state_dir())
        self._sandboxes: dict[str, str] = {}
        self._lock = threading.Lock()

    # --- launching ----------------------------------------------------------

    def command(self, spec: VmmSpec) -> list[str]:
        """The VMM's command line for ``spec`` (without the namespace trampoline)."""
        if spec.binary in (SIMULATOR, SIMULATOR_SCRIPT) or spec.binary.endswith(
            "/" + SIMULATOR_SCRIPT
        ):
            program = launcher.simulator_program()
            extra = self.settings.simulator_args
        else:
            program = [self._binary(spec.binary)]
            extra = ()
        return launcher.vmm_argv(
            spec, program, verbose=self.settings.verbose, extra=extra
        )

    def launch(self, spec: VmmSpec, timeout: float) -> VmmProcess:
        """Start the VMM in ``spec.netns`` and wait for its API (see ``launcher``)."""
        environment = {
            launcher.OWNER_ENV: self.owner,
            launcher.SANDBOX_ENV: spec.sandbox_id,
        }
        process = launcher.launch(
            spec, self.command(spec), timeout, environment=environment
        )
        with self._lock:
            self._sandboxes[spec.socket_path] = spec.sandbox_id
        return process

    def _binary(self, name: str) -> str:
        path = name or self.settings.binary or CLOUD_HYPERVISOR
        if "/" not in path:
            path = shutil.which(path) or path
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise VmmError(
                "vmm.launch",
                None,
                f"{path} is not an executable file; install cloud-hypervisor there, "
                f"or set vmm_bin to its path, or to {SIMULATOR!r} for the simulator",
            )
        return path

    # --- the API ------------------------------------------------------------

    def client(self, socket_path: str, timeout: float | None = None) -> VmmClient:
        """A client for the VMM at ``socket_path`` with this driver's settings."""
        return VmmClient(
            socket_path,
            self.settings.api_timeout_s if timeout is None else timeout,
            recorder=self.settings.recorder,
        )

    def create_vm(self, socket_path: str, config: VMConfig, disk: DiskSpec) -> None:
        """``vm.create`` with the VmConfig built from ``config`` and ``disk``."""
        serial = (
            os.path.join(config.sandbox_dir, SERIAL_LOG_NAME)
            if self.settings.serial_log and config.sandbox_dir
            else None
        )
        body = build_vm_config(config, disk, serial_path=serial)
        self.client(socket_path).create(body)
        with self._lock:
            self._sandboxes.setdefault(socket_path, config.sandbox_id)

    def boot(self, socket_path: str) -> None:
        """``vm.boot``, then ``vm.info``; VmmError unless the VM is Running."""
        client = self.client(socket_path)
        client.boot()
        state = client.info().get("state")
        if state != "Running":
            raise VmmError(
                "vm.info",
                200,
                f"the VM is {state} after vm.boot, not "
                "Running; look at the VMM log in the sandbox directory",
            )
        logger.debug("sandbox %s: VM running", self._sandbox(socket_path))

    def pause(self, socket_path: str) -> None:
        self.client(socket_path).pause()

    def resume(self, socket_path: str) -> None:
        self.client(socket_path).resume()

    def snapshot(self, socket_path: str, destination: str) -> None:
        """``vm.snapshot`` of the paused VM into the existing ``destination``."""
        self.client(socket_path).snapshot(f"file://{destination}")

    def restore(self, socket_path: str, source: str) -> None:
        """``vm.restore`` from the snapshot in ``source``; the VM stays paused."""
        self.client(socket_path).restore({"source_url": f"file://{source}"})

    def info(self, socket_path: str) -> dict[str, Any]:
        return self.client(socket_path).info()

    # --- stopping -----------------------------------------------------------

    def shutdown(self, process: VmmProcess, socket_path: str, timeout: float) -> None:
        """``vm.shutdown`` and ``vmm.shutdown`` within ``timeout``, then SIGTERM and
        SIGKILL (each only after the pid is checked to still be this VMM); then the
        socket files go. Idempotent: a VMM already gone is success."""
        sandbox = self._sandbox(socket_path)
        deadline = time.monotonic() + timeout

        if launcher.is_running(process):
            client = self.client(socket_path)
            for call in (client.shutdown, client.shutdown_vmm):
                remaining = deadline - time.monotonic()
                if remaining < _MIN_CALL_S:
                    break
                client.timeout = remaining
                try:
                    call()
                except VmmError as exc:
                    logger.debug("sandbox %s: %s", sandbox, exc)
            code = launcher.wait_exit(process, max(0.0, deadline - time.monotonic()))
            if code is None and not launcher.terminate(
                process,
                grace=self.settings.term_grace_s,
                kill_wait=self.settings.kill_wait_s,
                sandbox_id=sandbox,
            ):
                raise VmmError(
                    "vmm.shutdown",
                    None,
                    f"VMM pid {process.pid} is still there "
                    f"{self.settings.kill_wait_s:g}s after SIGKILL",
                )

        launcher.forget(process)
        if not launcher.remove_socket_files(socket_path):
            logger.warning(
                "sandbox %s: %s still answers after VMM pid %d exited; left in place",
                sandbox,
                socket_path,
                process.pid,
            )
        with self._lock:
            self._sandboxes.pop(socket_path, None)

    def is_running(self, process: VmmProcess) -> bool:
        return launcher.is_running(process)

    def wait_exit(self, process: VmmProcess, timeout: float) -> int | None:
        """The exit status within ``timeout``, else None; ``launcher.EXIT_UNKNOWN``
        (-1) for a VMM an earlier engine process started."""
        return launcher.wait_exit(process, timeout)

    # --- events -------------------------------------------------------------

    def follow_events(
        self,
        spec: VmmSpec,
        process: VmmProcess,
        on_event: Callable[[VmmEvent], None],
        on_exit: Callable[[GuestExit], None] | None = None,
    ) -> EventMonitor:
        """A started :class:`EventMonitor` on ``spec``'s event file that also
        notices the process exiting."""
        return EventMonitor(
            spec.event_monitor_path,
            on_event,
            on_exit=on_exit,
            is_alive=lambda: launcher.is_running(process),
            sandbox_id=spec.sandbox_id,
        ).start()

    # --- reconcile ----------------------------------------------------------

    def find(self, spec: VmmSpec) -> VmmProcess | None:
        """The live VMM carrying this engine's mark for ``spec``'s sandbox and
        API socket, if any."""
        for pid, sandbox_id in launcher.find_marked(self.owner):
            if sandbox_id != spec.sandbox_id:
                continue
            argv = launcher.read_cmdline(pid)
            started = start_time(pid)
            if argv is None or started is None:
                continue
            if launcher.api_socket_of(argv) == spec.socket_path:
                return VmmProcess(pid, started, tuple(argv))
        return None

    def leftovers(self, known: set[str]) -> list[tuple[str, str]]:
        """("vmm", pid) of live VMMs carrying this engine's owner mark whose pid
        (or ``"vmm:<pid>"``) is not in ``known``."""
        found = []
        for pid, _sandbox in launcher.find_marked(self.owner):
            if str(pid) not in known and f"vmm:{pid}" not in known:
                found.append(("vmm", str(pid)))
        return found

    def remove_leftover(self, kind: str, name: str) -> None:
        """Stop a leftover VMM (``"vmm"``, pid) or remove a stale API socket
        (``"socket"``, path). Absent is success."""
        if kind == "socket":
            if not launcher.remove_socket_files(name):
                raise ResourceBusy("API socket", name, "a process answers on it")
            return
        if kind != "vmm":
            raise ConfigError(
                "kind", f"{kind!r} is not a VMM leftover kind", limit="vmm or socket"
            )
        try:
            pid = int(name)
        except ValueError as exc:
            raise ConfigError("name", f"{name!r} is not a pid") from exc

        env = launcher.read_environ(pid)
        info = launcher.read_stat(pid)
        argv = launcher.read_cmdline(pid)
        if env is None or info is None or argv is None:
            return
        if env.get(launcher.OWNER_ENV) != self.owner:
            raise HostError(
                f"pid {pid} is not a VMM this engine started (no "
                f"{launcher.OWNER_ENV}={self.owner} mark); left alone"
            )

        sandbox = env.get(launcher.SANDBOX_ENV, "")
        process = VmmProcess(pid, info[1], argv)
        if not launcher.terminate(
            process,
            grace=self.settings.term_grace_s,
            kill_wait=self.settings.kill_wait_s,
            sandbox_id=sandbox,
        ):
            raise VmmError(
                "vmm.shutdown", None, f"leftover VMM pid {pid} survived SIGKILL"
            )
        socket_path = launcher.api_socket_of(argv)
        if socket_path:
            launcher.remove_socket_files(socket_path)
        logger.info("sandbox %s: removed leftover VMM pid %d", sandbox, pid)

    def _sandbox(self, socket_path: str) -> str:
        with self._lock:
            return self._sandboxes.get(socket_path, socket_path)
