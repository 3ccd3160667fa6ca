"""Run the benchmark sections, print the table, write the JSON records.

Sections run in the order their dependencies appear in the stack: the
store first, then the lifecycle on in-memory drivers, replay and audit on
a large generated log, the real host steps (root only), memory. A section
whose dependency is missing or unusable (not root, no PostgreSQL, a driver
not there yet) is skipped with the reason printed, never a crash; an
unexpected error in one section is reported as that section's skip reason
and the others still run. Everything a section makes is removed at the end,
on every path, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from wrenn_engine.bench.common import (
    DEFAULT_PG_URL,
    FULL,
    QUICK,
    SMOKE,
    Scratch,
    SectionSkipped,
    Sizes,
)
from wrenn_engine.bench.report import (
    Report,
    machine_info,
    render_markdown,
    render_table,
)

log = logging.getLogger(__name__)

SECTIONS = ("append", "lifecycle", "replay", "audit", "host", "memory")


@dataclass
class Context:
    """What the sections share within one run."""

    scratch: Scratch
    sizes: Sizes
    pg_url: str
    profile: bool = False
    cache: dict[str, Any] = field(default_factory=dict)

    def template(self) -> Any:
        from wrenn_engine.bench import dataset

        if "template" not in self.cache:
            self.cache["template"] = dataset.record_template(self.scratch)
        return self.cache["template"]

    def big_log(self) -> Any:
        """The large generated log (replay and audit share it): a migrated
        SQLite database with ``sizes.rebuild_events`` events, projections
        empty until the replay section rebuilds them."""
        from wrenn_engine.bench import dataset
        from wrenn_engine.bench.common import sqlite_url
        from wrenn_engine.store import open_store

        if "big_log" not in self.cache:
            template = self.template()
            stream = template.stream(self.sizes.events_per_sandbox)
            sandboxes = max(1, round(self.sizes.rebuild_events / len(stream)))
            path = self.scratch.path("big-log.db")
            open_store(sqlite_url(path), auto_upgrade=True).close()
            started = time.monotonic()
            loaded = dataset.load_engine_log(path, stream,
                                             dataset.LogShape(sandboxes=sandboxes))
            log.info("generated %d events in %.1f s", loaded.events,
                     time.monotonic() - started)
            self.cache["big_log"] = (path, stream, loaded)
        return self.cache["big_log"]


def _append(report: Report, ctx: Context) -> None:
    from wrenn_engine.bench import store

    store.run(report, ctx.scratch, ctx.sizes, ctx.template(), ctx.pg_url,
              profile=ctx.profile)


def _lifecycle(report: Report, ctx: Context) -> None:
    from wrenn_engine.bench import lifecycle

    lifecycle.run(report, ctx)


def _replay(report: Report, ctx: Context) -> None:
    from wrenn_engine.bench import replay

    replay.run(report, ctx)


def _audit(report: Report, ctx: Context) -> None:
    from wrenn_engine.bench import audit

    audit.run(report, ctx)


def _host(report: Report, ctx: Context) -> None:
    from wrenn_engine.bench import host

    host.run(report, ctx)


def _memory(report: Report, ctx: Context) -> None:
    from wrenn_engine.bench import memory

    memory.run(report, ctx)


RUNNERS: dict[str, Callable[[Report, Context], None]] = {
    "append": _append,
    "lifecycle": _lifecycle,
    "replay": _replay,
    "audit": _audit,
    "host": _host,
    "memory": _memory,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m wrenn_engine.bench",
        description="wrenn-engine benchmarks, each figure beside a baseline "
                    "measured in the same run.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smaller sizes; finishes in under a minute")
    size.add_argument("--smoke", action="store_true",
                      help="miniature sizes, for the test suite (numbers "
                           "are meaningless)")
    parser.add_argument("--json", metavar="FILE",
                        help="write one record per figure to FILE")
    parser.add_argument("--markdown", metavar="FILE",
                        help="write the machine, the date and the table as Markdown "
                             "(for docs/performance.md)")
    parser.add_argument("--only", metavar="SECTIONS",
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--pg-url", default=os.environ.get("WRENN_BENCH_PG_URL",
                                                           DEFAULT_PG_URL),
                        help="PostgreSQL server to make a scratch database on "
                             "(default: $WRENN_BENCH_PG_URL or %(default)s)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the engine's side of sections whose "
                             "goal is not met and print the hot spots")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in SECTIONS]
        if unknown:
            parser.error(f"unknown section(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(SECTIONS)}")
        args.sections = wanted
    else:
        args.sections = list(SECTIONS)
    return args


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed (goals met or not), 1 when
    cleanup left something behind, 130 on interrupt."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    # The state machine library narrates every callback at INFO.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    report = Report(mode=sizes.name, machine=machine_info())
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    scratch = Scratch()
    ctx = Context(scratch, sizes, args.pg_url, profile=args.profile)
    status = 0
    started = time.monotonic()
    try:
        print(f"wrenn-engine bench ({sizes.name}) on {report.machine['nproc']} cores, "
              f"{report.machine['cpu']}; scratch {scratch.root}", flush=True)
        for section in args.sections:
            _run_section(report, ctx, section)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr, flush=True)
        status = 130
    finally:
        problems = scratch.close()
        report.made = [f"directory {scratch.root}", *scratch.made]
        signal.signal(signal.SIGTERM, previous)
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)
        if problems and status == 0:
            status = 1

    report.machine["elapsed_s"] = round(time.monotonic() - started, 1)
    _print(report)
    if args.json:
        report.write_json(args.json)
        print(f"\nwrote {len(report.figures)} records to {args.json}")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as out:
            out.write(markdown_report(report))
        print(f"wrote the Markdown table to {args.markdown}")
    return status


def _run_section(report: Report, ctx: Context, section: str) -> None:
    started = time.monotonic()
    print(f"- {section} ...", flush=True)
    try:
        RUNNERS[section](report, ctx)
    except SectionSkipped as exc:
        report.skip(section, str(exc))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one broken section must not hide the others
        log.debug("section %s failed", section, exc_info=True)
        report.skip(section, f"failed: {type(exc).__name__}: {exc}")
        report.findings.append(
            f"{section} failed:\n" + "".join(traceback.format_exception(exc)[-6:])
        )
    print(f"  {section} took {time.monotonic() - started:.1f} s", flush=True)


def _print(report: Report) -> None:
    print()
    if report.figures:
        print(render_table(report.figures))
    for skipped in report.skipped:
        print(f"skipped {skipped.section}: {skipped.reason}")
    unmet = report.unmet()
    if unmet:
        print("\ngoals not met:")
        for fig in unmet:
            print(f"  {fig.section}: {fig.name} ({fig.goal.text if fig.goal else ''})")
    for finding in report.findings:
        print(f"\n{finding}")
    print(f"\nfinished in {report.machine.get('elapsed_s')} s; load average now "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def markdown_report(report: Report) -> str:
    """The machine, the date, the table, the skips and the unmet goals."""
    m = report.machine
    lines = [
        f"Measured {report.started_at:%Y-%m-%d %H:%M} UTC, `{report.mode}` sizes, "
        f"in {m.get('elapsed_s')} s.",
        "",
        f"- machine: {m.get('nproc')} cores, {m.get('cpu')}, {m.get('ram_gib')} GiB "
        f"RAM, Linux {m.get('kernel')}, Python {m.get('python')}",
        f"- load average when it started: {m.get('load_average')}",
        "",
        render_markdown(report.figures),
        "",
    ]
    for skipped in report.skipped:
        lines.append(f"- skipped {skipped.section}: {skipped.reason}")
    unmet = report.unmet()
    if unmet:
        lines += ["", "Goals not met in this run:", ""]
        lines += [f"- {f.section}: {f.name} ({f.goal.text if f.goal else ''})"
                  for f in unmet]
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.exit(run())
