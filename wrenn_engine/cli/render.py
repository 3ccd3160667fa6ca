"""How sandboxes and events read in a terminal, and what a replay explains.

The JSON shapes are the domain's own (``SandboxState.to_dict``,
``RecordedEvent.to_dict``); this module only makes the human-readable form.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from wrenn_engine.cli.common import dumps, table, utc_text
from wrenn_engine.domain.events import RecordedEvent
from wrenn_engine.domain.state import SandboxState

# --- events ---------------------------------------------------------------------------


def _resources(items: Iterable[dict[str, Any]]) -> str:
    return ", ".join(f"{r['kind']}:{r['name']}" for r in items)


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary(event: RecordedEvent) -> str:
    """One line saying what an event records, for tables and explanations."""
    d = event.data
    kind = event.type
    where = f"{d.get('transition', '?')}/{d.get('step', '?')}"
    if kind == "sandbox.created":
        config = d.get("config") or {}
        parts = [f"host={d.get('host_id')}"]
        for name in ("vcpus", "memory_mb"):
            if config.get(name):
                parts.append(f"{name}={config[name]}")
        if d.get("inactivity_timeout_s"):
            parts.append(f"timeout={d['inactivity_timeout_s']:g}s")
        return " ".join(parts)
    if kind == "config.defaults_applied":
        filled = sorted((d.get("filled") or {}).keys())
        return "filled " + (", ".join(filled) if filled else "nothing")
    if kind == "config.validated":
        config = d.get("config") or {}
        return (
            f"vcpus={config.get('vcpus')} memory_mb={config.get('memory_mb')} "
            f"vmm={config.get('vmm_bin')}"
        )
    if kind == "transition.started":
        return f"{d['transition']}: {d['from_state']} -> {d['to_state']}"
    if kind in ("transition.advanced", "transition.completed"):
        return f"{d['transition']}: -> {d['to_state']}"
    if kind == "transition.rolled_back":
        return (
            f"{d['transition']}: back to {d['to_state']} after {d['step']} "
            f"failed: {d['error']}"
        )
    if kind == "transition.failed":
        return (
            f"{d['transition']}: -> {d['to_state']}, {d['step']} failed: {d['error']}"
        )
    if kind == "step.started":
        intended = (d.get("intent") or {}).get("resources") or []
        return where + (f" intends {_resources(intended)}" if intended else "")
    if kind == "step.completed":
        result = d.get("result") or {}
        parts = [where]
        if result.get("skipped"):
            parts.append(f"skipped ({result['skipped']})")
        if result.get("resources"):
            parts.append(f"holds {_resources(result['resources'])}")
        if result.get("released"):
            parts.append(f"released {_resources(result['released'])}")
        return " ".join(parts)
    if kind == "step.failed":
        return f"{where} failed: {d.get('error')}"
    if kind == "step.undone":
        return f"{where} undone"
    if kind == "step.undo_failed":
        return f"{where} undo failed: {d.get('error')}"
    if kind == "vmm.event_observed":
        return f"{d.get('source')}/{d.get('event')}"
    if kind == "vmm.exited":
        code = d.get("exit_code")
        extra = f" exit={code}" if code is not None else ""
        detail = d.get("detail") or ""
        return f"{d.get('reason')} pid={d.get('pid')}{extra} {detail}".strip()
    if kind == "reconcile.acted":
        thing = f" {d['kind']}:{d['name']}" if d.get("kind") else ""
        detail = f" ({d['detail']})" if d.get("detail") else ""
        return f"{d.get('action')}{thing}{detail}"
    if kind == "sandbox.activity_recorded":
        return str(d.get("detail") or "")
    return _short(d)


EVENT_HEADERS = ("POS", "TIME (UTC)", "SANDBOX", "VER", "TYPE", "ACTOR", "WHAT")


def event_row(event: RecordedEvent) -> list[Any]:
    return [
        event.position,
        utc_text(event.recorded_at),
        event.stream_id,
        event.version,
        event.type,
        event.metadata.actor,
        summary(event),
    ]


def event_table(events: Sequence[RecordedEvent]) -> list[str]:
    return table(EVENT_HEADERS, [event_row(e) for e in events], right=(0, 3))


# --- sandboxes ------------------------------------------------------------------------

SANDBOX_HEADERS = (
    "ID",
    "STATE",
    "VER",
    "HOST",
    "VCPUS",
    "MEM MB",
    "CREATED (UTC)",
    "LAST ERROR",
)


def sandbox_row(sandbox: SandboxState) -> list[Any]:
    config = sandbox.config
    return [
        sandbox.id,
        sandbox.state,
        sandbox.version,
        sandbox.host_id,
        config.get("vcpus") or "-",
        config.get("memory_mb") or "-",
        utc_text(sandbox.created_at),
        _short(sandbox.last_error or "", 60),
    ]


def sandbox_table(sandboxes: Sequence[SandboxState]) -> list[str]:
    return table(SANDBOX_HEADERS, [sandbox_row(s) for s in sandboxes], right=(2, 4, 5))


def sandbox_details(sandbox: SandboxState) -> list[str]:
    """``show``: the state, the config that matters, work in progress, holdings."""
    config = sandbox.config
    timeout = sandbox.inactivity_timeout_s
    pairs: list[tuple[str, Any]] = [
        ("id", sandbox.id),
        ("state", sandbox.state),
        ("version", sandbox.version),
        ("host", sandbox.host_id),
        ("created", utc_text(sandbox.created_at)),
        ("updated", utc_text(sandbox.updated_at)),
        ("last activity", utc_text(sandbox.last_activity_at)),
        ("inactivity timeout", f"{timeout:g}s" if timeout else "none"),
        ("last error", sandbox.last_error or "none"),
        ("vcpus", config.get("vcpus")),
        ("memory", f"{config.get('memory_mb')} MB"),
        ("kernel", config.get("kernel_path")),
        ("rootfs", config.get("rootfs_path")),
        ("vmm", config.get("vmm_bin")),
        ("netns", config.get("network_namespace")),
        ("socket", config.get("socket_path")),
        ("directory", config.get("sandbox_dir")),
    ]
    if sandbox.labels:
        pairs.append(
            ("labels", ", ".join(f"{k}={v}" for k, v in sorted(sandbox.labels.items())))
        )
    width = max(len(k) for k, _ in pairs) + 1
    lines = [f"{(k + ':').ljust(width)} {v}" for k, v in pairs]

    transition = sandbox.transition
    if transition is not None:
        lines.append("")
        lines.append(
            f"in progress: {transition.name} from {transition.from_state} "
            f"(since version {transition.started_version}, by "
            f"{transition.actor}, engine {transition.engine})"
        )
        for record in transition.steps:
            error = f": {record.error}" if record.error else ""
            lines.append(f"  {record.step:<20} {record.status}{error}")

    lines.append("")
    if sandbox.resources:
        lines.append("holds:")
        for res in sorted(
            sandbox.resources.values(), key=lambda r: (r["kind"], r["name"])
        ):
            lines.append(
                f"  {res['kind']:<10} {res['name']}  ({res['status']}, "
                f"{res.get('step', '?')})"
            )
    else:
        lines.append("holds: nothing")
    if sandbox.facts:
        lines.append("facts:")
        for name in sorted(sandbox.facts):
            lines.append(f"  {name}: {_short(sandbox.facts[name], 100)}")
    return lines


# --- diff -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One field path whose value differs between two states."""

    path: str
    old: Any
    new: Any
    old_present: bool = True
    new_present: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "old": self.old if self.old_present else None,
            "new": self.new if self.new_present else None,
            "change": (
                "added"
                if not self.old_present
                else "removed"
                if not self.new_present
                else "changed"
            ),
        }

    def __str__(self) -> str:
        old = dumps(self.old) if self.old_present else "(absent)"
        new = dumps(self.new) if self.new_present else "(absent)"
        return f"{self.path}: {old} -> {new}"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values by path: ``config.vcpus``, ``transition.steps[0].status``."""
    leaves: dict[str, Any] = {}
    if isinstance(value, dict) and value:
        for key in value:
            path = f"{prefix}.{key}" if prefix else str(key)
            leaves.update(flatten(value[key], path))
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            leaves.update(flatten(item, f"{prefix}[{index}]"))
    else:
        leaves[prefix] = value
    return leaves


def diff_states(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every leaf path whose value differs, in path order.

    An empty container (or None) that gained or lost its contents is not
    listed itself: its leaves are.
    """
    before, after = flatten(old), flatten(new)
    paths = before.keys() | after.keys()
    changes = []
    for path in sorted(paths):
        if path in before and path in after:
            if before[path] != after[path]:
                changes.append(Change(path, before[path], after[path]))
        elif _emptied_container(path, before if path in before else after, paths):
            continue
        elif path in before:
            changes.append(Change(path, before[path], None, new_present=False))
        else:
            changes.append(Change(path, None, after[path], old_present=False))
    return changes


def _emptied_container(path: str, side: dict[str, Any], paths: set[str]) -> bool:
    if side[path] not in ({}, [], None):
        return False
    if path == "":  # the whole state: its fields speak for it
        return any(p != "" for p in paths)
    return any(p.startswith((f"{path}.", f"{path}[")) for p in paths)


# --- explain --------------------------------------------------------------------------


def explain_lines(steps: Sequence[tuple[RecordedEvent, SandboxState]]) -> list[str]:
    """Each event, what it changed in the state and where the sandbox stood."""
    rows: list[list[Any]] = []
    previous: SandboxState | None = None
    for event, state in steps:
        moved = previous is None or previous.state != state.state
        rows.append(
            [
                f"v{event.version}",
                utc_text(event.recorded_at),
                event.type,
                f"=> {state.state}" if moved else "",
                summary(event),
            ]
        )
        # A step's own events already say what it intends, holds and releases.
        held = (
            ""
            if event.type in ("step.started", "step.completed")
            else _held_changes(previous, state)
        )
        if held:
            rows.append(["", "", "", "", f"  {held}"])
        previous = state
    lines = table(("VER", "TIME (UTC)", "EVENT", "STATE", "WHAT"), rows)
    if steps:
        lines.append("")
        lines.extend(why(steps))
    return lines


def _held_changes(before: SandboxState | None, after: SandboxState) -> str:
    old = set(before.resources) if before is not None else set()
    new = set(after.resources)
    parts = [f"+{key}" for key in sorted(new - old)]
    parts += [f"-{key}" for key in sorted(old - new)]
    if before is not None:
        parts += [
            f"{key} now {after.resources[key]['status']}"
            for key in sorted(old & new)
            if before.resources[key]["status"] != after.resources[key]["status"]
        ]
    return "  ".join(parts)


def why(steps: Sequence[tuple[RecordedEvent, SandboxState]]) -> list[str]:
    """A plain account of why the sandbox is where the last event left it."""
    events = [e for e, _ in steps]
    final = steps[-1][1]
    lines = [
        f"sandbox {final.id} is {final.state} at version {final.version} "
        f"({utc_text(final.updated_at)})."
    ]

    ended = [
        e
        for e in events
        if e.type.startswith("transition.") and e.type != "transition.advanced"
    ]
    last = ended[-1] if ended else None
    if final.transition is not None:
        t = final.transition
        done = [s.step for s in t.steps if s.status == "completed"]
        running = [s.step for s in t.steps if s.status == "started"]
        lines.append(
            f"A {t.name} (by {t.actor}, engine {t.engine}) began at version "
            f"{t.started_version} and has not finished; steps done: "
            f"{', '.join(done) or 'none'}"
            + (f"; under way: {', '.join(running)}" if running else "")
            + "."
        )
        lines.append(
            "If no engine is running it any more, `wrenn-engine reconcile` "
            "on its host finishes or undoes it."
        )
    elif last is not None and last.type in (
        "transition.rolled_back",
        "transition.failed",
    ):
        d = last.data
        start = _transition_start(events, last)
        undone = [
            e.data["step"]
            for e in events[start:]
            if e.type == "step.undone" and e.version < last.version
        ]
        undo_failed = [
            e.data["step"]
            for e in events[start:]
            if e.type == "step.undo_failed" and e.version < last.version
        ]
        verb = "was rolled back" if last.type == "transition.rolled_back" else "failed"
        lines.append(
            f"The {d['transition']} command {verb}: step {d['step']} "
            f"failed: {d['error']}."
        )
        if undone:
            lines.append("Undone, in order: " + ", ".join(undone) + ".")
        else:
            lines.append("Nothing was undone.")
        if undo_failed:
            lines.append(
                "Undo failed for: "
                + ", ".join(undo_failed)
                + "; what they made is still recorded as held."
            )
        if final.state == "error" and final.resources:
            lines.append(
                f"`wrenn-engine destroy {final.id}` removes what it still holds."
            )
    elif last is not None:
        lines.append(
            f"The last command, {last.data['transition']} by "
            f"{last.metadata.actor}, completed at version {last.version}."
        )
    else:
        lines.append("No command has run on it yet.")

    if final.resources:
        lines.append("It holds: " + ", ".join(sorted(final.resources)) + ".")
    else:
        lines.append("It holds nothing on its host.")
    return lines


def _transition_start(events: Sequence[RecordedEvent], end: RecordedEvent) -> int:
    for index in range(len(events) - 1, -1, -1):
        e = events[index]
        if e.version < end.version and e.type == "transition.started":
            return index
    return 0
