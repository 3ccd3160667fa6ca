"""Running one command on one sandbox: the model the state machine drives.

A ``CommandRun`` is attached to the shared ``transitions`` machine for the
length of one command. The machine's hooks do the work:

- ``before_state_change`` appends the event of every state change
  (``transition.started``, ``.advanced``, ``.completed``, ``.rolled_back``,
  ``.failed``) with the expected version, so a concurrent command fails its
  first append and nothing else happens;
- entering a transient state runs the steps of that phase. Each step appends
  its intent, fires its failpoint, does its effect, fires ``<step>.done`` and
  appends its result. A failure undoes the done steps in reverse (the failed
  one too, from its intent), records each undo, and triggers ``rollback``
  (back to where the command started, when every undo succeeded and every
  done step could be undone) or ``fail`` (``error``, with the cause).

The same class finishes or rolls back a transition that a crash cut off
(``recover``), from the steps the log recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from transitions import EventData

from wrenn_engine.domain import events as ev
from wrenn_engine.domain.events import Metadata, NewEvent, RecordedEvent
from wrenn_engine.domain.state import SandboxState, StepRecord, evolve
from wrenn_engine.errors import LifecycleError, SlotTaken
from wrenn_engine.lifecycle.failpoints import Failpoints
from wrenn_engine.lifecycle.machine import CommandSpec, build_machine
from wrenn_engine.lifecycle.steps import Intent, Pipeline, Result, Step, StepContext
from wrenn_engine.store.base import EventStore

log = logging.getLogger(__name__)


class AlreadyApplied(Exception):
    """The command id was applied by a concurrent call; nothing to do."""


def describe(exc: BaseException) -> str:
    """The message of an error and of every cause behind it, on one line."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current) or type(current).__name__
        if not parts or text not in parts[-1]:
            parts.append(f"{text}" if parts else text)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return " <- caused by: ".join(parts)


@dataclass
class DoneStep:
    step: Step
    intent: Intent
    result: Result | None = None
    failed: bool = False


@dataclass
class RunOutcome:
    """How a command ended."""

    state: str
    failed_step: str | None = None
    error: BaseException | None = None
    error_text: str | None = None


@dataclass(eq=False)
class CommandRun:
    """The transitions model for one command on one sandbox."""

    store: EventStore
    sandbox: SandboxState
    spec: CommandSpec
    pipeline: Pipeline
    metadata: Metadata
    ctx: StepContext
    failpoints: Failpoints
    engine_instance: str
    command_id: str | None = None
    #: Called with the sandbox state after every append (wakes waiters).
    on_append: Callable[[SandboxState], None] = lambda s: None
    state: str = ""
    done: list[DoneStep] = field(default_factory=list)
    outcome: RunOutcome | None = None
    _first_append: bool = True
    _stored_version: int = 0
    _deferred: list[NewEvent] = field(default_factory=list)
    _failure: tuple[str, BaseException, str] | None = None
    _land_in_error: str | None = None

    def __post_init__(self) -> None:
        self.state = str(self.sandbox.state)
        self.ctx.sandbox = self.sandbox
        self._stored_version = self.sandbox.version

    # --- appending --------------------------------------------------------------------

    def append(self, *events: ev.Event) -> None:
        """Append ``events``, after any deferred ones, in one transaction."""
        new = [e.to_new() for e in events]
        batch = [*self._deferred, *new]
        register = self.command_id if self._first_append else None
        result = self.store.append(
            self.sandbox.id,
            batch,
            expected_version=self._stored_version,
            metadata=self.metadata,
            command_id=register,
            command=self.spec.name,
        )
        if result.replayed:
            raise AlreadyApplied(self.command_id)
        self._first_append = False
        self._deferred.clear()
        self._stored_version += len(batch)
        self._apply(new, result.first_position + len(batch) - len(new))
        self.on_append(self.sandbox)

    def defer(self, event: ev.Event) -> None:
        """Record ``event`` with the next append, applying it locally now.

        A step's result rides with the next step's intent (or the
        transition's end), which halves the commits of a command and keeps
        the rule that an intent is durable before its effect. A crash before
        that append loses only the result, exactly like a crash at the
        ``<step>.done`` failpoint, which reconcile already handles.
        """
        new = event.to_new()
        self._deferred.append(new)
        self._apply([new], 0)

    def _apply(self, new: list[NewEvent], first_position: int) -> None:
        now = datetime.now(UTC)
        for offset, item in enumerate(new):
            evolve(
                self.sandbox,
                RecordedEvent(
                    position=first_position + offset if first_position else 0,
                    stream_id=self.sandbox.id,
                    version=self.sandbox.version + 1,
                    type=item.type,
                    schema_version=item.schema_version,
                    data=item.data,
                    metadata=self.metadata,
                    recorded_at=now,
                ),
            )

    # --- machine hooks ----------------------------------------------------------------

    def record_change(self, event: EventData) -> None:
        """before_state_change: append the event of this state change."""
        trigger = event.event.name
        assert event.transition is not None and event.transition.dest is not None
        dest = str(event.transition.dest)
        name = self.spec.name
        if trigger == name:
            self.append(
                ev.TransitionStarted(name, self.state, dest, self.engine_instance)
            )
        elif trigger == "advance":
            self.append(ev.TransitionAdvanced(name, dest))
        elif trigger == "complete":
            self.append(ev.TransitionCompleted(name, dest))
        elif trigger == "rollback":
            step, _, text = self._failure or ("", None, "")
            self.append(ev.TransitionRolledBack(name, dest, step, text))
        elif trigger == "fail":
            step, _, text = self._failure or ("", None, self._land_in_error or "")
            self.append(ev.TransitionFailed(name, dest, step, text))

    def rolls_back_to(self, event: EventData) -> bool:
        """Condition of ``rollback``: pick the transition back to the source."""
        assert event.transition is not None
        return bool(event.transition.dest == event.kwargs.get("to"))

    def run_phase(self, event: EventData | None = None) -> None:
        """on_enter of a transient state: run the steps of this phase."""
        phase = self.state
        steps = [s for s in self.pipeline if s.phase == phase]
        if not self._run_steps(steps):
            self._unwind()
            return
        later = [s for s in self.pipeline if _after(self.pipeline, phase, s)]
        if later and later[0].phase != phase:
            self.trigger("advance")
        elif self._land_in_error:
            self._failure = (
                "",
                LifecycleError(self._land_in_error),
                self._land_in_error,
            )
            self.trigger("fail")
        else:
            self.trigger("complete")

    if TYPE_CHECKING:
        # Bound by transitions when the run is added to the machine.
        def trigger(self, name: str, **kwargs: Any) -> bool: ...

    # --- steps ------------------------------------------------------------------------

    def _run_steps(self, steps: list[Step]) -> bool:
        for step in steps:
            try:
                self._run_step(step)
            except AlreadyApplied:
                raise
            except Exception as exc:  # every step failure is recorded and undone
                text = describe(exc)
                log.warning(
                    "sandbox %s: %s: step %s failed: %s",
                    self.sandbox.id,
                    self.spec.name,
                    step.name,
                    text,
                )
                self._failure = (step.name, exc, text)
                if (
                    self.done
                    and self.done[-1].step.name == step.name
                    and self.done[-1].result is None
                ):
                    self.done[-1].failed = True
                    self.append(
                        ev.StepFailed(
                            self.spec.name, step.name, text, type(exc).__name__
                        )
                    )
                return False
        return True

    def _run_step(self, step: Step) -> None:
        sandbox_id = self.sandbox.id
        intent = self._plan_and_record(step)
        self.done.append(DoneStep(step, intent))

        self.failpoints.hit(step.name, sandbox_id)
        result = step.run(self.ctx, intent) or {}
        self.failpoints.hit(f"{step.name}.done", sandbox_id)

        self.defer(ev.StepCompleted(self.spec.name, step.name, result))
        self.done[-1].result = result
        log.info(
            "sandbox %s: %s: %s done%s",
            sandbox_id,
            self.spec.name,
            step.name,
            f" (skipped: {result['skipped']})" if "skipped" in result else "",
        )

    def _plan_and_record(self, step: Step) -> Intent:
        """Compute the intent and append it; re-plan when a slot was taken."""
        retries = self.ctx.settings.slot_retries
        for _ in range(retries + 1):
            intent = step.plan(self.ctx) if step.plan else {}
            try:
                self.append(ev.StepStarted(self.spec.name, step.name, intent))
                return intent
            except SlotTaken as exc:
                self.ctx.refused_slots.add(exc.slot)
                log.info(
                    "sandbox %s: slot %d was taken meanwhile, choosing another",
                    self.sandbox.id,
                    exc.slot,
                )
        raise SlotTaken(self.sandbox.host_id, -1, f"{retries} concurrent sandboxes")

    # --- failure ----------------------------------------------------------------------

    def _unwind(self) -> None:
        """Undo done steps (or not) and trigger rollback or fail."""
        assert self._failure is not None
        step_name, exc, text = self._failure
        reversible = self.spec.on_failure == "rollback" and _reversible(self.done)
        # Release steps cannot be taken back: then only the failed step's own
        # partial work is removed, and what the log says is still held stays
        # recorded so that destroy (host.sweep) removes it.
        undone_ok = self.undo_done() if reversible else self._undo_failed_only()
        self.outcome = RunOutcome(
            state="", failed_step=step_name, error=exc, error_text=text
        )
        if reversible and undone_ok:
            self.trigger("rollback", to=self.transition_source())
        else:
            self.trigger("fail")

    def undo_done(self) -> bool:
        """Undo every done step in reverse; True when every undo succeeded."""
        ok = True
        for done in reversed(self.done):
            if done.step.undo is None or _skipped(done.result):
                continue
            ok = self._undo_one(done) and ok
        self.done.clear()
        return ok

    def _undo_failed_only(self) -> bool:
        failed = [d for d in self.done if d.failed and d.step.undo is not None]
        return all([self._undo_one(d) for d in failed])

    def _undo_one(self, done: DoneStep) -> bool:
        assert done.step.undo is not None
        try:
            done.step.undo(self.ctx, done.intent, done.result)
        except Exception as exc:  # recorded; the sandbox lands in error
            text = describe(exc)
            log.warning(
                "sandbox %s: %s: undo of %s failed: %s",
                self.sandbox.id,
                self.spec.name,
                done.step.name,
                text,
            )
            self.append(ev.StepUndoFailed(self.spec.name, done.step.name, text))
            return False
        self.append(ev.StepUndone(self.spec.name, done.step.name))
        log.info(
            "sandbox %s: %s: %s undone", self.sandbox.id, self.spec.name, done.step.name
        )
        return True

    def transition_source(self) -> str:
        record = self.sandbox.transition
        return record.from_state if record else str(self.spec.sources[0])

    # --- entry points -----------------------------------------------------------------

    def execute(self) -> RunOutcome:
        """Run the whole command through a state machine of its own."""
        self._land_in_error = self.ctx.options.get("land_in_error")
        build_machine(self, self.state)
        self.trigger(self.spec.name)
        return self._finish()

    def recover(self, interrupted_at: str) -> RunOutcome:
        """Finish or roll back a transition a crash cut off.

        Commands whose failure policy is ``error`` (stop, halt, destroy) are
        finished: their steps are idempotent and run again from the start of
        the current phase. Others undo what the log says was done, from the
        recorded intents and results, and land back where they started when
        that worked, else in ``error``; either way with
        "interrupted at <step>".
        """
        text = f"interrupted at {interrupted_at}"
        self._first_append = False
        build_machine(self, self.state)
        if self.spec.on_failure == "error":
            self.run_phase()
            return self._finish()
        if self._past_no_return():
            return self._roll_forward(interrupted_at)

        self.done = self._recorded_steps()
        reversible = _reversible(self.done)
        ok = self.undo_done() if reversible else False
        self._failure = (interrupted_at, LifecycleError(text), text)
        if reversible and ok:
            self.trigger("rollback", to=self.transition_source())
        else:
            self.trigger("fail")
        return self._finish()

    def _past_no_return(self) -> bool:
        """True when the command's point of no return completed before the
        crash (a pause whose snapshot is whole, a resume whose VM runs)."""
        point = self.spec.roll_forward_after
        record = self.sandbox.transition
        if not point or record is None:
            return False
        done = record.step(point)
        return done is not None and done.status == "completed"

    def _roll_forward(self, interrupted_at: str) -> RunOutcome:
        """Run the steps after the point of no return again (they are
        idempotent releases) and complete the command."""
        names = self.pipeline.names()
        point = self.spec.roll_forward_after
        remaining = [
            s for s in self.pipeline if names.index(s.name) > names.index(point)
        ]
        log.info(
            "sandbox %s: %s interrupted at %s, after %s: finishing it",
            self.sandbox.id,
            self.spec.name,
            interrupted_at,
            point,
        )
        if self._run_steps(remaining):
            self.trigger("complete")
        else:
            self._unwind()
        return self._finish()

    def _recorded_steps(self) -> list[DoneStep]:
        record = self.sandbox.transition
        out: list[DoneStep] = []
        for step_record in record.steps if record else []:
            step = self._step_named(step_record)
            if step_record.status in ("started", "completed", "failed"):
                out.append(
                    DoneStep(
                        step,
                        step_record.intent,
                        step_record.result,
                        failed=step_record.status != "completed",
                    )
                )
        return out

    def _step_named(self, record: StepRecord) -> Step:
        try:
            return self.pipeline.get(record.step)
        except Exception:  # a step removed from the pipeline since: no undo known
            return Step(record.step, run=lambda c, i: {})

    def _finish(self) -> RunOutcome:
        outcome = self.outcome or RunOutcome(state="")
        outcome.state = str(self.sandbox.state)
        self.outcome = outcome
        return outcome


def _reversible(done: list[DoneStep]) -> bool:
    """True when every step that began can be undone.

    A step without an undo that failed or was cut off counts too: its effect
    may have happened (a VMM stopped, a disk half deleted), so going back is
    not safe and the sandbox lands in ``error`` instead.
    """
    return all(d.step.undo is not None or _skipped(d.result) for d in done)


def _skipped(result: Result | None) -> bool:
    return result is not None and "skipped" in result


def _after(pipeline: Pipeline, phase: str, step: Step) -> bool:
    """True for steps after the last step of ``phase``."""
    names = pipeline.names()
    last = max((i for i, s in enumerate(pipeline) if s.phase == phase), default=-1)
    return names.index(step.name) > last
