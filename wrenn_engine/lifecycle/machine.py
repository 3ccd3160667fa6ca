"""The sandbox state machine, declared as data.

``COMMANDS`` says, for each command, which stable states it may start from,
which transient states (phases) it passes through, where it lands, and what
a failure does. ``TRANSITIONS`` is derived from it in the form the
``transitions`` library takes; ``build_machine`` feeds it to a
``transitions.Machine`` whose hooks run the step pipelines, and
``mermaid()`` draws the same data for the docs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transitions import Machine

from wrenn_engine.domain.state import TRANSIENT_STATES, State


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One command of the state machine.

    ``on_failure`` is ``rollback`` (undo the done steps and go back to the
    state the command started from, when every undo succeeds) or ``error``
    (a command that releases resources cannot be undone; it lands in
    ``error`` and can be retried or destroyed).
    """

    name: str
    sources: tuple[State, ...]
    phases: tuple[State, ...]
    target: State
    on_failure: str
    system: bool = False  # issued by the engine itself, not by a user
    description: str = ""
    #: A step after which a crash is finished rather than undone: what is
    #: left is idempotent releases, and going back would lose more.
    roll_forward_after: str = ""


_NON_TERMINAL = (State.PENDING, State.RUNNING, State.PAUSED, State.STOPPED, State.ERROR)

COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        CommandSpec(
            "start",
            (State.PENDING, State.STOPPED),
            (State.PROVISIONING, State.STARTING),
            State.RUNNING,
            "rollback",
            description="prepare disk and network, launch the VMM, boot the VM",
        ),
        CommandSpec(
            "pause",
            (State.RUNNING,),
            (State.PAUSING,),
            State.PAUSED,
            "rollback",
            description="snapshot the VM and release VMM, network and loop devices",
            roll_forward_after="vm.snapshot",
        ),
        CommandSpec(
            "resume",
            (State.PAUSED,),
            (State.RESUMING,),
            State.RUNNING,
            "rollback",
            description="restore a new VMM from the snapshot on a fresh slot",
            roll_forward_after="vm.resume",
        ),
        CommandSpec(
            "stop",
            (State.RUNNING, State.PAUSED),
            (State.STOPPING,),
            State.STOPPED,
            "error",
            description="shut the VM down and release VMM and network",
        ),
        CommandSpec(
            "halt",
            (State.RUNNING,),
            (State.STOPPING,),
            State.STOPPED,
            "error",
            system=True,
            description="the VMM exited on its own: release what it held",
        ),
        CommandSpec(
            "destroy",
            _NON_TERMINAL,
            (State.DESTROYING,),
            State.DESTROYED,
            "error",
            description="remove everything the sandbox ever held",
        ),
    )
}


def _transitions() -> list[dict[str, Any]]:
    table: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()

    def add(trigger: str, source: str, dest: str, **extra: Any) -> None:
        # Plain strings: transitions would name an Enum member by its name.
        key = (trigger, str(source), str(dest))
        if key not in seen:
            seen.add(key)
            table.append(
                {"trigger": trigger, "source": key[1], "dest": key[2], **extra}
            )

    for spec in COMMANDS.values():
        for source in spec.sources:
            add(spec.name, source, spec.phases[0])
        for here, there in zip(spec.phases, spec.phases[1:], strict=False):
            add("advance", here, there)
        add("complete", spec.phases[-1], spec.target)
        if spec.on_failure == "rollback":
            for phase in spec.phases:
                for source in spec.sources:
                    add("rollback", phase, source, conditions="rolls_back_to")
    for transient in sorted(TRANSIENT_STATES):
        add("fail", transient, State.ERROR)
    return table


#: The machine's transitions, as data (``transitions`` dict form).
TRANSITIONS: list[dict[str, Any]] = _transitions()
STATES: list[str] = [str(s) for s in State]


def build_machine(model: Any, initial: str) -> Machine:
    """A ``transitions.Machine`` over TRANSITIONS driving ``model``.

    The model's ``run_phase`` runs on entering every transient state,
    ``record_change`` before every state change, and ``rolls_back_to`` picks
    the ``rollback`` transition. One machine per command run (it costs about
    0.2 ms): the queued mode lets a hook trigger the next phase without
    nesting, and its queue must not be shared between threads.
    """
    states = [
        {"name": s, "on_enter": "run_phase"}
        if State(s) in TRANSIENT_STATES
        else {"name": s}
        for s in STATES
    ]
    return Machine(
        model=model,
        states=states,
        transitions=TRANSITIONS,
        initial=initial,
        auto_transitions=False,
        send_event=True,
        queued=True,
        before_state_change="record_change",
    )


def allowed_sources(command: str) -> tuple[str, ...]:
    return tuple(str(s) for s in COMMANDS[command].sources)


def mermaid() -> str:
    """The state diagram in Mermaid syntax, drawn from TRANSITIONS."""
    lines = ["stateDiagram-v2"]
    for state in STATES:
        if State(state) in TRANSIENT_STATES:
            lines.append(f"    {state}: {state} (transient)")
    lines.append("    [*] --> pending: create")
    for row in TRANSITIONS:
        lines.append(f"    {row['source']} --> {row['dest']}: {row['trigger']}")
    lines.append("    destroyed --> [*]")
    return "\n".join(lines) + "\n"
