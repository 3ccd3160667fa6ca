"""Reconcile: bring the host and the log back into agreement after a crash.

Run when an engine opens and on demand (``wrenn-engine reconcile``). For
every sandbox this host owns:

- a transition cut off by a dead engine is finished when its steps are all
  idempotent releases (stop, halt, destroy), or its recorded steps are undone
  from their intents (start, pause, resume); it lands where the undo leaves
  it, with "interrupted at <step>" as the error;
- a running sandbox whose VMM is alive is adopted (pid, start time and
  command line checked); one whose VMM is gone is halted with the reason.

Then every host object with this engine's names that no live sandbox holds
(the log's held resources) is removed. Every action is an event: on the
sandbox's stream, or on the host's stream (``host.<host_id>``) for objects
that belong to no sandbox.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from wrenn_engine.domain import events as ev
from wrenn_engine.domain.events import Metadata, host_stream
from wrenn_engine.domain.state import SandboxState, State
from wrenn_engine.errors import ConcurrencyError, SandboxBusy, WrennError
from wrenn_engine.host.base import VmmProcess, VmmSpec
from wrenn_engine.host.procinfo import instance_alive
from wrenn_engine.lifecycle.runner import describe

if TYPE_CHECKING:
    from wrenn_engine.engine.core import Engine

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.store = engine.store
        self.host_id = engine.host_id
        self.actions: list[str] = []

    def run(self) -> list[str]:
        halts: list[tuple[str, str]] = []
        for sandbox in self.store.list_sandboxes(host_id=self.host_id):
            if sandbox.state == State.DESTROYED:
                continue
            try:
                with self.engine.hold(sandbox.id, "reconcile", wait=False):
                    halt = self._sandbox(sandbox.id)
            except SandboxBusy:
                continue  # a command of this engine is working on it
            except WrennError as exc:
                self._note(f"{sandbox.id}: reconcile failed: {describe(exc)}")
                continue
            if halt:
                halts.append((sandbox.id, halt))

        for sandbox_id, reason in halts:
            try:
                self.engine.halt(sandbox_id, reason, wait=True)
                self._note(f"{sandbox_id}: halted ({reason})")
            except WrennError as exc:
                self._note(f"{sandbox_id}: halt failed: {describe(exc)}")

        self._leftovers()
        return self.actions

    # --- one sandbox ------------------------------------------------------------------

    def _sandbox(self, sandbox_id: str) -> str | None:
        """Reconcile one held sandbox; return a halt reason when it needs one."""
        sandbox = self.engine.get(sandbox_id)
        if sandbox.is_transient:
            self.interrupted(sandbox)
            return None
        if sandbox.state == State.RUNNING:
            return self._running(sandbox)
        return None

    def interrupted(self, sandbox: SandboxState) -> None:
        """Finish or undo the transition a gone engine left half-way."""
        record = sandbox.transition
        if record is None:
            return
        alive = instance_alive(record.engine, self.host_id)
        if alive and record.engine != self.engine.instance:
            return  # another live engine process on this host drives it

        step = record.steps[-1].step if record.steps else str(sandbox.state)
        options = {}
        if (
            record.name == "halt"
            and sandbox.facts.get("exit_reason") != "guest-shutdown"
        ):
            options["land_in_error"] = f"{sandbox.facts.get('exit_reason')}"
        run = self.engine._new_run(sandbox, record.name, "system", None, options)
        run.append(
            ev.ReconcileActed(
                "recovering",
                detail=f"{record.name} interrupted at {step} "
                f"(engine {record.engine} is gone)",
            )
        )
        outcome = run.recover(step)
        self._note(
            f"{sandbox.id}: {record.name} interrupted at {step}: now {outcome.state}"
        )

    def _running(self, sandbox: SandboxState) -> str | None:
        data = sandbox.facts.get("vmm")
        if not data:
            return "vmm-exited"
        process = VmmProcess.from_dict(data)
        if self.engine.drivers.vmm.is_running(process):
            if not self._adopted_before(sandbox.id, process.pid):
                self._append(
                    sandbox,
                    ev.ReconcileActed(
                        "adopted",
                        "vmm",
                        str(process.pid),
                        detail=f"engine {self.engine.instance} now watches it",
                    ),
                )
                self._note(f"{sandbox.id}: adopted VMM pid {process.pid}")
            return None
        reason = "vmm-exited"
        self._append(
            sandbox,
            ev.VmmExited(reason, process.pid, None, "found not running by reconcile"),
        )
        return reason

    def _adopted_before(self, sandbox_id: str, pid: int) -> bool:
        """True if the log already says this VMM was adopted (no event twice)."""
        for event in reversed(self.store.read_stream(sandbox_id)):
            if event.type == "step.completed" and event.data["step"] == "vmm.launch":
                return False
            if (
                event.type == "reconcile.acted"
                and event.data["action"] == "adopted"
                and event.data["name"] == str(pid)
            ):
                return True
        return False

    # --- leftovers --------------------------------------------------------------------

    def _leftovers(self) -> None:
        known = {f"{r.kind}:{r.name}" for r in self.store.held_resources(self.host_id)}
        known |= self._launching()
        drivers = self.engine.drivers
        for driver in (drivers.vmm, drivers.network, drivers.rootfs):
            for kind, name in driver.leftovers(known):
                try:
                    driver.remove_leftover(kind, name)
                except WrennError as exc:
                    self._note(
                        f"could not remove leftover {kind} {name}: {describe(exc)}"
                    )
                    continue
                self._record_host(
                    ev.ReconcileActed(
                        "removed", kind, name, detail="held by no live sandbox"
                    )
                )
                self._note(f"removed leftover {kind} {name}")

    def _launching(self) -> set[str]:
        """VMMs that a live engine is launching right now.

        Between starting a VMM and recording its pid, a live engine's VMM is
        in no log; its ``vmm.launch`` intent is. Such a VMM is not a leftover.
        """
        protected: set[str] = set()
        for sandbox in self.store.list_sandboxes(host_id=self.host_id):
            record = sandbox.transition
            if record is None or not instance_alive(record.engine, self.host_id):
                continue
            for step in record.steps:
                spec = step.intent.get("spec")
                if step.step == "vmm.launch" and step.result is None and spec:
                    found = self.engine.drivers.vmm.find(VmmSpec(**spec))
                    if found is not None:
                        protected.add(f"vmm:{found.pid}")
        return protected

    # --- recording --------------------------------------------------------------------

    def _append(self, sandbox: SandboxState, event: ev.Event) -> None:
        self.store.append(
            sandbox.id,
            [event.to_new()],
            expected_version=sandbox.version,
            metadata=Metadata("system", host_id=self.host_id),
        )
        sandbox.version += 1

    def _record_host(self, event: ev.Event) -> None:
        stream = host_stream(self.host_id)
        for _ in range(5):
            version = len(self.store.read_stream(stream))
            try:
                self.store.append(
                    stream,
                    [event.to_new()],
                    expected_version=version,
                    metadata=Metadata("system", host_id=self.host_id),
                )
                return
            except ConcurrencyError:
                continue

    def _note(self, text: str) -> None:
        log.info("reconcile: %s", text)
        self.actions.append(text)
