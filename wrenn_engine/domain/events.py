"""The events of a sandbox's history: their envelope and their typed shapes.

An event type is a stable dotted string (``step.completed``), never a module
path, so events outlive refactors. Each type has a dataclass that documents
its fields; the docs' event catalogue is generated from these classes.
Events are stored with a schema version; when a shape changes, bump
``schema_version`` on the class and register an upcaster in
``wrenn_engine.domain.upcasting`` that lifts the old shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, TypeVar

# --- envelope -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Metadata:
    """Who did it and why: stored beside every event."""

    actor: str = "system"
    correlation_id: str | None = None
    causation_id: str | None = None
    command_id: str | None = None
    host_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "command_id": self.command_id,
            "host_id": self.host_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metadata:
        return cls(
            actor=data.get("actor") or "system",
            correlation_id=data.get("correlation_id"),
            causation_id=data.get("causation_id"),
            command_id=data.get("command_id"),
            host_id=data.get("host_id"),
        )


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event about to be appended: no position, version or time yet."""

    type: str
    data: dict[str, Any]
    schema_version: int = 1


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored: its place in the global order and in its stream."""

    position: int
    stream_id: str
    version: int
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: Metadata
    recorded_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON shape of an event (CLI ``--json``, exports)."""
        return {
            "position": self.position,
            "sandbox_id": self.stream_id,
            "version": self.version,
            "type": self.type,
            "schema_version": self.schema_version,
            "recorded_at": self.recorded_at.isoformat(),
            "actor": self.metadata.actor,
            "data": self.data,
            "metadata": self.metadata.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecordedEvent:
        return cls(
            position=int(data["position"]),
            stream_id=str(data["sandbox_id"]),
            version=int(data["version"]),
            type=str(data["type"]),
            schema_version=int(data["schema_version"]),
            data=dict(data["data"]),
            metadata=Metadata.from_dict(data.get("metadata") or {}),
            recorded_at=datetime.fromisoformat(data["recorded_at"]),
        )


# --- typed shapes -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """Base of the typed event shapes."""

    type: ClassVar[str] = ""
    schema_version: ClassVar[int] = 1

    def to_new(self) -> NewEvent:
        return NewEvent(self.type, dataclasses.asdict(self), self.schema_version)


E = TypeVar("E", bound=Event)

#: Every known event type, by its stable name.
EVENT_TYPES: dict[str, type[Event]] = {}


def event_type(cls: type[E]) -> type[E]:
    """Class decorator: register an event shape under its stable name."""
    if not cls.type or cls.type in EVENT_TYPES:
        raise ValueError(f"event type {cls.type!r} is empty or registered twice")
    EVENT_TYPES[cls.type] = cls
    return cls


def decode(event: RecordedEvent, cls: type[E]) -> E:
    """The typed shape of a recorded event (its data already upcast)."""
    return cls(**event.data)


@event_type
@dataclass(frozen=True, slots=True)
class SandboxCreated(Event):
    """A sandbox was created: the config as requested and who owns it."""

    type: ClassVar[str] = "sandbox.created"
    config: dict[str, Any]
    host_id: str
    inactivity_timeout_s: float | None = None
    labels: dict[str, str] = field(default_factory=dict)


@event_type
@dataclass(frozen=True, slots=True)
class ConfigDefaultsApplied(Event):
    """Step ``config.apply_defaults``: the fields it filled and their values."""

    type: ClassVar[str] = "config.defaults_applied"
    filled: dict[str, Any]


@event_type
@dataclass(frozen=True, slots=True)
class ConfigValidated(Event):
    """Step ``config.validate``: the effective config the VMM will be given."""

    type: ClassVar[str] = "config.validated"
    config: dict[str, Any]


@event_type
@dataclass(frozen=True, slots=True)
class TransitionStarted(Event):
    """A command began: the sandbox enters a transient state.

    ``engine`` names the engine instance (host, pid, start time) that drives
    it, so reconcile can tell a live transition from an interrupted one.
    """

    type: ClassVar[str] = "transition.started"
    transition: str
    from_state: str
    to_state: str
    engine: str


@event_type
@dataclass(frozen=True, slots=True)
class TransitionAdvanced(Event):
    """A multi-phase command moved to its next transient state."""

    type: ClassVar[str] = "transition.advanced"
    transition: str
    to_state: str


@event_type
@dataclass(frozen=True, slots=True)
class TransitionCompleted(Event):
    """A command finished: the sandbox is in its target state."""

    type: ClassVar[str] = "transition.completed"
    transition: str
    to_state: str


@event_type
@dataclass(frozen=True, slots=True)
class TransitionRolledBack(Event):
    """A step failed, every done step was undone; back where it started."""

    type: ClassVar[str] = "transition.rolled_back"
    transition: str
    to_state: str
    step: str
    error: str


@event_type
@dataclass(frozen=True, slots=True)
class TransitionFailed(Event):
    """A command could not finish nor be fully undone; the sandbox is ``error``."""

    type: ClassVar[str] = "transition.failed"
    transition: str
    to_state: str
    step: str
    error: str


@event_type
@dataclass(frozen=True, slots=True)
class StepStarted(Event):
    """A step is about to touch the host; ``intent`` lists what it will create.

    ``intent["resources"]`` is a list of ``{"kind", "name"}``: recorded before
    the effect so a crash cannot forget them.
    """

    type: ClassVar[str] = "step.started"
    transition: str
    step: str
    intent: dict[str, Any] = field(default_factory=dict)


@event_type
@dataclass(frozen=True, slots=True)
class StepCompleted(Event):
    """A step's effect is done. ``result`` holds what it produced.

    ``result["resources"]``: resources now created; ``result["released"]``:
    resources this step removed; ``result["facts"]``: runtime facts the
    sandbox keeps (slot, pid, paths); a fact set to None is forgotten.
    """

    type: ClassVar[str] = "step.completed"
    transition: str
    step: str
    result: dict[str, Any] = field(default_factory=dict)


@event_type
@dataclass(frozen=True, slots=True)
class StepFailed(Event):
    """A step raised; ``error`` is the message with its cause chain."""

    type: ClassVar[str] = "step.failed"
    transition: str
    step: str
    error: str
    error_type: str = ""


@event_type
@dataclass(frozen=True, slots=True)
class StepUndone(Event):
    """The undo of a step ran; what the step created is gone."""

    type: ClassVar[str] = "step.undone"
    transition: str
    step: str


@event_type
@dataclass(frozen=True, slots=True)
class StepUndoFailed(Event):
    """The undo of a step raised; its resources are still recorded as held."""

    type: ClassVar[str] = "step.undo_failed"
    transition: str
    step: str
    error: str


@event_type
@dataclass(frozen=True, slots=True)
class VmmEventObserved(Event):
    """A line from the VMM's event monitor that the engine acts on or keeps."""

    type: ClassVar[str] = "vmm.event_observed"
    source: str
    event: str
    properties: dict[str, Any] = field(default_factory=dict)
    #: The VMM's own clock: seconds since it started.
    vmm_time_s: float = 0.0
    #: The VMM process that wrote it and the byte offset after the line, so
    #: an engine that restarts resumes reading where the log says it stopped.
    pid: int | None = None
    offset: int = 0


@event_type
@dataclass(frozen=True, slots=True)
class VmmExited(Event):
    """The VMM process exited, or the guest shut down or panicked, on its own.

    ``reason`` is one of ``guest-shutdown``, ``guest-panic``, ``vmm-exited``.
    """

    type: ClassVar[str] = "vmm.exited"
    reason: str
    pid: int | None = None
    exit_code: int | None = None
    detail: str = ""


@event_type
@dataclass(frozen=True, slots=True)
class ReconcileActed(Event):
    """Reconcile changed something to bring host and log into agreement.

    ``action`` is e.g. ``removed``, ``adopted``, ``killed``, ``finished``,
    ``interrupted``.
    """

    type: ClassVar[str] = "reconcile.acted"
    action: str
    kind: str = ""
    name: str = ""
    detail: str = ""


@event_type
@dataclass(frozen=True, slots=True)
class ActivityRecorded(Event):
    """The sandbox was used (resets its inactivity timer)."""

    type: ClassVar[str] = "sandbox.activity_recorded"
    detail: str = ""


# --- resources ----------------------------------------------------------------

#: Kinds of host resources a step may record, with what ``name`` holds.
RESOURCE_KINDS: dict[str, str] = {
    "slot": "network slot number, unique per host",
    "netns": "network namespace name",
    "veth": "host-side veth interface name (its peer goes with it)",
    "nft_table": "nftables table name (family inet) in the host namespace",
    "dir": "sandbox directory path",
    "cow": "copy-on-write disk file path",
    "loop": "loop device path (template or CoW)",
    "dm": "device-mapper device name",
    "vmm": "VMM process id",
    "socket": "VMM API socket path",
    "snapshot": "snapshot directory path",
}


def resource_key(kind: str, name: str) -> str:
    return f"{kind}:{name}"


# --- streams ----------------------------------------------------------------------

#: Streams that are not sandboxes: a host's own record (reconcile actions on
#: objects no sandbox holds). "." is outside the sandbox id alphabet, so a
#: host stream can never collide with a sandbox.
HOST_STREAM_PREFIX = "host."


def host_stream(host_id: str) -> str:
    return f"{HOST_STREAM_PREFIX}{host_id}"


def is_sandbox_stream(stream_id: str) -> bool:
    return not stream_id.startswith(HOST_STREAM_PREFIX)
