"""The event store contract.

One append-only table of events, a global position that is the order of
truth, one stream per sandbox. Projections (the sandbox row, network slots,
held resources) are written in the same transaction as the events they come
from, by folding the events with ``wrenn_engine.domain.state.evolve``; they
can be rebuilt from the events alone and verified against a rebuild.

``SqlEventStore`` implements this contract for SQLite and PostgreSQL; the
contract test suite runs against both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from wrenn_engine.domain.events import Metadata, NewEvent, RecordedEvent
from wrenn_engine.domain.state import SandboxState


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append did. ``replayed`` means the command id had already been
    applied: nothing was appended and the fields describe the earlier append."""

    stream_id: str
    version: int
    first_position: int
    last_position: int
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """A command id the store has seen, and the append it produced."""

    command_id: str
    stream_id: str
    command: str
    first_position: int
    last_position: int
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Audit filters; every given filter must match. Ordered by position."""

    sandbox_ids: Sequence[str] = ()
    types: Sequence[str] = ()
    actors: Sequence[str] = ()
    host_ids: Sequence[str] = ()
    since: datetime | None = None  # inclusive, timezone-aware
    until: datetime | None = None  # exclusive, timezone-aware
    after_position: int = 0  # keyset pagination: last position already seen
    limit: int = 100


@dataclass(frozen=True, slots=True)
class HeldResource:
    """A host resource the log says a sandbox holds (or intended to create)."""

    sandbox_id: str
    host_id: str
    kind: str
    name: str
    status: str  # "intended" or "created"


@dataclass(frozen=True, slots=True)
class ProjectionDifference:
    """One disagreement between a stored projection and a rebuild."""

    table: str
    key: str
    stored: Any
    rebuilt: Any

    def __str__(self) -> str:
        return (
            f"{self.table}[{self.key}]: stored {self.stored!r}, "
            f"rebuilt {self.rebuilt!r}"
        )


@dataclass(frozen=True, slots=True)
class StoreStats:
    events: int
    streams: int
    last_position: int
    extra: dict[str, Any] = field(default_factory=dict)


class EventStore(ABC):
    """Append-only event streams with projections kept in step."""

    url: str

    @abstractmethod
    def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        *,
        expected_version: int,
        metadata: Metadata,
        command_id: str | None = None,
        command: str = "",
    ) -> AppendResult:
        """Append ``events`` atomically after ``expected_version``.

        ``expected_version`` is the stream's current version (0 for a new
        stream). A mismatch raises ConcurrencyError with the expected and the
        actual version. When ``command_id`` is given and was already applied,
        nothing is appended and the earlier AppendResult comes back with
        ``replayed=True``; if it was applied to another stream or command,
        IdempotencyError. ``metadata.command_id`` is stored on every event.
        Projections are updated in the same transaction; a network slot held
        by another sandbox raises SlotTaken and nothing is appended.
        """

    @abstractmethod
    def read_stream(
        self,
        stream_id: str,
        *,
        to_version: int | None = None,
        at: datetime | None = None,
    ) -> list[RecordedEvent]:
        """One stream in version order, optionally up to a version or a time."""

    @abstractmethod
    def read_all(
        self,
        *,
        after_position: int = 0,
        limit: int | None = None,
        batch_size: int = 1000,
    ) -> Iterator[RecordedEvent]:
        """The global sequence after ``after_position``, in position order."""

    @abstractmethod
    def query(self, query: EventQuery) -> list[RecordedEvent]:
        """Audit query: filters, then keyset pagination by position."""

    @abstractmethod
    def last_position(self) -> int:
        """The highest committed position (0 when empty)."""

    @abstractmethod
    def wait_for_events(self, after_position: int, timeout: float) -> bool:
        """Block until an event after ``after_position`` is committed or
        ``timeout`` passes; True if there is one. PostgreSQL uses
        LISTEN/NOTIFY, SQLite polls."""

    @abstractmethod
    def get_sandbox(self, sandbox_id: str) -> SandboxState | None:
        """The projected state of one sandbox (None if unknown)."""

    @abstractmethod
    def list_sandboxes(
        self,
        *,
        states: Sequence[str] = (),
        host_id: str | None = None,
    ) -> list[SandboxState]:
        """Projected sandboxes, oldest first, optionally filtered."""

    @abstractmethod
    def network_slots(self, host_id: str) -> dict[int, str]:
        """Slots held on ``host_id``: slot -> sandbox id."""

    @abstractmethod
    def held_resources(self, host_id: str | None = None) -> list[HeldResource]:
        """Every resource the log says is held (intended or created)."""

    @abstractmethod
    def command(self, command_id: str) -> CommandRecord | None:
        """The record of a command id, if it was applied."""

    @abstractmethod
    def rebuild_projections(self) -> int:
        """Recompute every projection from the events; return events folded."""

    @abstractmethod
    def verify_projections(self) -> list[ProjectionDifference]:
        """Fold the events afresh and list every difference from what is stored."""

    @abstractmethod
    def stats(self) -> StoreStats: ...

    @abstractmethod
    def close(self) -> None: ...
