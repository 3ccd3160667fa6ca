"""Section 4: audit queries on the large generated log.

Each filter runs ``store.query(EventQuery(...))`` (a page of 100) many
times with varied arguments: a random sandbox, type, actor, host, a one
hour window, and keyset pages deep in the log (``after_position`` near the
end), alone and combined with a filter.

Baseline: the very statement the store sent (captured from its SQLAlchemy
engine, parameters included) run again through plain ``sqlite3`` on its
own connection, rows fetched as tuples and not decoded. Same SQL, same
plan, same page: the ratio is what the store adds on top of the database
(building the statement, the transaction, decoding and upcasting rows).
It does not say whether the plan is good; the absolute p95 against the
5 ms goal does.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from wrenn_engine.bench import dataset
from wrenn_engine.bench.common import percentile, settle, sqlite_url
from wrenn_engine.bench.report import Figure, Report, value_goal
from wrenn_engine.store import open_store
from wrenn_engine.store.base import EventQuery

SECTION = "audit"
#: A filter whose queries are slow stops after this many seconds (but not
#: before MIN_SAMPLES queries), so one bad plan cannot eat the whole run.
BUDGET_S = 15.0
MIN_SAMPLES = 20


class StatementCapture:
    """Keeps the last statement and parameters an engine sent to its driver."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.last: tuple[str, Any] | None = None
        sa.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, parameters: Any,
              _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            self.last = (statement, parameters)

    def close(self) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._seen)


def _queries(loaded: dataset.LoadedLog, stream: list[dataset.TemplateEvent],
             rng: random.Random) -> dict[str, Callable[[], EventQuery]]:
    shape = loaded.shape
    types = sorted({t.type for t in stream})
    last = loaded.events
    span = loaded.last_time - loaded.first_time
    hour = timedelta(hours=1)

    def window() -> tuple[Any, Any]:
        start = loaded.first_time + (span - hour) * rng.random()
        return start, start + hour

    def deep() -> int:
        return last - rng.randint(100, 2000)

    def sandbox() -> EventQuery:
        index = rng.randrange(shape.sandboxes)
        return EventQuery(sandbox_ids=[dataset.sandbox_id(index)])

    def type_() -> EventQuery:
        return EventQuery(types=[rng.choice(types)])

    def actor() -> EventQuery:
        return EventQuery(actors=[shape.actor_of(rng.randrange(shape.actors))])

    def host() -> EventQuery:
        return EventQuery(host_ids=[shape.host_of(rng.randrange(shape.hosts))])

    def time_range() -> EventQuery:
        since, until = window()
        return EventQuery(since=since, until=until)

    def deep_page() -> EventQuery:
        return EventQuery(after_position=deep())

    def type_deep() -> EventQuery:
        return EventQuery(types=[rng.choice(types)], after_position=deep())

    def actor_deep() -> EventQuery:
        return EventQuery(actors=[shape.actor_of(rng.randrange(shape.actors))],
                          after_position=last - rng.randint(5_000, 20_000))

    def host_window() -> EventQuery:
        since, until = window()
        return EventQuery(host_ids=[shape.host_of(rng.randrange(shape.hosts))],
                          since=since, until=until)

    return {
        "sandbox": sandbox,
        "type": type_,
        "actor": actor,
        "host": host,
        "time range (1 h)": time_range,
        "deep page": deep_page,
        "type + deep page": type_deep,
        "actor + deep page": actor_deep,
        "host + time range": host_window,
    }


def run(report: Report, ctx: Any) -> None:
    path, stream, loaded = ctx.big_log()
    rng = random.Random(6)
    samples = ctx.sizes.audit_queries
    store = open_store(sqlite_url(path))
    engine = getattr(store, "engine", None)
    if engine is None:
        store.close()
        raise RuntimeError("the store exposes no SQLAlchemy engine to capture from")
    capture = StatementCapture(engine)
    plain = sqlite3.connect(path, isolation_level=None)
    try:
        for name, make in _queries(loaded, stream, rng).items():
            ours: list[float] = []
            base: list[float] = []
            rows = 0
            store.query(make())  # warm the statement cache and the pages
            settle()
            budget = time.monotonic() + BUDGET_S
            for taken in range(samples):
                if taken >= MIN_SAMPLES and time.monotonic() > budget:
                    break
                query = make()
                start = time.perf_counter()
                found = store.query(query)
                ours.append(time.perf_counter() - start)
                assert capture.last is not None
                statement, params = capture.last
                start = time.perf_counter()
                cursor = plain.execute(statement, params)
                fetched = cursor.fetchall()
                base.append(time.perf_counter() - start)
                if len(fetched) != len(found):
                    raise RuntimeError(f"audit {name}: the store returned {len(found)} "
                                       f"rows, the same SQL {len(fetched)}")
                rows += len(found)
            note = (f"{len(ours)} queries on {loaded.events:,} events, "
                    f"{rows / len(ours):.0f} rows per page on average")
            goal = value_goal("<", 5.0, "ms") if loaded.events >= 1_000_000 else None
            report.add(Figure(
                SECTION, f"{name} p50", percentile(ours, 50) * 1e3, "ms",
                "the same SQL through plain sqlite3, undecoded",
                percentile(base, 50) * 1e3, note=note,
            ))
            report.add(Figure(
                SECTION, f"{name} p95", percentile(ours, 95) * 1e3, "ms",
                "the same SQL through plain sqlite3, undecoded",
                percentile(base, 95) * 1e3, goal=goal,
                note="" if goal else "the 5 ms goal is for 1,000,000 events "
                                     "(full run)",
            ))
    finally:
        plain.close()
        capture.close()
        store.close()
