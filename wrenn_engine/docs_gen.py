"""Generate the reference docs from the code, so they cannot drift from it.

- ``docs/state-machine.md``: ``lifecycle.machine`` (the Mermaid diagram, the
  commands) and ``lifecycle.pipelines`` (every command's steps);
- ``docs/events.md``: the event envelope and every type in ``EVENT_TYPES``;
- ``docs/cli.md``: the ``wrenn-engine`` parser.

``python -m wrenn_engine.docs_gen`` rewrites them; ``--check`` only reports
the ones that differ (exit 1). ``tests/cli/test_docs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"
REGENERATE = "python -m wrenn_engine.docs_gen"
BANNER = f"<!-- Generated from the code by `{REGENERATE}`; do not edit by hand. -->\n"


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(" --- " for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


# --- the state machine ----------------------------------------------------------------


def render_state_machine() -> str:
    """docs/state-machine.md: diagram, states, commands and their steps."""
    from wrenn_engine.domain.state import STABLE_STATES, TERMINAL_STATES, State
    from wrenn_engine.lifecycle.machine import COMMANDS, mermaid
    from wrenn_engine.lifecycle.pipelines import default_pipelines

    pipelines = default_pipelines()
    out = [
        BANNER,
        "# The sandbox state machine",
        "",
        "Drawn from `wrenn_engine.lifecycle.machine.COMMANDS` and the default "
        "pipelines in `wrenn_engine.lifecycle.pipelines`. A command moves a "
        "sandbox from a stable state through one or more transient states "
        "(its phases) to its target; each phase runs that command's steps "
        "for the phase in order. `advance` moves to the next phase, "
        "`complete` lands in the target, `rollback` returns to the state the "
        "command started from after every done step was undone, and `fail` "
        "lands in `error`. `create` only records the sandbox (`pending`); "
        "`create` with start runs `start` next.",
        "",
        "```mermaid",
        mermaid().rstrip("\n"),
        "```",
        "",
        "## States",
        "",
    ]

    def kind(state: State) -> str:
        if state in TERMINAL_STATES:
            return "stable, terminal"
        return "stable" if state in STABLE_STATES else "transient (work in progress)"

    out += _table(("state", "kind"), ((f"`{s}`", kind(s)) for s in State))
    out += [
        "",
        "## Commands",
        "",
        "On failure, `rollback` undoes the done steps in reverse and returns to "
        "the source state when every undo succeeded (else `error`); `error` "
        "means the command releases things and cannot be taken back, so it "
        "lands in `error` with the cause; from there `destroy` removes "
        "whatever the log says is still held.",
        "",
    ]
    out += _table(
        ("command", "from", "phases", "lands in", "on failure", "issued by", "what"),
        (
            (
                f"`{spec.name}`",
                ", ".join(f"`{s}`" for s in spec.sources),
                " -> ".join(f"`{p}`" for p in spec.phases),
                f"`{spec.target}`",
                spec.on_failure,
                "the engine" if spec.system else "a user",
                spec.description,
            )
            for spec in COMMANDS.values()
        ),
    )
    out += [
        "",
        "## Steps",
        "",
        "Before a step touches the host its intent (what it will create) is "
        "appended as `step.started`; after, its result as `step.completed`. "
        "A step with an undo can be taken back; the undo works from the "
        "intent alone, so it also removes a crashed step's partial work. "
        "Step names are stable: an embedding control plane inserts, replaces "
        "or removes steps by name, and failpoints use them "
        "(`wrenn-engine debug failpoints`). Before any step, `create` runs "
        "`config.apply_defaults` and `config.validate`.",
    ]
    for command in pipelines.commands():
        out += ["", f"### {command}", ""]
        out += _table(
            ("#", "step", "phase", "records intent", "undo", "what it does"),
            (
                (
                    index,
                    f"`{step.name}`",
                    f"`{step.phase}`",
                    "yes" if step.plan else "no",
                    "yes" if step.undo else "no",
                    step.description,
                )
                for index, step in enumerate(pipelines[command], 1)
            ),
        )
    return "\n".join(out) + "\n"


# --- the events -----------------------------------------------------------------------


def _field_comments(cls: type) -> dict[str, str]:
    """``#:`` comments written above a dataclass field, by field name."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"^(\w+)\s*:", stripped)
        if match and pending:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    return comments


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()!r}`"
    return "required"


def _sample_event() -> Any:
    from wrenn_engine.domain.events import Metadata, RecordedEvent

    return RecordedEvent(
        position=42,
        stream_id="sb-0123456789",
        version=7,
        type="step.completed",
        schema_version=1,
        data={"transition": "start", "step": "vm.boot", "result": {}},
        metadata=Metadata(
            actor="cli:alice",
            correlation_id="5f0c2a9d81b3e4f6",
            causation_id=None,
            command_id="deploy-17/start",
            host_id="host-a",
        ),
        recorded_at=datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
    )


ENVELOPE = {
    "position": "global position: the order of truth across all sandboxes, "
    "strictly increasing, committed in order",
    "sandbox_id": "the stream: the sandbox's id (`host.<host id>` for a host's "
    "own record)",
    "version": "the event's number within its sandbox's stream, from 1, no gaps",
    "type": "the stable dotted event type (the sections below)",
    "schema_version": "the shape version of `data`; older shapes are upcast when read",
    "recorded_at": "commit time, ISO 8601 in UTC with its offset",
    "actor": "who caused it (`cli:<user>`, `api`, `system`, ...), also in `metadata`",
    "data": "the type's fields (below)",
    "metadata": "`actor`, `correlation_id` (one command's events share it), "
    "`causation_id` (the event that caused this one, if any), "
    "`command_id` (the idempotency key, if given), `host_id` (the "
    "engine's host)",
}


def render_events() -> str:
    """docs/events.md: the envelope and every event type with its fields."""
    import json

    from wrenn_engine.domain.events import EVENT_TYPES, RESOURCE_KINDS

    sample = _sample_event().to_dict()
    missing = set(sample) ^ set(ENVELOPE)
    if missing:
        raise RuntimeError(f"docs_gen.ENVELOPE does not describe {sorted(missing)}")
    out = [
        BANNER,
        "# Event catalogue",
        "",
        "A sandbox's history is a stream of these events, append-only. This "
        "page is generated from `wrenn_engine.domain.events`: the envelope "
        "is `RecordedEvent.to_dict()`, the shape of `wrenn-engine events "
        "--json`, of every line of `wrenn-engine export`, and of what "
        "`replay --file` reads.",
        "",
        "## The envelope",
        "",
        "```json",
        json.dumps(sample, indent=2),
        "```",
        "",
    ]
    out += _table(("key", "meaning"), ((f"`{k}`", v) for k, v in ENVELOPE.items()))
    out += [
        "",
        "## Resource kinds",
        "",
        'Steps name what they create as `{"kind", "name"}` in '
        "`intent.resources` (before) and `result.resources` (after), and what "
        "they remove in `result.released`.",
        "",
    ]
    out += _table(
        ("kind", "name holds"), ((f"`{k}`", v) for k, v in RESOURCE_KINDS.items())
    )
    out += ["", "## Event types", ""]
    out += [f"- [`{name}`](#{name.replace('.', '')})" for name in EVENT_TYPES]
    for name, cls in EVENT_TYPES.items():
        comments = _field_comments(cls)
        out += [
            "",
            f"### {name}",
            "",
            f"Schema version {cls.schema_version}. Class "
            f"`{cls.__module__}.{cls.__qualname__}`.",
            "",
            _doc(cls),
            "",
        ]
        fields = dataclasses.fields(cls)
        if fields:
            out += _table(
                ("field", "type", "default", "notes"),
                (
                    (
                        f"`{f.name}`",
                        f"`{f.type}`",
                        _default(f),
                        comments.get(f.name, ""),
                    )
                    for f in fields
                ),
            )
        else:
            out.append("No fields.")
    return "\n".join(out) + "\n"


# --- the command line -----------------------------------------------------------------


def _subcommands(
    parser: argparse.ArgumentParser,
) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs == 0:
        return names
    return f"{names} `{action.metavar or action.dest.upper()}`"


def _synopsis(prog: str, parser: argparse.ArgumentParser) -> str:
    parts = [prog]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.dest in ("db", "debug", "verbose"):
            continue
        if not action.option_strings:
            text = str(action.metavar or action.dest)
            parts.append(f"[{text}]" if action.nargs == "?" else text)
            continue
        flag = action.option_strings[-1]
        text = flag if action.nargs == 0 else f"{flag} {action.metavar}"
        if isinstance(action, argparse._AppendAction):
            text += " ..."
        parts.append(text if action.required else f"[{text}]")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parts.append(str(action.metavar or "COMMAND"))
    return " ".join(parts)


def _options(parser: argparse.ArgumentParser, skip_common: bool) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if skip_common and action.dest in ("db", "debug", "verbose"):
            continue
        text = action.help or ""
        if action.choices and not isinstance(action.choices, dict):
            text += " (one of: " + ", ".join(str(c) for c in action.choices) + ")"
        rows.append((_flags(action), "yes" if action.required else "", text))
    if not rows:
        return []
    return _table(("option", "required", "meaning"), rows)


def _command_section(
    prog: str, name: str, parser: argparse.ArgumentParser, level: int
) -> list[str]:
    out = [
        "",
        f"{'#' * level} {prog} {name}",
        "",
        " ".join((parser.description or "").split()),
        "",
        "```",
        _synopsis(f"{prog} {name}", parser),
        "```",
        "",
    ]
    out += _options(parser, skip_common=True)
    for sub_name, sub in _subcommands(parser):
        out += _command_section(f"{prog} {name}", sub_name, sub, level + 1)
    return out


def render_cli() -> str:
    """docs/cli.md: every command and option, the JSON shapes, the environment."""
    from wrenn_engine.cli.drivers import DRIVERS_ENV, FAKE_HOST_ENV, RUN_DIR_ENV
    from wrenn_engine.cli.main import PROG, build_parser
    from wrenn_engine.domain.state import SandboxState

    parser = build_parser()
    sandbox_keys = ", ".join(f"`{k}`" for k in SandboxState(id="x").to_dict())
    event_keys = ", ".join(f"`{k}`" for k in _sample_event().to_dict())
    out = [
        BANNER,
        f"# `{PROG}` command reference",
        "",
        " ".join((parser.description or "").split()),
        "",
        "## Conventions",
        "",
        "- `--db URL`, `--debug` and `-v/--verbose` are accepted before or after "
        "the command. URLs are SQLAlchemy URLs: `sqlite:////abs/path/engine.db` "
        "or `postgresql+psycopg://user@host/db`.",
        "- Exit status: 0 on success; 1 on an error, with one line on stderr "
        "that says what to do; 2 on a usage error. An unexpected failure prints "
        "one line and `run with --debug for the traceback`.",
        "- Output: tables for people on stdout; `--json` prints one JSON "
        "document, `--jsonl` one JSON document per line. Notes and progress go "
        "to stderr, so stdout stays clean for an id or JSON. Progress lines "
        "(each step as it completes) appear when stderr is a terminal, or with "
        "`--verbose`.",
        "- Times given to `--since`, `--until` and `--at` are ISO 8601 with a "
        "UTC offset (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00+02:00`). A "
        "time without an offset is refused (exit 2): it is ambiguous. Times "
        "printed are UTC.",
        "- Commands that only read (`ls`, `show`, `events`, `replay`, `export`, "
        "`diff`, `verify`, `db current`) open the database alone and never "
        "touch the host; a SQLite file that does not exist is an error, not a "
        "new empty database. `replay --file`, `diff --file` and `debug "
        "failpoints` open no database at all.",
        "- `WRENN_ENGINE_HOST_NETNS=<namespace>` and `WRENN_ENGINE_NET_PREFIX` "
        "fence the acting commands' network work into a namespace you made "
        "(see operations.md, Keeping the network fenced off).",
        "- Commands that act (`create`, `start`, `pause`, `resume`, `stop`, "
        "`destroy`, `reconcile`) use the real host drivers and need root. They "
        "run no background workers and do not reconcile when they open: run "
        "`reconcile` after a crash (see operations.md).",
        "",
        "## JSON shapes",
        "",
        f"- A sandbox (`ls --json` is an array of them; `show --json`, `replay "
        f"--json` and the acting commands' `--json` print one) is "
        f"`SandboxState.to_dict()`: {sandbox_keys}. `state` is one of the "
        "states in state-machine.md; `version` is the version of the last "
        "event folded; times are ISO 8601 with offset; `transition` is the "
        "command in progress (null at rest) with its steps; `resources` maps "
        "`kind:name` to `{kind, name, status, step}`.",
        f"- An event (`events --json` is an array, `events --jsonl` and "
        f"`export` one per line) is `RecordedEvent.to_dict()`: {event_keys}. "
        "See events.md.",
        '- `replay --explain --json` is an array of `{"event": event, '
        '"state": sandbox}`, one per event; `--jsonl` prints the same one '
        "per line.",
        '- `diff --json` is an array of `{"path", "old", "new", '
        '"change"}`; `change` is `added`, `removed` or `changed`; paths look '
        "like `config.vcpus` or `transition.steps[0].status`.",
        '- `verify --json` is `{"ok", "events", "rebuilt", '
        '"differences": [{"table", "key", "stored", "rebuilt"}]}`.',
        '- `db current --json` is `{"url", "current", "head", '
        '"up_to_date"}`; `reconcile --json` and `debug failpoints --json` '
        "are arrays of strings.",
        "",
        "## Environment",
        "",
    ]
    out += _table(
        ("variable", "meaning"),
        (
            ("`WRENN_ENGINE_DB`", "database URL when `--db` is not given"),
            (
                "`WRENN_ENGINE_HOME`",
                "state directory (`/var/lib/wrenn-engine` for "
                "root, `~/.local/state/wrenn-engine` otherwise)",
            ),
            (
                "`WRENN_ENGINE_HOST_ID`",
                "this host's id in a shared database (default: the hostname)",
            ),
            (f"`{RUN_DIR_ENV}`", "default of `create --run-dir`"),
            (
                "`WRENN_ENGINE_FAILPOINTS`",
                "armed failpoints, `name=error|crash,...` (drills and tests)",
            ),
            (
                f"`{DRIVERS_ENV}`",
                "`linux` (default) or `fake`: in-memory stand-in "
                "drivers, a testing aid for the CLI itself; never for real sandboxes",
            ),
            (
                f"`{FAKE_HOST_ENV}`",
                "with `fake` drivers: the JSON file the "
                "stand-in host keeps its objects in between commands (default "
                "`fake-host.json` in the state directory)",
            ),
        ),
    )
    out += ["", "## Commands", "", "```", _synopsis(PROG, parser) + " ...", "```", ""]
    out += _options(parser, skip_common=False)
    for name, sub in _subcommands(parser):
        out += _command_section(PROG, name, sub, 3)
    return "\n".join(out) + "\n"


# --- writing and checking -------------------------------------------------------------

GENERATED: dict[str, Callable[[], str]] = {
    "state-machine.md": render_state_machine,
    "events.md": render_events,
    "cli.md": render_cli,
}


def stale(docs_dir: Path = DOCS_DIR) -> list[str]:
    """Names of generated docs whose committed text differs from the code's."""
    found = []
    for name in GENERATED:
        path = docs_dir / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != generate(name):
            found.append(name)
    return found


def generate(name: str) -> str:
    """The text of one generated doc, blank lines collapsed."""
    return re.sub(r"\n{3,}", "\n\n", GENERATED[name]())


def write(docs_dir: Path = DOCS_DIR) -> list[str]:
    """Write every generated doc; return the names that changed."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    changed = stale(docs_dir)
    for name in changed:
        (docs_dir / name).write_text(generate(name), encoding="utf-8")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name if __spec__ else 'wrenn_engine.docs_gen'}",
        description=textwrap.dedent(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only report docs that differ from the code (exit 1)",
    )
    parser.add_argument(
        "--docs-dir",
        type=Path,
        default=DOCS_DIR,
        help=f"where the docs live (default {DOCS_DIR})",
    )
    args = parser.parse_args(argv)
    if args.check:
        differ = stale(args.docs_dir)
        for name in differ:
            print(
                f"{args.docs_dir / name} is out of date; run `{REGENERATE}`",
                file=sys.stderr,
            )
        return 1 if differ else 0
    for name in write(args.docs_dir):
        print(f"wrote {args.docs_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
