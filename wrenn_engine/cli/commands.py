"""The handlers of the ``wrenn-engine`` commands.

Each takes the parsed arguments and returns the exit status. Commands that
only read (``ls``, ``show``, ``events``, ``replay``, ``export``, ``diff``,
``verify``, ``db current``) open the store alone, so they never touch the
host or reconcile it; ``replay --file``, ``diff --file`` and ``debug
failpoints`` open no database at all.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from wrenn_engine.cli import render
from wrenn_engine.cli.common import (
    CliError,
    db_url,
    emit,
    emit_json,
    emit_jsonl,
    is_embedded,
    note,
    out,
    resolved_db_url,
    sqlite_file,
    utc_text,
)
from wrenn_engine.domain.events import EVENT_TYPES, RecordedEvent, is_sandbox_stream
from wrenn_engine.domain.state import SandboxState, explain, state_at
from wrenn_engine.domain.upcasting import upcast
from wrenn_engine.errors import SandboxNotFound

if TYPE_CHECKING:
    from wrenn_engine.store.base import EventQuery, EventStore

#: Events fetched per query while paging through a large log.
PAGE = 1000


@contextmanager
def opened_store(args: argparse.Namespace) -> Iterator[EventStore]:
    from wrenn_engine.store import open_store

    url = db_url(args)
    # Reading never creates a database: a SQLite file that is not there is
    # a mistyped path, not an empty log.
    path = sqlite_file(url) if url else None
    if path is not None and not path.exists():
        raise CliError(
            f"no database at {path}; check --db, or create one with "
            f"`wrenn-engine --db {url} db upgrade`"
        )
    store = open_store(url)
    try:
        yield store
    finally:
        store.close()


# --- db -------------------------------------------------------------------------------


def db_upgrade(args: argparse.Namespace) -> int:
    from wrenn_engine import settings
    from wrenn_engine.store.migrate import current_revision, head_revision, upgrade
    from wrenn_engine.store.sql import safe_url

    url = resolved_db_url(args)
    if is_embedded(args):
        settings.state_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
    before = current_revision(url)
    target = args.revision or head_revision()
    if before == target:
        note(f"database {safe_url(url)} is already at {target}")
    else:
        upgrade(url, args.revision or "head")
        note(
            f"database {safe_url(url)} upgraded from {before or 'no schema'} to "
            f"{target}"
        )
    if args.json:
        emit_json({"url": safe_url(url), "before": before, "current": target})
    return 0


def db_downgrade(args: argparse.Namespace) -> int:
    from wrenn_engine.store.migrate import current_revision, downgrade
    from wrenn_engine.store.sql import safe_url

    url = resolved_db_url(args)
    if args.revision == "base" and not args.yes:
        raise CliError(
            "`db downgrade base` drops every table and the whole event log with "
            "them; back it up first (docs/operations.md), then add --yes"
        )
    before = current_revision(url)
    downgrade(url, args.revision)
    note(
        f"database {safe_url(url)} downgraded from {before or 'no schema'} to "
        f"{args.revision}"
    )
    return 0


def db_current(args: argparse.Namespace) -> int:
    from wrenn_engine.store.migrate import current_revision, head_revision
    from wrenn_engine.store.sql import safe_url

    url = resolved_db_url(args)
    path = sqlite_file(url)
    # Asking must not create an empty SQLite file where there was none.
    current = None if path is not None and not path.exists() else current_revision(url)
    head = head_revision()
    if args.json:
        emit_json(
            {
                "url": safe_url(url),
                "current": current,
                "head": head,
                "up_to_date": current == head,
            }
        )
        return 0
    emit(f"database: {safe_url(url)}")
    emit(f"current:  {current or 'no schema'}")
    emit(f"head:     {head}")
    if current != head and is_embedded(args):
        note("the embedded database brings its schema up to date when opened")
    elif current != head:
        note(
            f"the schema is behind; run `wrenn-engine --db {safe_url(url)} db upgrade`"
        )
    return 0


# --- commands that act ----------------------------------------------------------------


def _print_state(args: argparse.Namespace, sandbox: SandboxState) -> None:
    if getattr(args, "json", False):
        emit_json(sandbox.to_dict())
    else:
        emit(f"{sandbox.id} {sandbox.state}")


def create(args: argparse.Namespace) -> int:
    from wrenn_engine.cli.drivers import open_engine

    labels: dict[str, str] = {}
    for item in args.label or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--label {item!r} is not KEY=VALUE")
        labels[key] = value

    with open_engine(args, "create", vmm=args.vmm) as engine:
        sandbox = engine.create(
            kernel_path=os.path.abspath(args.kernel),
            rootfs_path=os.path.abspath(args.image),
            vcpus=args.vcpus or 0,
            memory_mb=args.memory_mb or 0,
            sandbox_id=args.id,
            start=not args.no_start,
            inactivity_timeout_s=args.timeout,
            labels=labels,
            actor=args.actor,
            command_id=args.command_id,
        )
    if args.json:
        emit_json(sandbox.to_dict())
    else:
        emit(sandbox.id)
    return 0


def act(args: argparse.Namespace) -> int:
    """start, pause, resume, stop, destroy."""
    from wrenn_engine.cli.drivers import open_engine

    command = args.command
    with open_engine(args, command) as engine:
        method = getattr(engine, command)
        sandbox = method(args.id, actor=args.actor, command_id=args.command_id)
    _print_state(args, sandbox)
    return 0


def reconcile(args: argparse.Namespace) -> int:
    from wrenn_engine.cli.drivers import open_engine

    with open_engine(args, "reconcile") as engine:
        # Engine's method named ``list`` shadows the builtin in its annotations.
        actions = engine.reconcile()
    if args.json:
        emit_json(actions)
    elif actions:
        for action in actions:
            emit(action)
    else:
        note("host and log agree; nothing to do")
    return 0


# --- queries --------------------------------------------------------------------------


def ls(args: argparse.Namespace) -> int:
    with opened_store(args) as store:
        found = store.list_sandboxes(states=args.state or (), host_id=args.host)
    # A host's own stream (reconcile's record) is not a sandbox.
    sandboxes = [s for s in found if is_sandbox_stream(s.id)]
    if args.json:
        emit_json([s.to_dict() for s in sandboxes])
    elif sandboxes:
        for line in render.sandbox_table(sandboxes):
            emit(line)
    else:
        note("no sandboxes" + (" match" if args.state or args.host else ""))
    return 0


def show(args: argparse.Namespace) -> int:
    with opened_store(args) as store:
        sandbox = store.get_sandbox(args.id)
    if sandbox is None:
        raise SandboxNotFound(args.id)
    if args.json:
        emit_json(sandbox.to_dict())
    else:
        for line in render.sandbox_details(sandbox):
            emit(line)
    return 0


# --- events ---------------------------------------------------------------------------


class _EventPrinter:
    """Prints events as a table, a JSON array or JSON lines."""

    FOLLOW_FORMAT = "{:>8}  {:<24}  {:<16} {:>4}  {:<24} {:<14} {}"

    def __init__(self, mode: str, follow: bool):
        self.mode = mode
        self.follow = follow
        self.collected: list[RecordedEvent] = []
        self.header_done = False
        self.count = 0

    def add(self, events: list[RecordedEvent]) -> None:
        self.count += len(events)
        if self.mode == "jsonl":
            for event in events:
                emit_jsonl(event.to_dict())
        elif self.mode == "json" or not self.follow:
            self.collected.extend(events)
        else:
            if not self.header_done:
                emit(self.FOLLOW_FORMAT.format(*render.EVENT_HEADERS).rstrip())
                self.header_done = True
            for event in events:
                emit(self.FOLLOW_FORMAT.format(*render.event_row(event)).rstrip())
        if self.follow:
            out().flush()

    def finish(self) -> None:
        if self.mode == "json":
            emit_json([e.to_dict() for e in self.collected])
        elif self.mode == "table" and not self.follow:
            if self.collected:
                for line in render.event_table(self.collected):
                    emit(line)
            else:
                note("no events match")


def events(args: argparse.Namespace) -> int:
    from wrenn_engine.store.base import EventQuery

    mode = "jsonl" if args.jsonl else "json" if args.json else "table"
    query = EventQuery(
        sandbox_ids=tuple(args.sandbox or ()),
        types=tuple(args.type or ()),
        actors=tuple(args.actor or ()),
        host_ids=tuple(args.host or ()),
        since=args.since,
        until=args.until,
        after_position=args.after,
        limit=PAGE,
    )
    printer = _EventPrinter(mode, args.follow)
    remaining = args.limit
    try:
        with opened_store(args) as store:
            cursor = _backlog(store, query, printer, remaining)
            if remaining is not None:
                remaining -= printer.count
            if args.follow and (remaining is None or remaining > 0):
                _follow(store, query, printer, cursor, remaining, args.follow_timeout)
    finally:
        printer.finish()
    return 0


def _backlog(
    store: EventStore, query: EventQuery, printer: _EventPrinter, limit: int | None
) -> int:
    """Print what is already there; return the position read up to."""
    cursor = query.after_position
    while True:
        head = store.last_position()
        size = PAGE if limit is None else min(PAGE, limit - printer.count)
        if size <= 0:
            if not printer.follow and _more(store, query, cursor):
                note(f"more events match; continue with --after {cursor}")
            return cursor
        batch = store.query(replace(query, after_position=cursor, limit=size))
        printer.add(batch)
        if batch:
            cursor = batch[-1].position
        if len(batch) < size:
            # Appends commit in position order, so everything up to ``head``
            # that matches has been seen.
            return max(cursor, head)


def _more(store: EventStore, query: EventQuery, cursor: int) -> bool:
    return bool(store.query(replace(query, after_position=cursor, limit=1)))


def _follow(
    store: EventStore,
    query: EventQuery,
    printer: _EventPrinter,
    cursor: int,
    remaining: int | None,
    timeout: float | None,
) -> None:
    """Print new matching events as they commit, until stopped."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while remaining is None or remaining > 0:
        wait = 1.0
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                return
        if not store.wait_for_events(cursor, wait):
            continue
        before = printer.count
        cursor = _backlog(
            store,
            replace(query, after_position=cursor),
            printer,
            None if remaining is None else printer.count + remaining,
        )
        if remaining is not None:
            remaining -= printer.count - before


# --- replay, export, diff -------------------------------------------------------------


def read_export(path: str, sandbox_id: str | None) -> list[RecordedEvent]:
    """The events of an export file (JSON lines), upcast to today's shapes."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CliError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "`wrenn-engine export ID` writes UTF-8 JSON lines"
        ) from exc

    found: list[RecordedEvent] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = RecordedEvent.from_dict(json.loads(line))
        except (ValueError, KeyError, TypeError) as exc:
            raise CliError(
                f"{path} line {number} is not an exported event ({exc}); "
                "`wrenn-engine export ID` writes one JSON event per line"
            ) from exc
        schema, data = upcast(
            event.stream_id, event.version, event.type, event.schema_version, event.data
        )
        try:
            EVENT_TYPES[event.type](**data)
        except TypeError as exc:
            raise CliError(
                f"{path} line {number}: the data of a {event.type} event does not "
                f"have its documented fields ({exc}); see docs/events.md"
            ) from exc
        found.append(replace(event, schema_version=schema, data=data))

    streams = sorted({e.stream_id for e in found})
    if sandbox_id is not None:
        found = [e for e in found if e.stream_id == sandbox_id]
        if not found:
            raise CliError(
                f"{path} holds no events of sandbox {sandbox_id}; it holds "
                f"{', '.join(streams) or 'nothing'}"
            )
    elif len(streams) > 1:
        raise CliError(
            f"{path} holds several sandboxes ({', '.join(streams)}); name "
            "the one to replay"
        )
    elif not streams:
        raise CliError(f"{path} holds no events")
    found.sort(key=lambda e: e.version)
    versions = [e.version for e in found]
    expected = list(range(versions[0], versions[0] + len(versions)))
    if versions[0] != 1 or versions != expected:
        missing = sorted(set(range(1, versions[-1] + 1)) - set(versions))
        repeated = sorted({v for v in versions if versions.count(v) > 1})
        raise CliError(
            f"{path}: the stream of {found[0].stream_id} is not whole (versions "
            f"missing: {missing[:5] or 'none'}, repeated: {repeated[:5] or 'none'}); "
            "a replay of part of a history would mislead, so export it again"
        )
    return found


def _stream(args: argparse.Namespace) -> list[RecordedEvent]:
    if args.file:
        return read_export(args.file, args.id)
    if not args.id:
        raise CliError("name the sandbox to replay (or give --file EXPORT)")
    with opened_store(args) as store:
        found = store.read_stream(args.id)
    if not found:
        raise SandboxNotFound(args.id)
    return found


def replay(args: argparse.Namespace) -> int:
    events = _stream(args)
    chosen = [
        e
        for e in events
        if (args.to_version is None or e.version <= args.to_version)
        and (args.at is None or e.recorded_at <= args.at)
    ]
    if not chosen:
        where = (
            f"version {args.to_version}"
            if args.to_version is not None
            else utc_text(args.at)
        )
        raise CliError(
            f"sandbox {events[0].stream_id} has no event at or before "
            f"{where}; its first is version 1 at "
            f"{utc_text(events[0].recorded_at)}"
        )

    if args.explain:
        steps = explain(chosen)
        if args.json:
            emit_json([{"event": e.to_dict(), "state": s.to_dict()} for e, s in steps])
        elif args.jsonl:
            for e, s in steps:
                emit_jsonl({"event": e.to_dict(), "state": s.to_dict()})
        else:
            for line in render.explain_lines(steps):
                emit(line)
        return 0

    state = state_at(chosen)
    assert state is not None
    if args.json:
        emit_json(state.to_dict())
    else:
        emit(f"replayed {len(chosen)} of {len(events)} events")
        for line in render.sandbox_details(state):
            emit(line)
    return 0


def export(args: argparse.Namespace) -> int:
    with opened_store(args) as store:
        found = store.read_stream(args.id)
    if not found:
        raise SandboxNotFound(args.id)
    text = "".join(json.dumps(e.to_dict()) + "\n" for e in found)
    if args.output in (None, "-"):
        emit(text.rstrip("\n"))
        return 0
    tmp = f"{args.output}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.output)
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc.strerror or exc}") from exc
    note(f"wrote {len(found)} events of {args.id} to {args.output}")
    return 0


def diff(args: argparse.Namespace) -> int:
    events = _stream(args)
    last = events[-1].version
    for flag, version in (("--from", args.from_version), ("--to", args.to_version)):
        if version > last:
            raise CliError(
                f"{flag} {version}: sandbox {events[0].stream_id} has "
                f"versions 0 to {last}"
            )

    def at(version: int) -> dict[str, Any]:
        state = state_at(events, version=version) if version else None
        return state.to_dict() if state is not None else {}

    changes = render.diff_states(at(args.from_version), at(args.to_version))
    if args.json:
        emit_json([c.to_dict() for c in changes])
    elif changes:
        for change in changes:
            emit(str(change))
    else:
        note(
            f"nothing changed between versions {args.from_version} and "
            f"{args.to_version}"
        )
    return 0


# --- verify, debug --------------------------------------------------------------------


def verify(args: argparse.Namespace) -> int:
    with opened_store(args) as store:
        rebuilt = store.rebuild_projections() if args.repair else None
        differences = store.verify_projections()
        count = store.stats().events
    if args.json:
        emit_json(
            {
                "ok": not differences,
                "events": count,
                "rebuilt": rebuilt,
                "differences": [
                    {
                        "table": d.table,
                        "key": d.key,
                        "stored": d.stored,
                        "rebuilt": d.rebuilt,
                    }
                    for d in differences
                ],
            }
        )
    else:
        for difference in differences:
            emit(str(difference))
    if differences:
        raise CliError(
            f"the stored projections differ from the {count} events in "
            f"{len(differences)} places; the events are the truth: run "
            "`wrenn-engine verify --repair` to rebuild the projections from them"
        )
    if not args.json:
        if rebuilt is not None:
            note(f"rebuilt the projections from {rebuilt} events")
        note(f"projections agree with the {count} events")
    return 0


def failpoint_names() -> list[str]:
    """Every failpoint name, built from the default pipelines alone (no DB)."""
    from wrenn_engine.lifecycle.failpoints import names
    from wrenn_engine.lifecycle.pipelines import default_pipelines

    steps = [
        "config.apply_defaults",
        "config.validate",
        *default_pipelines().step_names(),
    ]
    return names(steps)


def debug_failpoints(args: argparse.Namespace) -> int:
    found = failpoint_names()
    if args.json:
        emit_json(found)
    else:
        for name in found:
            emit(name)
    return 0
