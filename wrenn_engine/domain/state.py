"""A sandbox's state as a pure fold over its events.

``fold(events)`` is the whole of replay: no database, no host, no clock. The
store's sandbox projection is this fold, written to a row in the same
transaction as the events, and ``rebuild`` recomputes it from the log.

An engineer debugging a sandbox can call ``state_at(events, version=N)`` or
``explain(events)`` from a debugger with a list of events from an export.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from wrenn_engine.domain.events import RecordedEvent, resource_key


class State(StrEnum):
    """Every state a sandbox can be in."""

    PENDING = "pending"
    PROVISIONING = "provisioning"
    STARTING = "starting"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    ERROR = "error"


STABLE_STATES = frozenset(
    {
        State.PENDING,
        State.RUNNING,
        State.PAUSED,
        State.STOPPED,
        State.ERROR,
        State.DESTROYED,
    }
)
TRANSIENT_STATES = frozenset(set(State) - STABLE_STATES)
TERMINAL_STATES = frozenset({State.DESTROYED})


@dataclass(slots=True)
class StepRecord:
    """One step of the transition in progress: what it meant to do and did."""

    step: str
    intent: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    status: str = "started"  # started, completed, failed, undone, undo_failed
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "intent": self.intent,
            "result": self.result,
            "status": self.status,
            "error": self.error,
        }


@dataclass(slots=True)
class TransitionRecord:
    """The command in progress (None on the sandbox when it is at rest)."""

    name: str
    from_state: str
    engine: str
    started_version: int
    command_id: str | None = None
    actor: str = "system"
    steps: list[StepRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "from_state": self.from_state,
            "engine": self.engine,
            "started_version": self.started_version,
            "command_id": self.command_id,
            "actor": self.actor,
            "steps": [s.to_dict() for s in self.steps],
        }

    def step(self, name: str) -> StepRecord | None:
        for record in reversed(self.steps):
            if record.step == name:
                return record
        return None


@dataclass(slots=True)
class SandboxState:
    """Everything the log says about one sandbox, at one version."""

    id: str
    state: str = State.PENDING
    version: int = 0
    host_id: str = ""
    requested: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    inactivity_timeout_s: float | None = None
    last_error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    last_activity_at: datetime | None = None
    transition: TransitionRecord | None = None
    #: ``"kind:name"`` -> {"kind", "name", "status", "step"}; status is
    #: ``intended`` (recorded before the effect) or ``created``.
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Runtime facts the steps reported: slot, pid, paths, snapshot, ...
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def is_transient(self) -> bool:
        return self.state in TRANSIENT_STATES

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able picture of the state (projection rows, CLI, replay)."""
        return {
            "id": self.id,
            "state": str(self.state),
            "version": self.version,
            "host_id": self.host_id,
            "requested": self.requested,
            "config": self.config,
            "labels": self.labels,
            "inactivity_timeout_s": self.inactivity_timeout_s,
            "last_error": self.last_error,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "last_activity_at": _iso(self.last_activity_at),
            "transition": self.transition.to_dict() if self.transition else None,
            "resources": self.resources,
            "facts": self.facts,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxState:
        transition = data.get("transition")
        return cls(
            id=data["id"],
            state=data["state"],
            version=data["version"],
            host_id=data.get("host_id", ""),
            requested=data.get("requested") or {},
            config=data.get("config") or {},
            labels=data.get("labels") or {},
            inactivity_timeout_s=data.get("inactivity_timeout_s"),
            last_error=data.get("last_error"),
            created_at=_dt(data.get("created_at")),
            updated_at=_dt(data.get("updated_at")),
            last_activity_at=_dt(data.get("last_activity_at")),
            transition=(
                TransitionRecord(
                    name=transition["name"],
                    from_state=transition["from_state"],
                    engine=transition["engine"],
                    started_version=transition["started_version"],
                    command_id=transition.get("command_id"),
                    actor=transition.get("actor", "system"),
                    steps=[StepRecord(**s) for s in transition.get("steps", [])],
                )
                if transition
                else None
            ),
            resources=data.get("resources") or {},
            facts=data.get("facts") or {},
        )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


# --- the fold -------------------------------------------------------------------

Handler = Callable[[SandboxState, RecordedEvent], None]
_HANDLERS: dict[str, Handler] = {}


def _on(event_type: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[event_type] = fn
        return fn

    return register


def evolve(state: SandboxState | None, event: RecordedEvent) -> SandboxState:
    """Apply one event. Mutates and returns ``state`` (a new one for the first).

    Unknown types are refused by the store's upcasting before they get here;
    an event type that changes nothing in the state has no handler.
    """
    if state is None:
        state = SandboxState(id=event.stream_id)
    handler = _HANDLERS.get(event.type)
    if handler is not None:
        handler(state, event)
    state.version = event.version
    state.updated_at = event.recorded_at
    return state


def fold(
    events: Iterable[RecordedEvent], state: SandboxState | None = None
) -> SandboxState | None:
    """The state after ``events``, starting from ``state`` (which is copied)."""
    if state is not None:
        state = copy.deepcopy(state)
    for event in events:
        state = evolve(state, event)
    return state


def state_at(
    events: Iterable[RecordedEvent],
    version: int | None = None,
    at: datetime | None = None,
) -> SandboxState | None:
    """The state after the last event at or before ``version`` / ``at``."""
    chosen = (
        e
        for e in events
        if (version is None or e.version <= version)
        and (at is None or e.recorded_at <= at)
    )
    return fold(chosen)


def explain(
    events: Iterable[RecordedEvent],
) -> list[tuple[RecordedEvent, SandboxState]]:
    """Each event with a copy of the state it produced (for ``replay --explain``)."""
    steps: list[tuple[RecordedEvent, SandboxState]] = []
    state: SandboxState | None = None
    for event in events:
        state = evolve(state, event)
        steps.append((event, copy.deepcopy(state)))
    return steps


# --- handlers -------------------------------------------------------------------


@_on("sandbox.created")
def _created(s: SandboxState, e: RecordedEvent) -> None:
    d = e.data
    s.state = State.PENDING
    s.host_id = d["host_id"]
    s.requested = dict(d["config"])
    s.config = dict(d["config"])
    s.labels = dict(d.get("labels") or {})
    s.inactivity_timeout_s = d.get("inactivity_timeout_s")
    s.created_at = e.recorded_at
    s.last_activity_at = e.recorded_at


@_on("config.defaults_applied")
def _defaults(s: SandboxState, e: RecordedEvent) -> None:
    s.config = {**s.config, **e.data["filled"]}


@_on("config.validated")
def _validated(s: SandboxState, e: RecordedEvent) -> None:
    s.config = dict(e.data["config"])


@_on("transition.started")
def _t_started(s: SandboxState, e: RecordedEvent) -> None:
    d = e.data
    s.transition = TransitionRecord(
        name=d["transition"],
        from_state=d["from_state"],
        engine=d["engine"],
        started_version=e.version,
        command_id=e.metadata.command_id,
        actor=e.metadata.actor,
    )
    s.state = d["to_state"]
    s.last_error = None
    s.last_activity_at = e.recorded_at


@_on("transition.advanced")
def _t_advanced(s: SandboxState, e: RecordedEvent) -> None:
    s.state = e.data["to_state"]


@_on("transition.completed")
def _t_completed(s: SandboxState, e: RecordedEvent) -> None:
    s.state = e.data["to_state"]
    s.transition = None
    s.last_activity_at = e.recorded_at


@_on("transition.rolled_back")
@_on("transition.failed")
def _t_ended_badly(s: SandboxState, e: RecordedEvent) -> None:
    s.state = e.data["to_state"]
    step, error = e.data["step"], e.data["error"]
    s.last_error = f"{step}: {error}" if step else error
    s.transition = None


@_on("step.started")
def _s_started(s: SandboxState, e: RecordedEvent) -> None:
    step, intent = e.data["step"], e.data.get("intent") or {}
    if s.transition is not None:
        s.transition.steps.append(StepRecord(step=step, intent=intent))
    for res in intent.get("resources", ()):
        key = resource_key(res["kind"], str(res["name"]))
        if key not in s.resources:
            s.resources[key] = {
                "kind": res["kind"],
                "name": str(res["name"]),
                "status": "intended",
                "step": step,
            }


@_on("step.completed")
def _s_completed(s: SandboxState, e: RecordedEvent) -> None:
    step, result = e.data["step"], e.data.get("result") or {}
    record = s.transition.step(step) if s.transition else None
    if record is not None:
        record.result = result
        record.status = "completed"
    for res in result.get("resources", ()):
        key = resource_key(res["kind"], str(res["name"]))
        s.resources[key] = {
            "kind": res["kind"],
            "name": str(res["name"]),
            "status": "created",
            "step": step,
        }
    for res in result.get("released", ()):
        s.resources.pop(resource_key(res["kind"], str(res["name"])), None)
    # Intended resources the step did not end up creating are not held.
    if record is not None:
        for res in record.intent.get("resources", ()):
            key = resource_key(res["kind"], str(res["name"]))
            if s.resources.get(key, {}).get("status") == "intended":
                del s.resources[key]
    for name, value in (result.get("facts") or {}).items():
        if value is None:
            s.facts.pop(name, None)
        else:
            s.facts[name] = value


@_on("step.failed")
def _s_failed(s: SandboxState, e: RecordedEvent) -> None:
    record = s.transition.step(e.data["step"]) if s.transition else None
    if record is not None:
        record.status = "failed"
        record.error = e.data["error"]


@_on("step.undone")
def _s_undone(s: SandboxState, e: RecordedEvent) -> None:
    record = s.transition.step(e.data["step"]) if s.transition else None
    if record is None:
        return
    record.status = "undone"
    for part in (record.intent, record.result or {}):
        for res in part.get("resources", ()):
            s.resources.pop(resource_key(res["kind"], str(res["name"])), None)
    for name in (record.result or {}).get("facts") or {}:
        s.facts.pop(name, None)


@_on("step.undo_failed")
def _s_undo_failed(s: SandboxState, e: RecordedEvent) -> None:
    record = s.transition.step(e.data["step"]) if s.transition else None
    if record is not None:
        record.status = "undo_failed"
        record.error = e.data["error"]


@_on("vmm.exited")
def _vmm_exited(s: SandboxState, e: RecordedEvent) -> None:
    s.facts["exit_reason"] = e.data["reason"]
    pid = e.data.get("pid")
    if pid is not None:
        s.resources.pop(resource_key("vmm", str(pid)), None)


@_on("reconcile.acted")
def _reconciled(s: SandboxState, e: RecordedEvent) -> None:
    d = e.data
    if d["action"] in ("removed", "killed", "forgotten") and d.get("kind"):
        s.resources.pop(resource_key(d["kind"], d["name"]), None)
    elif d["action"] == "adopted" and d.get("kind"):
        key = resource_key(d["kind"], d["name"])
        if key in s.resources:
            s.resources[key]["status"] = "created"


@_on("sandbox.activity_recorded")
def _activity(s: SandboxState, e: RecordedEvent) -> None:
    s.last_activity_at = e.recorded_at
