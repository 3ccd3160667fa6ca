"""The ``eventsourcing`` library's side of the baselines.

``EsSandbox`` is an eventsourcing aggregate whose events carry exactly what
the engine's events carry (type, data, metadata) and whose ``apply`` calls
the engine's own ``evolve``: the per-event domain work is identical on both
sides, so the comparison measures the machinery around it (reading,
decoding, mutating) and nothing else. The attributes ``version``,
``recorded_at``, ``metadata`` and ``stream_id`` make an eventsourcing event
look like a RecordedEvent to ``evolve``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate

from wrenn_engine.domain.events import Metadata
from wrenn_engine.domain.state import SandboxState, evolve


class _Shape:
    """What ``evolve`` reads from an event, mapped onto eventsourcing's names."""

    originator_id: Any
    originator_version: int
    timestamp: datetime
    actor: str
    host_id: str | None
    command_id: str | None
    correlation_id: str | None
    causation_id: str | None

    @property
    def version(self) -> int:
        return self.originator_version

    @property
    def recorded_at(self) -> datetime:
        return self.timestamp

    @property
    def stream_id(self) -> str:
        return str(self.originator_id)

    @property
    def metadata(self) -> Metadata:
        return Metadata(actor=self.actor, correlation_id=self.correlation_id,
                        causation_id=self.causation_id, command_id=self.command_id,
                        host_id=self.host_id)


class EsSandbox(Aggregate):
    """A sandbox as an eventsourcing aggregate, folded by the engine's evolve."""

    def __init__(self) -> None:
        self.state = SandboxState(id="")

    class Created(_Shape, Aggregate.Created):
        type: str
        data: dict[str, Any]
        actor: str
        host_id: str | None
        command_id: str | None
        correlation_id: str | None
        causation_id: str | None

        def apply(self, aggregate: Any) -> None:
            aggregate.state.id = str(self.originator_id)
            evolve(aggregate.state, self)  # type: ignore[arg-type]

    class Happened(_Shape, Aggregate.Event):
        type: str
        data: dict[str, Any]
        actor: str
        host_id: str | None
        command_id: str | None
        correlation_id: str | None
        causation_id: str | None

        def apply(self, aggregate: Any) -> None:
            evolve(aggregate.state, self)  # type: ignore[arg-type]


def event_state(type_: str, data: dict[str, Any], metadata: Metadata,
                timestamp: datetime, *, first: bool) -> dict[str, Any]:
    """The state eventsourcing's mapper stores for one event (without the id
    and version, which it keeps in their own columns)."""
    state: dict[str, Any] = {
        "timestamp": timestamp,
        "type": type_,
        "data": data,
        "actor": metadata.actor,
        "host_id": metadata.host_id,
        "command_id": metadata.command_id,
        "correlation_id": metadata.correlation_id,
        "causation_id": metadata.causation_id,
    }
    if first:
        state["originator_topic"] = f"{EsSandbox.__module__}:{EsSandbox.__qualname__}"
    return state


def event_topic(first: bool) -> str:
    cls = EsSandbox.Created if first else EsSandbox.Happened
    return f"{cls.__module__}:{cls.__qualname__}"
