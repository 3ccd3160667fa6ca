"""Named steps and the pipelines that order them.

A step has a stable dotted name (``network.prepare``), the transient state
(phase) it runs in, and up to three functions:

- ``plan(ctx) -> intent``: pure, computed before the effect; the intent is
  appended (``step.started``) before the host is touched. Resources the step
  may create go in ``intent["resources"]`` as ``{"kind", "name"}``.
- ``run(ctx, intent) -> result``: the effect. ``result`` may list
  ``resources`` created, ``released`` resources and ``facts`` to keep.
- ``undo(ctx, intent, result)``: removes what ``run`` created. It must be
  idempotent and work from the intent alone (``result`` is None when the step
  failed or crashed part-way), because it is also how a failed step's partial
  work and a crashed step's leftovers are removed.

A step without ``undo`` cannot be taken back; a command whose failure policy
is ``rollback`` lands in ``error`` instead when such a step had completed.

An embedding control plane edits the pipelines through ``Pipelines``:
``names``, ``insert_after``, ``insert_before``, ``replace``, ``remove``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from wrenn_engine.domain.config import VMConfig
from wrenn_engine.domain.state import SandboxState
from wrenn_engine.errors import PipelineError

if TYPE_CHECKING:
    from wrenn_engine.host.base import HostDrivers
    from wrenn_engine.lifecycle.settings import LifecycleSettings

Intent = dict[str, Any]
Result = dict[str, Any]


@dataclass(slots=True)
class StepContext:
    """What a step may look at and use. One per command run."""

    sandbox: SandboxState
    drivers: HostDrivers
    settings: LifecycleSettings
    command: str
    actor: str
    log: logging.LoggerAdapter[logging.Logger]
    #: Slots refused during this run (taken meanwhile, or links still exist).
    refused_slots: set[int] = field(default_factory=set)
    #: Returns the lowest network slot that is free in the log and on the host.
    free_slot: Callable[[], int] = field(default=lambda: 1)
    #: Removes one recorded resource by kind and name (idempotent).
    remove_resource: Callable[[str, str], None] = field(default=lambda k, n: None)
    #: Extra inputs a command carries (e.g. the exit reason for ``halt``).
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> VMConfig:
        return VMConfig.from_dict(self.sandbox.config)

    @property
    def facts(self) -> dict[str, Any]:
        return self.sandbox.facts


PlanFn = Callable[[StepContext], Intent]
RunFn = Callable[[StepContext, Intent], Result | None]
UndoFn = Callable[[StepContext, Intent, Result | None], None]


@dataclass(frozen=True, slots=True)
class Step:
    """One named, ordered piece of work in a pipeline."""

    name: str
    run: RunFn
    undo: UndoFn | None = None
    plan: PlanFn | None = None
    phase: str = ""
    description: str = ""


class Pipeline:
    """The ordered steps of one command."""

    def __init__(self, command: str, steps: list[Step]):
        self.command = command
        self._steps = list(steps)
        self._check()

    def __iter__(self) -> Iterator[Step]:
        return iter(list(self._steps))

    def __len__(self) -> int:
        return len(self._steps)

    def names(self) -> list[str]:
        return [s.name for s in self._steps]

    def get(self, name: str) -> Step:
        return self._steps[self._index(name)]

    def insert_after(self, name: str, step: Step) -> None:
        """Add ``step`` after ``name``, in the same phase unless it names one."""
        index = self._index(name)
        anchor = self._steps[index]
        self._steps.insert(index + 1, replace(step, phase=step.phase or anchor.phase))
        self._check()

    def insert_before(self, name: str, step: Step) -> None:
        index = self._index(name)
        anchor = self._steps[index]
        self._steps.insert(index, replace(step, phase=step.phase or anchor.phase))
        self._check()

    def append(self, step: Step) -> None:
        phase = step.phase or (self._steps[-1].phase if self._steps else "")
        self._steps.append(replace(step, phase=phase))
        self._check()

    def replace(self, name: str, step: Step) -> None:
        index = self._index(name)
        self._steps[index] = replace(step, phase=step.phase or self._steps[index].phase)
        self._check()

    def remove(self, name: str) -> None:
        del self._steps[self._index(name)]

    def _index(self, name: str) -> int:
        for index, step in enumerate(self._steps):
            if step.name == name:
                return index
        raise PipelineError(
            self.command, f"has no step {name!r}; its steps are {self.names()}"
        )

    def _check(self) -> None:
        names = self.names()
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise PipelineError(
                self.command, f"step names repeat: {sorted(duplicates)}"
            )
        for step in self._steps:
            if not step.name or step.name.endswith(".done"):
                raise PipelineError(
                    self.command,
                    f"step name {step.name!r} is empty or ends in '.done' (reserved "
                    "for failpoints)",
                )


class Pipelines:
    """Every command's pipeline, by command name."""

    def __init__(self, pipelines: dict[str, Pipeline]):
        self._pipelines = pipelines

    def __getitem__(self, command: str) -> Pipeline:
        try:
            return self._pipelines[command]
        except KeyError:
            raise PipelineError(
                command, f"no such command; commands are {sorted(self._pipelines)}"
            ) from None

    def commands(self) -> list[str]:
        return list(self._pipelines)

    def step_names(self) -> list[str]:
        """Every step name of every pipeline, each once, in pipeline order."""
        seen: dict[str, None] = {}
        for pipeline in self._pipelines.values():
            for name in pipeline.names():
                seen.setdefault(name)
        return list(seen)
