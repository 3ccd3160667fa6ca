"""Figures, goals and how they are printed and written.

Every figure stands beside a baseline measured in the same run, on the same
machine, because the machines these run on are noisy: the ratio says more
than the absolute number. ``ratio`` is always ``value / baseline_value``;
``better`` says which direction is good (``lower`` for times, ``higher`` for
rates), so a ratio of 1.2 on a time is 20 % slower than the baseline.

A goal is either on the value (``value < 2 ms``) or on the ratio (``ratio <=
1.5``). ``met`` is True or False when the figure carries one of the issue's
goals, and None (JSON null) when it is reported for information only.
"""

from __future__ import annotations

import json
import math
import operator
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True, slots=True)
class Goal:
    """A target from the issue: ``on`` is ``value`` or ``ratio``."""

    on: str
    op: str
    threshold: float
    text: str

    def met(self, value: float, ratio: float | None) -> bool | None:
        subject = value if self.on == "value" else ratio
        if subject is None or math.isnan(subject):
            return None
        return _OPS[self.op](subject, self.threshold)


def value_goal(op: str, threshold: float, unit: str) -> Goal:
    return Goal("value", op, threshold, f"{op} {_number(threshold)} {unit}")


def ratio_goal(op: str, threshold: float, text: str) -> Goal:
    return Goal("ratio", op, threshold, f"ratio {op} {_number(threshold)} ({text})")


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured number beside its same-run baseline."""

    section: str
    name: str
    value: float
    unit: str
    baseline: str
    baseline_value: float | None
    better: str = "lower"
    goal: Goal | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline_value is None or self.baseline_value == 0:
            return None
        return self.value / self.baseline_value

    @property
    def met(self) -> bool | None:
        return self.goal.met(self.value, self.ratio) if self.goal else None

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON record of a figure."""
        ratio = self.ratio
        return {
            "section": self.section,
            "name": self.name,
            "value": _finite(self.value),
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_value": _finite(self.baseline_value),
            "ratio": _finite(ratio),
            "better": self.better,
            "goal": self.goal.text if self.goal else None,
            "met": self.met,
            "note": self.note,
        }


#: The fields every JSON record has (the smoke test checks them).
RECORD_FIELDS = ("section", "name", "value", "unit", "baseline", "baseline_value",
                 "ratio", "better", "goal", "met", "note")


@dataclass(frozen=True, slots=True)
class Skipped:
    """A section (or part of one) that did not run, and why."""

    section: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"section": self.section, "reason": self.reason}


@dataclass(slots=True)
class Report:
    """Everything one run measured, skipped and learned."""

    mode: str
    figures: list[Figure] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    machine: dict[str, Any] = field(default_factory=dict)
    #: What the run created outside its scratch directory (all removed).
    made: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def skip(self, section: str, reason: str) -> None:
        self.skipped.append(Skipped(section, reason))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "started_at": self.started_at.isoformat(),
            "machine": self.machine,
            "figures": [f.to_dict() for f in self.figures],
            "skipped": [s.to_dict() for s in self.skipped],
            "findings": self.findings,
            "made": self.made,
        }

    def write_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(self.to_dict(), out, indent=2)
            out.write("\n")

    def unmet(self) -> list[Figure]:
        return [f for f in self.figures if f.met is False]


def machine_info() -> dict[str, Any]:
    """The machine a run was measured on: cores, CPU, memory, kernel, Python."""
    import os

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor()
    mem_kb = 0
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "load_average": [round(x, 2) for x in load],
    }


# --- printing -----------------------------------------------------------------------


def render_table(figures: Sequence[Figure]) -> str:
    """A plain-text table: one line per figure, grouped by section."""
    header = ("figure", "value", "baseline", "ratio", "goal", "met")
    rows: list[tuple[str, ...]] = []
    section = None
    for fig in figures:
        if fig.section != section:
            section = fig.section
            rows.append((f"[{section}]", "", "", "", "", ""))
        base = (f"{_number(fig.baseline_value)} {fig.unit}"
                if fig.baseline_value is not None else "-")
        rows.append((
            f"  {fig.name}",
            f"{_number(fig.value)} {fig.unit}",
            f"{base}  ({fig.baseline})",
            _number(fig.ratio) + "x" if fig.ratio is not None else "-",
            fig.goal.text if fig.goal else "-",
            {True: "yes", False: "NO", None: "-"}[fig.met],
        ))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    widths[2] = min(widths[2], 70)
    lines = [_line(header, widths), _line(tuple("-" * w for w in widths), widths)]
    lines += [_line(r, widths) for r in rows]
    return "\n".join(lines)


def render_markdown(figures: Sequence[Figure]) -> str:
    """The same table in Markdown, for docs/performance.md."""
    lines = ["| figure | value | baseline (same run) | ratio | goal | met |",
             "|---|---:|---|---:|---|---|"]
    for fig in figures:
        base = (f"{_number(fig.baseline_value)} {fig.unit}: {fig.baseline}"
                if fig.baseline_value is not None else fig.baseline)
        ratio = _number(fig.ratio) + "x" if fig.ratio is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[fig.met]
        goal = fig.goal.text if fig.goal else "-"
        lines.append(f"| {fig.section}: {fig.name} | {_number(fig.value)} {fig.unit} "
                     f"| {base} | {ratio} | {goal} | {met} |")
    return "\n".join(lines)


def _line(cells: tuple[str, ...], widths: list[int]) -> str:
    out = []
    for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
        text = cell if len(cell) <= width else cell[: width - 1] + "…"
        out.append(text.rjust(width) if i in (1, 3) else text.ljust(width))
    return "  ".join(out).rstrip()


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 100_000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _finite(value: float | None) -> float | None:
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return round(value, 6)
