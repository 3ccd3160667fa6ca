"""What every section shares: sizes, a scratch area that is always cleaned up,
timing helpers, the PostgreSQL scratch database and realistic event payloads.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)

#: The server the PostgreSQL sections use (trust auth on loopback); the
#: bench makes its own database there and drops it at the end.
DEFAULT_PG_URL = "postgresql+psycopg://root@127.0.0.1:5432/postgres"


class SectionSkipped(Exception):
    """A section (or part of it) cannot run here; the message says why."""


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each section does. ``full`` is the issue's sizes."""

    name: str
    append_single: int  # single-event appends per contender and backend
    append_batches: int  # batches per contender and backend
    batch_size: int
    lifecycles: int
    fold_events: int
    rebuild_events: int  # also the size of the audit log
    events_per_sandbox: int
    audit_queries: int  # per filter
    host_iterations: int
    memory_sandboxes: int

    def scaled(self, **changes: int) -> Sizes:
        return replace(self, **changes)  # type: ignore[arg-type]


FULL = Sizes("full", append_single=1000, append_batches=60, batch_size=100,
             lifecycles=150, fold_events=10_000, rebuild_events=1_000_000,
             events_per_sandbox=100, audit_queries=200, host_iterations=40,
             memory_sandboxes=10_000)
QUICK = Sizes("quick", append_single=200, append_batches=10, batch_size=100,
              lifecycles=25, fold_events=10_000, rebuild_events=100_000,
              events_per_sandbox=100, audit_queries=50, host_iterations=8,
              memory_sandboxes=2_000)
SMOKE = Sizes("smoke", append_single=6, append_batches=2, batch_size=10,
              lifecycles=2, fold_events=300, rebuild_events=2_000,
              events_per_sandbox=50, audit_queries=4, host_iterations=2,
              memory_sandboxes=40)


# --- scratch ----------------------------------------------------------------------


@dataclass
class Scratch:
    """A private directory and a stack of undo callbacks, run on every path.

    Everything a section makes (files, databases, namespaces, processes) is
    registered here the moment it exists; ``close`` runs the callbacks in
    reverse and removes the directory, also after Ctrl-C.
    """

    root: str = ""
    #: Everything registered, in order (kept after close, for the report).
    made: list[str] = field(default_factory=list)
    _undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.root:
            self.root = tempfile.mkdtemp(prefix="wrenn-bench-")

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def mkdir(self, *parts: str) -> str:
        target = self.path(*parts)
        os.makedirs(target, exist_ok=True)
        return target

    def on_close(self, what: str, undo: Callable[[], None]) -> None:
        self.made.append(what)
        self._undo.append((what, undo))

    def close(self) -> list[str]:
        """Undo everything; return what could not be undone (and why).

        SIGINT and SIGTERM are held off while it runs (a second Ctrl-C must
        not leave half the cleanup undone) and every undo is tried even if
        an earlier one failed.
        """
        problems: list[str] = []
        held = _hold_signals()
        try:
            while self._undo:
                what, undo = self._undo.pop()
                try:
                    undo()
                except BaseException as exc:  # keep cleaning up; report at the end
                    problems.append(f"{what}: {type(exc).__name__}: {exc}")
        finally:
            _restore_signals(held)
        shutil.rmtree(self.root, ignore_errors=True)
        if os.path.exists(self.root):
            problems.append(f"{self.root} is still there")
        return problems


def _hold_signals() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, signal.SIG_IGN)
            for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(held: dict[int, Any]) -> None:
    for sig, handler in held.items():
        signal.signal(sig, handler)


# --- timing -----------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN when empty."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def settle() -> None:
    """Collect garbage before a timed loop, so the previous work's garbage is
    not collected on the clock. The GC stays on while timing: production
    runs with it, and both sides of every ratio pay it alike."""
    gc.collect()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rss_bytes() -> int:
    """This process's resident set size, from /proc."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --- PostgreSQL ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PgDatabase:
    """A scratch database: its SQLAlchemy URL and its psycopg connection info."""

    name: str
    url: str
    conninfo: dict[str, Any]


def pg_scratch_database(scratch: Scratch, admin_url: str) -> PgDatabase:
    """Create ``wrenn_bench_<random>`` on the server at ``admin_url``.

    Raises SectionSkipped when the server cannot be reached; registers the
    drop (WITH (FORCE), so leftover connections do not keep it alive).
    """
    import psycopg
    import sqlalchemy as sa

    parsed = sa.engine.make_url(admin_url)
    conninfo: dict[str, Any] = {
        "host": parsed.host or "127.0.0.1",
        "port": parsed.port or 5432,
        "user": parsed.username or "postgres",
        "dbname": parsed.database or "postgres",
        "connect_timeout": 5,
    }
    if parsed.password:
        conninfo["password"] = parsed.password
    name = f"wrenn_bench_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(**conninfo, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise SectionSkipped(
            f"PostgreSQL at {parsed.render_as_string(hide_password=True)} is not "
            f"usable: {str(exc).strip().splitlines()[0] if str(exc) else exc}"
        ) from exc

    def drop() -> None:
        with psycopg.connect(**conninfo, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    scratch.on_close(f"PostgreSQL database {name}", drop)
    url = parsed.set(drivername="postgresql+psycopg", database=name)
    return PgDatabase(name, url.render_as_string(hide_password=False),
                      {**conninfo, "dbname": name})


def sqlite_url(path: str) -> str:
    return f"sqlite:///{path}"
