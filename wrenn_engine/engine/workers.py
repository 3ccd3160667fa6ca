"""Background workers of an engine: each in its own thread, never holding a
sandbox while a command wants it, stopped cleanly by ``Engine.close``.

- ``VmmWatcher`` follows every running sandbox's VMM: it records the VMM's
  event-monitor lines as ``vmm.event_observed`` events and turns a guest
  shutdown, a guest panic or a VMM that exited into ``vmm.exited`` and the
  ``halt`` command.
- ``InactivityWorker`` pauses running sandboxes whose inactivity timeout
  expired, as actor ``system``.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from wrenn_engine.domain import events as ev
from wrenn_engine.domain.events import Metadata
from wrenn_engine.domain.state import SandboxState, State
from wrenn_engine.errors import ConcurrencyError, SandboxBusy, WrennError
from wrenn_engine.host.base import VmmProcess
from wrenn_engine.host.vmm.monitor import VmmEvent, read_events
from wrenn_engine.lifecycle.runner import describe

if TYPE_CHECKING:
    from wrenn_engine.engine.core import Engine

log = logging.getLogger(__name__)


class Worker:
    """A loop in a daemon thread that runs ``tick`` every ``interval`` seconds."""

    name = "worker"

    def __init__(self, engine: Engine, interval: float):
        self.engine = engine
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"wrenn-{self.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # a worker must outlive one bad tick; it says why
                log.exception(
                    "%s: tick failed; trying again in %.1fs", self.name, self.interval
                )

    def tick(self) -> None:
        raise NotImplementedError


def exit_reason(items: list[VmmEvent]) -> str | None:
    """The guest-initiated exit these monitor events announce, if any.

    Only events read while the sandbox is at rest are classified: the
    events of the engine's own commands (a ``vm.shutdown`` during stop) are
    drained by the command itself, with the sandbox held.
    """
    for item in items:
        if item.source == "guest" and item.event == "panic":
            return "guest-panic"
        if item.source == "vm" and item.event == "shutdown":
            return "guest-shutdown"
    return None


class MonitorLog:
    """Records each sandbox's VMM event-monitor output as engine events.

    Not a thread: the engine calls ``drain`` with the sandbox held, after
    every command and from the watcher. It keeps, per sandbox, the VMM pid
    and the byte offset read so far; both are also in each recorded event,
    so an engine that restarts resumes where the log says it stopped.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._read: dict[str, tuple[int | None, int]] = {}

    def resume_from_log(self, sandbox_id: str) -> None:
        for event in reversed(self.engine.store.read_stream(sandbox_id)):
            if event.type == "vmm.event_observed":
                with self._lock:
                    self._read[sandbox_id] = (
                        event.data.get("pid"),
                        int(event.data.get("offset") or 0),
                    )
                return

    def drain(self, sandbox: SandboxState, classify: bool) -> str | None:
        """Record new monitor events; with ``classify``, return the
        guest-initiated exit they announce, if any."""
        path = sandbox.facts.get("event_monitor")
        if not path:
            return None
        vmm = sandbox.facts.get("vmm")
        pid = int(vmm["pid"]) if vmm else None
        with self._lock:
            known_pid, offset = self._read.get(sandbox.id, (pid, 0))
        if pid is not None and known_pid is not None and pid != known_pid:
            offset = 0  # a new VMM started a new file
        pid = pid if pid is not None else known_pid

        items, new_offset = read_events(path, offset)
        if items:
            self.engine.store.append(
                sandbox.id,
                [
                    ev.VmmEventObserved(
                        i.source,
                        i.event,
                        dict(i.properties),
                        i.secs + i.nanos / 1e9,
                        pid,
                        new_offset,
                    ).to_new()
                    for i in items
                ],
                expected_version=sandbox.version,
                metadata=Metadata("system", host_id=self.engine.host_id),
            )
            sandbox.version += len(items)
        with self._lock:
            self._read[sandbox.id] = (pid, new_offset)
        return exit_reason(items) if classify else None

    def forget(self, sandbox_id: str) -> None:
        with self._lock:
            self._read.pop(sandbox_id, None)


class VmmWatcher(Worker):
    name = "vmm-watcher"

    def __init__(self, engine: Engine):
        super().__init__(engine, engine.settings.watch_interval_s)
        self._watched: dict[str, VmmProcess] = {}
        self._lock = threading.Lock()
        for sandbox in engine.list(states=[State.RUNNING], host_id=engine.host_id):
            self.after_command(sandbox)

    def after_command(self, sandbox: SandboxState) -> None:
        """Watch ``sandbox`` while it is running, forget it otherwise."""
        data = sandbox.facts.get("vmm")
        with self._lock:
            if sandbox.state == State.RUNNING and data:
                self._watched[sandbox.id] = VmmProcess.from_dict(data)
            else:
                self._watched.pop(sandbox.id, None)

    def tick(self) -> None:
        with self._lock:
            watched = list(self._watched)
        for sandbox_id in watched:
            try:
                with self.engine.try_hold(sandbox_id, "vmm watch"):
                    reason = self._check(sandbox_id)
            except (SandboxBusy, ConcurrencyError):
                # A command (of this engine or another process) has it; the
                # events stay in the file until the next tick.
                continue
            if reason:
                self._halt(sandbox_id, reason)

    def _check(self, sandbox_id: str) -> str | None:
        sandbox = self.engine.get(sandbox_id)
        with self._lock:
            process = self._watched.get(sandbox_id)
        if sandbox.state != State.RUNNING or process is None:
            with self._lock:
                self._watched.pop(sandbox_id, None)
            return None
        reason = self.engine.monitor.drain(sandbox, classify=True)
        alive = self.engine.drivers.vmm.is_running(process)
        if reason is None and alive:
            return None

        code = None if alive else self.engine.drivers.vmm.wait_exit(process, 0)
        reason = reason or "vmm-exited"
        self.engine.store.append(
            sandbox.id,
            [ev.VmmExited(reason, process.pid, code).to_new()],
            expected_version=sandbox.version,
            metadata=Metadata("system", host_id=self.engine.host_id),
        )
        with self._lock:
            self._watched.pop(sandbox_id, None)
        return reason

    def _halt(self, sandbox_id: str, reason: str) -> None:
        try:
            self.engine.halt(sandbox_id, reason, wait=True)
        except WrennError as exc:
            log.warning(
                "sandbox %s: halt after %s failed: %s",
                sandbox_id,
                reason,
                describe(exc),
            )


class InactivityWorker(Worker):
    name = "inactivity"

    def __init__(self, engine: Engine):
        super().__init__(engine, engine.settings.inactivity_interval_s)

    def tick(self) -> None:
        now = datetime.now(UTC)
        for sandbox in self.engine.list(
            states=[State.RUNNING], host_id=self.engine.host_id
        ):
            timeout = sandbox.inactivity_timeout_s
            last = sandbox.last_activity_at
            if timeout is None or last is None:
                continue
            if (now - last).total_seconds() < timeout:
                continue
            try:
                self.engine.pause(sandbox.id, actor="system")
                log.info(
                    "sandbox %s: paused after %.0fs without activity",
                    sandbox.id,
                    timeout,
                )
            except WrennError as exc:
                log.warning(
                    "sandbox %s: inactivity pause failed: %s", sandbox.id, describe(exc)
                )
