"""The ``wrenn-engine`` command.

Exit status: 0 on success, 1 on an error (one line on stderr that says what
to do), 2 on a usage error. ``--db URL`` (or ``$WRENN_ENGINE_DB``),
``--debug`` and ``--verbose`` are accepted before or after the command.
``docs/cli.md`` is generated from the parser built here
(``python -m wrenn_engine.docs_gen``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from wrenn_engine.cli import commands
from wrenn_engine.cli.common import (
    default_actor,
    non_negative_int,
    one_line,
    parse_time,
    positive_float,
    positive_int,
)
from wrenn_engine.cli.progress import progress
from wrenn_engine.domain.state import State
from wrenn_engine.errors import WrennError

PROG = "wrenn-engine"

DESCRIPTION = """\
Run microVM sandboxes as event-sourced state machines, and ask their log what
happened. Every command takes --db URL (or $WRENN_ENGINE_DB); the default is
the SQLite file engine.db in the state directory ($WRENN_ENGINE_HOME).
"""

EPILOG = """\
Exit status: 0 on success, 1 on an error (with a one-line message that says
what to do), 2 on a usage error.
"""

Handler = Callable[[argparse.Namespace], int]


def _vmm_choice(text: str) -> str:
    if text in ("cloud-hypervisor", "simulator") or os.path.isabs(text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not cloud-hypervisor, simulator or an absolute path"
    )


def _common(suppress: bool) -> argparse.ArgumentParser:
    """--db, --debug, --verbose: on the main parser and on every command."""
    parser = argparse.ArgumentParser(add_help=False)
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument(
        "--db",
        metavar="URL",
        help="database URL (default: $WRENN_ENGINE_DB, else "
        "the SQLite file in the state directory)",
        **({"default": argparse.SUPPRESS} if suppress else {"default": None}),
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print tracebacks and debug logs",
        **default,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print the engine's progress lines even when stderr is not a terminal",
        **default,
    )
    return parser


def _json(parser: argparse.ArgumentParser, what: str = "the result as JSON") -> None:
    parser.add_argument(
        "--json", action="store_true", help=f"print {what} (shapes: docs/cli.md)"
    )


def _acting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--actor",
        default=default_actor(),
        metavar="NAME",
        help="who is acting, recorded on every event (default: cli:$USER)",
    )
    parser.add_argument(
        "--command-id",
        metavar="ID",
        help="idempotency key: a command id already applied "
        "returns the earlier result instead of acting twice",
    )
    _json(parser, "the sandbox afterwards as JSON")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; ``docs/cli.md`` is rendered from it."""
    common = _common(suppress=True)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        parents=[_common(suppress=False)],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, handler: Handler, summary: str, description: str = "", **kwargs: Any
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(
            name,
            parents=[common],
            help=summary,
            description=description or summary,
            **kwargs,
        )
        command.set_defaults(handler=handler)
        return command

    # db
    db = add(
        "db",
        _no_handler,
        "inspect or upgrade the database schema",
        "Inspect or upgrade the database schema (Alembic revisions).",
    )
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = db_sub.add_parser(
        "upgrade",
        parents=[common],
        help="bring the schema up to the revision this code needs",
        description="Bring the schema up to the head revision "
        "(or to --revision). Safe to run twice.",
    )
    up.add_argument("--revision", metavar="REV", help="stop at this revision")
    _json(up)
    up.set_defaults(handler=commands.db_upgrade)
    down = db_sub.add_parser(
        "downgrade",
        parents=[common],
        help="take the schema down to a revision",
        description="Take the schema down to REVISION "
        "(`base` drops every table: the log is lost).",
    )
    down.add_argument(
        "revision", metavar="REVISION", help="the revision to go down to, or base"
    )
    down.add_argument(
        "--yes", action="store_true", help="confirm that `base` drops the whole log"
    )
    down.set_defaults(handler=commands.db_downgrade)
    cur = db_sub.add_parser(
        "current",
        parents=[common],
        help="show the schema revision and the one needed",
        description="Show the database's schema revision and "
        "the head this code needs. Never creates a database.",
    )
    _json(cur)
    cur.set_defaults(handler=commands.db_current)

    # commands that act
    create = add(
        "create",
        commands.create,
        "create a sandbox and start it; prints its id",
        "Create a sandbox from a kernel and a template image and start it (unless "
        "--no-start). Prints the new sandbox id on stdout; progress goes to stderr. "
        "Needs root with the real host drivers.",
    )
    create.add_argument(
        "--kernel", required=True, metavar="PATH", help="kernel image the VM boots"
    )
    create.add_argument(
        "--image",
        required=True,
        metavar="PATH",
        help="template root filesystem image (shared, read-only)",
    )
    create.add_argument(
        "--vcpus", type=positive_int, metavar="N", help="virtual CPUs (default 1)"
    )
    create.add_argument(
        "--memory-mb",
        type=positive_int,
        metavar="N",
        help="memory in MiB (default 512)",
    )
    create.add_argument(
        "--id", metavar="ID", help="sandbox id (default: generated, sb-xxxxxxxxxx)"
    )
    create.add_argument(
        "--no-start",
        action="store_true",
        help="record the sandbox as pending; start it later",
    )
    create.add_argument(
        "--vmm",
        type=_vmm_choice,
        default="cloud-hypervisor",
        metavar="VMM",
        help="cloud-hypervisor (default), simulator "
        "(the bundled wrenn-ch-simulator) or an absolute path",
    )
    create.add_argument(
        "--timeout",
        type=positive_float,
        metavar="SECONDS",
        help="inactivity timeout: a running engine pauses the "
        "sandbox after this long without activity",
    )
    create.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="a label kept with the sandbox (repeatable)",
    )
    create.add_argument(
        "--run-dir",
        metavar="DIR",
        help="directory for the sandbox's directory and API socket "
        "(default: $WRENN_ENGINE_RUN_DIR, else /tmp/ch-vm-<id> and "
        "/tmp/ch-<id>.sock)",
    )
    _acting(create)

    for name, summary in (
        ("start", "start a pending or stopped sandbox"),
        ("pause", "snapshot a running sandbox and release its VMM and network"),
        ("resume", "restore a paused sandbox from its snapshot"),
        ("stop", "shut a running or paused sandbox down, keeping its disk"),
        ("destroy", "remove everything a sandbox holds; it cannot come back"),
    ):
        command = add(
            name,
            commands.act,
            summary,
            f"{summary[0].upper()}{summary[1:]}. Prints `ID STATE`. Needs "
            "root with the real host drivers.",
        )
        command.add_argument("id", metavar="ID", help="the sandbox")
        _acting(command)

    rec = add(
        "reconcile",
        commands.reconcile,
        "bring this host and the log into agreement (after a crash)",
        "Finish or undo transitions cut off by a crash, adopt or halt running "
        "sandboxes, and remove host objects no sandbox holds. Prints each "
        "action. Needs root with the real host drivers.",
    )
    _json(rec, "the actions as a JSON array")

    # queries
    ls = add("ls", commands.ls, "list sandboxes", "List sandboxes, oldest first.")
    ls.add_argument(
        "--state",
        action="append",
        choices=[str(s) for s in State],
        metavar="STATE",
        help="only sandboxes in this state (repeatable)",
    )
    ls.add_argument("--host", metavar="HOST", help="only sandboxes owned by this host")
    _json(ls, "the sandboxes as a JSON array")

    show = add(
        "show",
        commands.show,
        "show one sandbox in detail",
        "Show one sandbox: state, config, the command in progress, what it "
        "holds on the host and its runtime facts.",
    )
    show.add_argument("id", metavar="ID", help="the sandbox")
    _json(show, "the sandbox as JSON")

    ev = add(
        "events",
        commands.events,
        "query the audit log",
        "Query the audit log: every event of every sandbox, in commit order "
        "(global position). Filters combine with AND; a repeated filter matches "
        "any of its values. Times are ISO 8601 with a UTC offset; a time "
        "without an offset is refused.",
    )
    ev.add_argument(
        "--sandbox",
        action="append",
        metavar="ID",
        help="events of this sandbox (repeatable)",
    )
    ev.add_argument(
        "--type",
        action="append",
        metavar="TYPE",
        help="events of this type, e.g. step.failed (repeatable)",
    )
    ev.add_argument(
        "--actor",
        action="append",
        metavar="NAME",
        help="events recorded for this actor (repeatable)",
    )
    ev.add_argument(
        "--host",
        action="append",
        metavar="HOST",
        help="events recorded by this host (repeatable)",
    )
    ev.add_argument(
        "--since",
        type=parse_time,
        metavar="TIME",
        help="recorded at or after TIME, e.g. 2024-05-01T12:00:00+02:00",
    )
    ev.add_argument(
        "--until", type=parse_time, metavar="TIME", help="recorded before TIME"
    )
    ev.add_argument(
        "--after",
        type=non_negative_int,
        default=0,
        metavar="POSITION",
        help="keyset pagination: only events after this position (the "
        "last one already seen)",
    )
    ev.add_argument(
        "--limit",
        type=positive_int,
        metavar="N",
        help="print at most N events (with --follow: stop after N)",
    )
    ev.add_argument(
        "--follow",
        action="store_true",
        help="keep printing new events as they are committed, until Ctrl-C or SIGTERM",
    )
    ev.add_argument(
        "--follow-timeout",
        type=positive_float,
        metavar="SECONDS",
        help="with --follow: stop after SECONDS",
    )
    fmt = ev.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON array of events")
    fmt.add_argument(
        "--jsonl",
        action="store_true",
        help="print one JSON event per line (works with --follow)",
    )

    rp = add(
        "replay",
        commands.replay,
        "fold a sandbox's events into its state",
        "Fold a sandbox's events into the state after the chosen event (by "
        "default the last). With --explain, list each event, what it changed and "
        "the state it left, then why the sandbox is where it is. With --file, "
        "replay an export and open no database at all.",
    )
    rp.add_argument(
        "id",
        nargs="?",
        metavar="ID",
        help="the sandbox (optional with --file when it holds one)",
    )
    when = rp.add_mutually_exclusive_group()
    when.add_argument(
        "--to-version", type=positive_int, metavar="N", help="stop after version N"
    )
    when.add_argument(
        "--at",
        type=parse_time,
        metavar="TIME",
        help="stop after the last event recorded at or before TIME",
    )
    rp.add_argument(
        "--explain",
        action="store_true",
        help="show every event and the state it produced",
    )
    rp.add_argument(
        "--file",
        metavar="FILE",
        help="replay this export (`wrenn-engine export`) instead of the database",
    )
    fmt = rp.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json",
        action="store_true",
        help="print the state (with --explain: an array of {event, state}) as JSON",
    )
    fmt.add_argument(
        "--jsonl",
        action="store_true",
        help="with --explain: one {event, state} per line",
    )

    ex = add(
        "export",
        commands.export,
        "write a sandbox's events as JSON lines",
        "Write a sandbox's events as JSON lines, one event per line in the "
        "documented event shape. `replay --file` reads them back without a "
        "database.",
    )
    ex.add_argument("id", metavar="ID", help="the sandbox")
    ex.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE instead of stdout"
    )

    df = add(
        "diff",
        commands.diff,
        "what changed in a sandbox between two versions",
        "Show every field of the folded state that differs between two "
        "versions, as `path: old -> new` (version 0 is before the first "
        "event).",
    )
    df.add_argument(
        "id",
        nargs="?",
        metavar="ID",
        help="the sandbox (optional with --file when it holds one)",
    )
    df.add_argument(
        "--from",
        dest="from_version",
        type=non_negative_int,
        required=True,
        metavar="N",
        help="the older version",
    )
    df.add_argument(
        "--to",
        dest="to_version",
        type=non_negative_int,
        required=True,
        metavar="M",
        help="the newer version",
    )
    df.add_argument(
        "--file", metavar="FILE", help="read an export instead of the database"
    )
    _json(df, "the changes as a JSON array of {path, old, new, change}")

    vf = add(
        "verify",
        commands.verify,
        "check the projections against the events",
        "Fold every event afresh and compare the result with the stored "
        "projections (sandboxes, network slots, held resources). Prints each "
        "difference and exits 1 when there is one.",
    )
    vf.add_argument(
        "--repair",
        action="store_true",
        help="first rebuild the projections from the events",
    )
    _json(vf)

    dbg = add(
        "debug",
        _no_handler,
        "tools for drills and debugging",
        "Tools for drills and debugging.",
    )
    dbg_sub = dbg.add_subparsers(dest="debug_command", metavar="TOOL", required=True)
    fp = dbg_sub.add_parser(
        "failpoints",
        parents=[common],
        help="list every failpoint name",
        description="List every failpoint name, one per line: each step and "
        "<step>.done. Arm them with WRENN_ENGINE_FAILPOINTS=name=error|crash,...",
    )
    _json(fp, "the names as a JSON array")
    fp.set_defaults(handler=commands.debug_failpoints)

    demo = add(
        "demo",
        _demo,
        "run a sandbox through its whole life, then clean up",
        "Build a small ext4 template, then create, pause, resume and destroy a "
        "sandbox, print its timeline and replay, and remove everything it made. "
        "Uses the real rootfs, network and VMM drivers as root (inside a network "
        "namespace of its own), stand-ins otherwise, and says which. It records "
        "in a temporary database of its own unless --db is given, and fetches "
        "nothing from the internet.",
    )
    demo.add_argument(
        "--vmm",
        type=_vmm_choice,
        metavar="VMM",
        help="cloud-hypervisor, simulator or an absolute path "
        "(default: cloud-hypervisor when installed, else simulator)",
    )
    demo.add_argument(
        "--fake",
        action="store_true",
        help="use the in-memory stand-in drivers even as root",
    )
    return parser


def _no_handler(args: argparse.Namespace) -> int:
    raise AssertionError("argparse requires a sub-command here")


def _demo(args: argparse.Namespace) -> int:
    from wrenn_engine.cli.demo import run_demo

    return run_demo(args)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage rules argparse cannot express; a breach exits 2."""
    command = args.command
    if command == "events":
        if args.follow and args.json:
            parser.error("events --follow streams: use --jsonl, not --json")
        if args.follow_timeout is not None and not args.follow:
            parser.error("--follow-timeout needs --follow")
        from wrenn_engine.domain.events import EVENT_TYPES

        unknown = sorted(set(args.type or ()) - set(EVENT_TYPES))
        if unknown:
            parser.error(
                f"--type {unknown[0]!r} is not an event type; the types are listed "
                "in docs/events.md (e.g. step.failed, transition.completed)"
            )
    if command == "replay":
        if args.jsonl and not args.explain:
            parser.error("replay --jsonl needs --explain (one line per event)")
        if not args.id and not args.file:
            parser.error("replay needs a sandbox ID or --file EXPORT")
    if command == "diff":
        if not args.id and not args.file:
            parser.error("diff needs a sandbox ID or --file EXPORT")
        if args.from_version > args.to_version:
            parser.error("--from must not be after --to")


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so it cleans up as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _with_db(message: str, args: argparse.Namespace) -> str:
    """Make the commands an error suggests name the database the user gave."""
    url = getattr(args, "db", None)
    if not url or "--db" in message:
        return message
    return message.replace("`wrenn-engine ", f"`wrenn-engine --db {url} ")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check(parser, args)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2

    debug = bool(args.debug)
    handler: Handler = args.handler
    try:
        # The demo tells its own story on stdout; step lines would repeat it.
        tty_info = args.command != "demo"
        with progress(bool(args.verbose), debug, tty_info), _sigterm_interrupts():
            return handler(args)
    except WrennError as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_with_db(one_line(str(exc)), args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "events" and args.follow:
            return 0
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of ours.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(
            f"{PROG}: unexpected error: {type(exc).__name__}: "
            f"{one_line(str(exc))}; run with --debug for the traceback",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
