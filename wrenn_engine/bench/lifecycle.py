"""Section 2: full lifecycles on in-memory host drivers: what the engine costs.

Each lifecycle is create (``start=False``), start, pause, resume, destroy on
``FakeHost``, so every microsecond is the engine's: the state machine, the
step pipelines, the appends and their projections. Two runs:

- durable: the store as shipped (SQLite, WAL, ``synchronous`` as the store
  sets it). Baseline: plain ``sqlite3`` replaying the very same commits
  (same rows, same grouping, same pragmas) into the same schema: the cost
  of the durable writes alone, the floor no engine on this disk can beat
  without writing fewer commits.
- the engine's own cost: the same, with the store's SQLite flushes turned
  off (``synchronous=OFF``), so what remains is the engine's CPU and the
  database's, not the disk's. Baseline: the same plain replay, also
  without flushes. The issue's goal (under 2 ms per transition at p50)
  is judged on this run.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from wrenn_engine.bench import dataset
from wrenn_engine.bench.common import Scratch, percentile, settle, sqlite_url
from wrenn_engine.bench.profiling import hot_spots
from wrenn_engine.bench.report import Figure, Report, value_goal
from wrenn_engine.engine import Engine
from wrenn_engine.host.fake import FakeHost
from wrenn_engine.store import open_store
from wrenn_engine.store.sql import SqlEventStore

SECTION = "lifecycle"
COMMANDS = ("create", "start", "pause", "resume", "destroy")

_INSERT = (
    "INSERT INTO events (stream_id, version, type, schema_version, data, actor, "
    "host_id, command_id, correlation_id, causation_id, recorded_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class Commit:
    """One durable transaction of the template lifecycle."""

    command: str
    first_version: int
    events: tuple[dataset.TemplateEvent, ...]


def template_commits(scratch: Scratch) -> list[Commit]:
    """The commits one lifecycle makes, grouped as the engine grouped them
    (events of one append share their recorded time) and labelled by the
    command they belong to."""
    files = dataset.fake_files(scratch, "lifecycle-template")
    engine = dataset.open_fake_engine(
        sqlite_url(scratch.path("lifecycle-template", "engine.db")), files)
    try:
        sandbox_id = _one_lifecycle(engine, files, {})
        history = engine.store.read_stream(sandbox_id)
    finally:
        engine.close()

    labelled: list[tuple[str, Any]] = []
    command = "create"
    for event in history:
        if event.type == "transition.started":
            command = event.data["transition"]
        labelled.append((command, event))

    commits: list[Commit] = []
    group: list[tuple[str, Any]] = []
    for command, event in labelled:
        if group and (group[-1][1].recorded_at != event.recorded_at
                      or group[-1][0] != command):
            commits.append(_commit(group, sandbox_id))
            group = []
        group.append((command, event))
    if group:
        commits.append(_commit(group, sandbox_id))
    return commits


def _commit(group: list[tuple[str, Any]], sandbox_id: str) -> Commit:
    events = tuple(
        dataset.TemplateEvent(e.type, e.schema_version,
                              json.dumps(e.data).replace(sandbox_id, dataset.SID),
                              e.metadata)
        for _command, e in group
    )
    return Commit(group[0][0], group[0][1].version, events)


def _one_lifecycle(engine: Engine, files: dataset.FakeFiles,
                   samples: dict[str, list[float]]) -> str:
    """create, start, pause, resume, destroy; each command's seconds into
    ``samples``. Returns the sandbox id."""
    clock = time.perf_counter
    t0 = clock()
    sandbox = engine.create(kernel_path=files.kernel, rootfs_path=files.image,
                            start=False)
    t1 = clock()
    engine.start(sandbox.id)
    t2 = clock()
    engine.pause(sandbox.id)
    t3 = clock()
    engine.resume(sandbox.id)
    t4 = clock()
    engine.destroy(sandbox.id)
    t5 = clock()
    for name, seconds in zip(COMMANDS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
                             strict=True):
        samples.setdefault(name, []).append(seconds)
    return sandbox.id


def _lifecycles(engine: Engine, files: dataset.FakeFiles, count: int) -> None:
    for _ in range(count):
        _one_lifecycle(engine, files, {})


class PlainReplay:
    """Plain sqlite3 making the same commits into the same schema."""

    def __init__(self, path: str, synchronous: str) -> None:
        open_store(sqlite_url(path), auto_upgrade=True).close()
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {synchronous}")
        self.count = 0

    def lifecycle(self, commits: list[Commit], samples: dict[str, list[float]]) -> None:
        self.count += 1
        sid = dataset.sandbox_id(self.count)
        prepared = [
            (c.command, c.first_version,
             [(e, json.loads(dataset.rewrite(e.text, sid))) for e in c.events])
            for c in commits
        ]
        spent: dict[str, float] = {}
        for command, first, events in prepared:
            start = time.perf_counter()
            now = datetime.now(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
            rows = [
                (sid, first + i, e.type, e.schema_version, json.dumps(data),
                 e.metadata.actor, e.metadata.host_id, e.metadata.command_id,
                 e.metadata.correlation_id, e.metadata.causation_id, now)
                for i, (e, data) in enumerate(events)
            ]
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(_INSERT, rows)
            self.conn.execute("COMMIT")
            spent[command] = spent.get(command, 0.0) + time.perf_counter() - start
        for command, seconds in spent.items():
            samples.setdefault(command, []).append(seconds)

    def close(self) -> None:
        self.conn.close()


def _engine(scratch: Scratch, tag: str, synchronous: str | None
            ) -> tuple[Engine, dataset.FakeFiles]:
    files = dataset.fake_files(scratch, tag)
    url = sqlite_url(scratch.path(tag, "engine.db"))
    if synchronous is None:
        return dataset.open_fake_engine(url, files), files
    open_store(url, auto_upgrade=True).close()
    store = SqlEventStore(url, sqlite_synchronous=synchronous)
    host = FakeHost()
    settings = dataset.fake_settings(files)
    return Engine(store, host.drivers(), settings), files


def _measure(engine: Engine, files: dataset.FakeFiles, plain: PlainReplay,
             commits: list[Commit], lifecycles: int
             ) -> tuple[dict[str, list[float]], dict[str, list[float]], float, float]:
    """Alternate engine and plain lifecycles; per-command samples and the
    wall time of each side."""
    ours: dict[str, list[float]] = {}
    floor: dict[str, list[float]] = {}
    ours_s = floor_s = 0.0
    _one_lifecycle(engine, files, {})  # warm-up: caches, first slot, directories
    plain.lifecycle(commits, {})
    settle()
    for _ in range(lifecycles):
        start = time.perf_counter()
        _one_lifecycle(engine, files, ours)
        ours_s += time.perf_counter() - start
        start = time.perf_counter()
        plain.lifecycle(commits, floor)
        floor_s += time.perf_counter() - start
    return ours, floor, ours_s, floor_s


def run(report: Report, ctx: Any) -> None:
    scratch: Scratch = ctx.scratch
    lifecycles = ctx.sizes.lifecycles
    commits = template_commits(scratch)
    per_lifecycle = sum(len(c.events) for c in commits)
    note = (f"{lifecycles} lifecycles; {len(commits)} commits and {per_lifecycle} "
            "events each")

    for mode, synchronous, plain_sync in (("durable", None, "FULL"),
                                          ("own cost", "OFF", "OFF")):
        engine, files = _engine(scratch, f"lifecycle-{mode.replace(' ', '-')}",
                                synchronous)
        if synchronous is None:
            plain_sync = _store_synchronous(engine)
        plain = PlainReplay(scratch.path(f"plain-{plain_sync}.db"), plain_sync)
        try:
            ours, floor, ours_s, floor_s = _measure(engine, files, plain, commits,
                                                    lifecycles)
            _figures(report, mode, ours, floor, ours_s, floor_s, lifecycles, note,
                     plain_sync)
            if ctx.profile and synchronous is not None and any(
                    f.met is False for f in report.figures if f.section == SECTION):
                report.findings.append(hot_spots(
                    functools.partial(_lifecycles, engine, files, 20),
                    "20 lifecycles on FakeHost, SQLite synchronous=OFF"))
        finally:
            plain.close()
            engine.close()


def _store_synchronous(engine: Engine) -> str:
    sql_engine = getattr(engine.store, "engine", None)
    if sql_engine is None:
        return "FULL"
    with sql_engine.connect() as conn:
        value = int(conn.exec_driver_sql("PRAGMA synchronous").scalar() or 2)
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[value]


def _figures(report: Report, mode: str, ours: dict[str, list[float]],
             floor: dict[str, list[float]], ours_s: float, floor_s: float,
             lifecycles: int, note: str, plain_sync: str) -> None:
    base = f"plain sqlite3, same commits, synchronous={plain_sync}"
    report.add(Figure(
        SECTION, f"{mode}: lifecycles per second", lifecycles / ours_s, "1/s", base,
        lifecycles / floor_s, better="higher", note=note,
    ))
    own = mode == "own cost"
    for command in COMMANDS:
        report.add(Figure(
            SECTION, f"{mode}: {command} p50", percentile(ours[command], 50) * 1e3,
            "ms", base, percentile(floor[command], 50) * 1e3,
            goal=value_goal("<", 2.0, "ms") if own else None,
        ))
        report.add(Figure(
            SECTION, f"{mode}: {command} p99", percentile(ours[command], 99) * 1e3,
            "ms", base, percentile(floor[command], 99) * 1e3,
        ))

