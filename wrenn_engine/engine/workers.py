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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from wrenn_engine.domain import events as ev
from wrenn_engine.domain.events import Metadata
from wrenn_engine.domain.state import SandboxState, State
from wrenn_engine.errors import SandboxBusy, WrennError
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
        self._thread = threading.Thread(target=self._loop, name=f"wrenn-{self.name}",
                                        daemon=True)

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
                log.exception("%s: tick failed; trying again in %.1fs", self.name,
                              self.interval)

    def tick(self) -> None:
        raise NotImplementedError


@dataclass
class Watched:
    process: VmmProcess
    monitor_path: str
    offset: int = 0


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


class VmmWatcher(Worker):
    name = "vmm-watcher"

    def __init__(self, engine: Engine):
        super().__init__(engine, engine.settings.watch_interval_s)
        self._watched: dict[str, Watched] = {}
        self._lock = threading.Lock()
        for sandbox in engine.list(states=[State.RUNNING], host_id=engine.host_id):
            self.after_command(sandbox, resume_offset=True)

    def after_command(self, sandbox: SandboxState, resume_offset: bool = False) -> None:
        """Watch ``sandbox`` when it is running, forget it otherwise.

        Called with the sandbox held, right after each command: records the
        monitor lines the command's VMM wrote.
        """
        self._drain(sandbox, classify=False)
        data = sandbox.facts.get("vmm")
        with self._lock:
            if sandbox.state != State.RUNNING or not data:
                self._watched.pop(sandbox.id, None)
                return
            process = VmmProcess.from_dict(data)
            current = self._watched.get(sandbox.id)
            if current is None or current.process != process:
                offset = self._recorded_offset(sandbox.id, process.pid) \
                    if resume_offset else 0
                self._watched[sandbox.id] = Watched(
                    process, sandbox.facts.get("event_monitor", ""), offset)

    def tick(self) -> None:
        with self._lock:
            watched = list(self._watched)
        for sandbox_id in watched:
            try:
                with self.engine.try_hold(sandbox_id, "vmm watch"):
                    reason = self._check(sandbox_id)
            except SandboxBusy:
                continue
            if reason:
                self._halt(sandbox_id, reason)

    def _check(self, sandbox_id: str) -> str | None:
        sandbox = self.engine.get(sandbox_id)
        if sandbox.state != State.RUNNING:
            with self._lock:
                self._watched.pop(sandbox_id, None)
            return None
        reason = self._drain(sandbox, classify=True)
        with self._lock:
            entry = self._watched.get(sandbox_id)
        if entry is None:
            return None
        alive = self.engine.drivers.vmm.is_running(entry.process)
        if reason is None and alive:
            return None
        code = None if alive else self.engine.drivers.vmm.wait_exit(entry.process, 0)
        reason = reason or "vmm-exited"
        self._append(sandbox, [ev.VmmExited(reason, entry.process.pid, code)])
        with self._lock:
            self._watched.pop(sandbox_id, None)
        return reason

    def _halt(self, sandbox_id: str, reason: str) -> None:
        try:
            self.engine.halt(sandbox_id, reason, wait=True)
        except WrennError as exc:
            log.warning("sandbox %s: halt after %s failed: %s", sandbox_id, reason,
                        describe(exc))

    def _drain(self, sandbox: SandboxState, classify: bool) -> str | None:
        with self._lock:
            entry = self._watched.get(sandbox.id)
        path = entry.monitor_path if entry else sandbox.facts.get("event_monitor", "")
        if not path:
            return None
        offset = entry.offset if entry else 0
        pid = entry.process.pid if entry else None
        items, new_offset = read_events(path, offset)
        if not items:
            return None
        self._append(sandbox, [
            ev.VmmEventObserved(item.source, item.event, dict(item.properties),
                                item.secs + item.nanos / 1e9, pid, new_offset)
            for item in items
        ])
        if entry is not None:
            entry.offset = new_offset
        return exit_reason(items) if classify else None

    def _recorded_offset(self, sandbox_id: str, pid: int) -> int:
        for event in reversed(self.engine.store.read_stream(sandbox_id)):
            if event.type == "vmm.event_observed" and event.data.get("pid") == pid:
                return int(event.data.get("offset") or 0)
        return 0

    def _append(self, sandbox: SandboxState, events: list[Any]) -> None:
        self.engine.store.append(
            sandbox.id, [e.to_new() for e in events], expected_version=sandbox.version,
            metadata=Metadata("system", host_id=self.engine.host_id),
        )
        sandbox.version += len(events)


class InactivityWorker(Worker):
    name = "inactivity"

    def __init__(self, engine: Engine):
        super().__init__(engine, engine.settings.inactivity_interval_s)

    def tick(self) -> None:
        now = datetime.now(UTC)
        for sandbox in self.engine.list(states=[State.RUNNING],
                                        host_id=self.engine.host_id):
            timeout = sandbox.inactivity_timeout_s
            last = sandbox.last_activity_at
            if timeout is None or last is None:
                continue
            if (now - last).total_seconds() < timeout:
                continue
            try:
                self.engine.pause(sandbox.id, actor="system")
                log.info("sandbox %s: paused after %.0fs without activity", sandbox.id,
                         timeout)
            except WrennError as exc:
                log.warning("sandbox %s: inactivity pause failed: %s", sandbox.id,
                            describe(exc))
