"""The benchmark runs end to end at miniature sizes and writes its records.

No timing is asserted here (speed goals belong to the benchmark itself):
the test checks that every section either produced figures or said why it
was skipped, that every JSON record has the documented fields and types,
that goals evaluate into ``met``, and that the run left nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wrenn_engine.bench.report import (
    RECORD_FIELDS,
    Figure,
    ratio_goal,
    render_markdown,
    render_table,
    value_goal,
)

ROOT = Path(__file__).resolve().parent.parent
#: The JSON the smoke run wrote, and what it printed.
Run = tuple[dict[str, Any], str]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    base = tmp_path_factory.mktemp("bench")
    out, markdown = base / "bench.json", base / "bench.md"
    done = subprocess.run(
        [sys.executable, "-m", "wrenn_engine.bench", "--smoke", "--json", str(out),
         "--markdown", str(markdown)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| figure | value |" in markdown.read_text()
    return json.loads(out.read_text()), done.stdout


def test_every_record_has_the_documented_fields(smoke_run: Run) -> None:
    data, _ = smoke_run
    assert data["mode"] == "smoke"
    assert data["figures"], "the smoke run produced no figures"
    for record in data["figures"]:
        assert set(RECORD_FIELDS) <= set(record), record
        assert isinstance(record["name"], str) and record["name"]
        assert isinstance(record["unit"], str) and record["unit"]
        assert isinstance(record["baseline"], str) and record["baseline"]
        assert isinstance(record["value"], int | float), record
        # Every figure stands beside a baseline from the same run.
        assert isinstance(record["baseline_value"], int | float), record
        assert record["ratio"] is None or isinstance(record["ratio"], int | float)
        assert record["better"] in ("lower", "higher")
        assert record["met"] in (True, False, None)
        assert (record["goal"] is None) == (record["met"] is None), record


def test_every_section_ran_or_says_why(smoke_run: Run) -> None:
    data, _ = smoke_run
    produced = {r["section"] for r in data["figures"]}
    skipped = {s["section"].split()[0]: s["reason"] for s in data["skipped"]}
    for section in ("append", "lifecycle", "replay", "audit", "host", "memory"):
        assert section in produced or section in skipped, section
    for reason in skipped.values():
        assert reason.strip()
        assert not reason.startswith("failed:"), reason
    # The store sections need nothing outside the venv: they always run.
    for section in ("append", "lifecycle", "replay", "audit", "memory"):
        assert section in produced, data["skipped"]
    names = {r["name"] for r in data["figures"]}
    assert "sqlite single: engine vs eventsourcing" in names
    if "append postgresql" not in skipped:
        assert "postgresql single: engine vs plain driver" in names
    if os.geteuid() != 0:
        assert "host" in skipped


def test_the_goals_of_the_issue_are_evaluated(smoke_run: Run) -> None:
    data, _ = smoke_run
    goals = {r["name"]: r for r in data["figures"] if r["goal"] is not None}
    assert any(name.endswith("engine vs plain driver") for name in goals)
    assert any(name.startswith("own cost: start") for name in goals)
    assert any(name.startswith("fold ") for name in goals)
    for record in goals.values():
        assert isinstance(record["met"], bool)


def test_the_run_leaves_nothing_behind(smoke_run: Run) -> None:
    data, _ = smoke_run
    made = data["made"]
    assert made and made[0].startswith("directory /")
    assert not os.path.exists(made[0].split(" ", 1)[1])

    namespaces = set(subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False,
    ).stdout.split())
    for what in made:
        if what.startswith("namespace "):
            assert what.split()[1] not in namespaces, what
        if what.startswith("namespaces ") and what.endswith("-*"):
            prefix = what.split()[1][:-1]
            assert not [n for n in namespaces if n.startswith(prefix)], what

    created = [w.split()[-1] for w in made if w.startswith("PostgreSQL database ")]
    if created:
        found = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-U", "root", "-d", "postgres", "-Atc",
             "SELECT datname FROM pg_database"],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        assert not set(created) & set(found)


def test_goals_and_tables() -> None:
    time_goal = value_goal("<", 2.0, "ms")
    slow = Figure("s", "slow", 3.0, "ms", "plain", 1.0, goal=time_goal)
    fast = Figure("s", "fast", 1.0, "ms", "plain", 2.0,
                  goal=ratio_goal("<=", 1.5, "within 1.5x"))
    info = Figure("s", "info", 5.0, "MiB", "dicts", 0.0)
    assert slow.met is False and slow.ratio == 3.0
    assert fast.met is True and fast.ratio == 0.5
    assert info.met is None and info.ratio is None
    assert info.to_dict()["goal"] is None
    table = render_table([slow, fast, info])
    assert "NO" in table and "yes" in table
    assert "| s: slow |" in render_markdown([slow])
