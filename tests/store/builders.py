"""Event builders for the store tests.

Events are built with the typed classes of ``wrenn_engine.domain.events`` so
that the real fold (``domain.state.evolve``) understands them.
"""

from __future__ import annotations

from typing import Any

from wrenn_engine.domain.events import (
    Metadata,
    NewEvent,
    SandboxCreated,
    StepCompleted,
    StepStarted,
    StepUndone,
    TransitionCompleted,
    TransitionStarted,
)
from wrenn_engine.store import EventStore


def meta(actor: str = "tester", host_id: str = "h1", **extra: Any) -> Metadata:
    return Metadata(actor=actor, host_id=host_id, **extra)


def created(host_id: str = "h1", **config: Any) -> NewEvent:
    return SandboxCreated(
        config={"vcpus": 2, "memory_mb": 512, "template_id": "base", **config},
        host_id=host_id,
    ).to_new()


def started(
    transition: str = "start", from_state: str = "pending", to_state: str = "starting"
) -> NewEvent:
    return TransitionStarted(transition, from_state, to_state, "engine-1").to_new()


def completed(transition: str = "start", to_state: str = "running") -> NewEvent:
    return TransitionCompleted(transition, to_state).to_new()


def _res(resources: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    return [{"kind": kind, "name": name} for kind, name in resources]


def step_started(
    step: str, *resources: tuple[str, str], transition: str = "start"
) -> NewEvent:
    return StepStarted(transition, step, {"resources": _res(resources)}).to_new()


def step_completed(
    step: str,
    *resources: tuple[str, str],
    released: tuple[tuple[str, str], ...] = (),
    transition: str = "start",
) -> NewEvent:
    result: dict[str, Any] = {"resources": _res(resources)}
    if released:
        result["released"] = _res(released)
    return StepCompleted(transition, step, result).to_new()


def step_undone(step: str, transition: str = "start") -> NewEvent:
    return StepUndone(transition, step).to_new()


def new_sandbox(
    store: EventStore, sandbox_id: str, host_id: str = "h1", actor: str = "tester"
) -> None:
    store.append(
        sandbox_id,
        [created(host_id)],
        expected_version=0,
        metadata=meta(actor, host_id),
    )


def take_slot(
    store: EventStore, sandbox_id: str, slot: int, host_id: str = "h1"
) -> None:
    """Create ``sandbox_id`` and run a start whose network step holds ``slot``."""
    new_sandbox(store, sandbox_id, host_id)
    store.append(
        sandbox_id,
        [
            started(),
            step_started(
                "network.prepare", ("slot", str(slot)), ("netns", f"ns-{sandbox_id}")
            ),
            step_completed(
                "network.prepare", ("slot", str(slot)), ("netns", f"ns-{sandbox_id}")
            ),
            completed(),
        ],
        expected_version=1,
        metadata=meta(host_id=host_id),
    )
