"""Section 6: resident size of an engine tracking many sandboxes.

The log holds ``sizes.memory_sandboxes`` running sandboxes (create and
start from the template lifecycle, each on a network slot of its own),
bulk-inserted, projections rebuilt. Each measurement runs in a fresh
interpreter (``--probe``), so nothing another section allocated counts:

- engine: import the engine, note the RSS, ``Engine.open`` the database
  (in-memory host drivers, reconcile and workers off: nothing appended) and
  keep ``engine.list()``, the engine's picture of every sandbox; note the
  RSS again.
- baseline: the same imports, then plain ``sqlite3`` reading the same
  ``sandboxes`` rows and ``json.loads`` of each snapshot: the same data as
  plain dicts.

The figure is the growth of the resident size between the two notes.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from typing import Any

from wrenn_engine.bench import dataset
from wrenn_engine.bench.common import Scratch, rss_bytes, sqlite_url
from wrenn_engine.bench.report import Figure, Report
from wrenn_engine.store import open_store

SECTION = "memory"
MIB = 1024 * 1024


def _probe_engine(db_path: str, work: str) -> dict[str, int]:
    from wrenn_engine.bench.common import Scratch as _Scratch
    from wrenn_engine.engine import Engine
    from wrenn_engine.host.fake import FakeHost

    scratch = _Scratch(root=work)
    files = dataset.fake_files(scratch, "probe")
    settings = dataset.fake_settings(files, host_id="host-00", reconcile_on_open=False)
    gc.collect()
    before = rss_bytes()
    engine = Engine.open(sqlite_url(db_path), drivers=FakeHost().drivers(),
                         settings=settings)
    sandboxes = engine.list()
    gc.collect()
    after = rss_bytes()
    count = len(sandboxes)
    engine.close()
    return {"before": before, "after": after, "sandboxes": count}


def _probe_rows(db_path: str) -> dict[str, int]:
    import sqlite3

    import wrenn_engine.engine  # noqa: F401 - the same imports as the engine probe
    from wrenn_engine.host.fake import FakeHost  # noqa: F401

    gc.collect()
    before = rss_bytes()
    conn = sqlite3.connect(db_path)
    rows = [
        {"id": i, "state": s, "version": v, "host_id": h, "snapshot": json.loads(snap)}
        for i, s, v, h, snap in conn.execute(
            "SELECT id, state, version, host_id, snapshot FROM sandboxes")
    ]
    gc.collect()
    after = rss_bytes()
    conn.close()
    return {"before": before, "after": after, "sandboxes": len(rows)}


def _run_probe(mode: str, db_path: str, work: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-m", "wrenn_engine.bench.memory", "--probe", mode, db_path,
         work],
        check=True, capture_output=True, text=True, timeout=600,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run(report: Report, ctx: Any) -> None:
    scratch: Scratch = ctx.scratch
    template: dataset.Template = ctx.template()
    count = ctx.sizes.memory_sandboxes
    path = scratch.path("memory.db")
    open_store(sqlite_url(path), auto_upgrade=True).close()
    dataset.load_engine_log(path, template.running(),
                            dataset.LogShape(sandboxes=count, hosts=1), slots=True)
    store = open_store(sqlite_url(path))
    try:
        store.rebuild_projections()
    finally:
        store.close()

    work = scratch.mkdir("memory-probe")
    engine = _run_probe("engine", path, work)
    rows = _run_probe("rows", path, work)
    for probe in (engine, rows):
        if probe["sandboxes"] != count:
            raise RuntimeError(f"a memory probe saw {probe['sandboxes']} sandboxes, "
                               f"{count} were loaded")

    grown = (engine["after"] - engine["before"]) / MIB
    plain = (rows["after"] - rows["before"]) / MIB
    report.add(Figure(
        SECTION, f"RSS growth tracking {count:,} running sandboxes", grown, "MiB",
        "plain sqlite3 rows + json.loads of the same snapshots", plain,
        note="fresh interpreter per probe; Engine.open + engine.list() kept",
    ))
    report.add(Figure(
        SECTION, "per sandbox", grown * MIB / count / 1024, "KiB",
        "plain dicts of the same data", plain * MIB / count / 1024,
    ))
    report.add(Figure(
        SECTION, "engine process resident size", engine["after"] / MIB, "MiB",
        "the baseline process (same imports, plain rows)", rows["after"] / MIB,
    ))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="memory probe (internal)")
    parser.add_argument("--probe", choices=("engine", "rows"), required=True)
    parser.add_argument("db")
    parser.add_argument("work")
    args = parser.parse_args(argv)
    if args.probe == "engine":
        result = _probe_engine(args.db, args.work)
    else:
        result = _probe_rows(args.db)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
