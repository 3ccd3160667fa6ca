"""Hot spots of a workload, with cProfile: where a missed goal goes."""

from __future__ import annotations

import cProfile
import io
import os
import pstats
from collections.abc import Callable
from typing import Any


def hot_spots(fn: Callable[[], Any], title: str, top: int = 14) -> str:
    """Run ``fn`` under cProfile; the functions with the most own time, and
    the engine's functions with the most cumulative time, as text."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        fn()
    finally:
        profiler.disable()

    stats = pstats.Stats(profiler)
    rows: list[tuple[float, float, int, str]] = []
    for (path, line, func), (_cc, calls, own, cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((own, cum, calls, f"{_short(path)}:{line}:{func}"))
    total = sum(r[0] for r in rows) or 1.0

    out = io.StringIO()
    out.write(f"profile of {title} (total {total:.3f} s of CPU)\n")
    out.write("  most own time:\n")
    for own, cum, calls, where in sorted(rows, reverse=True)[:top]:
        out.write(f"    {own / total:6.1%} own {cum:7.3f} s cum {calls:>8} calls  "
                  f"{where}\n")
    out.write("  engine functions by cumulative time:\n")
    ours = [r for r in rows if "wrenn_engine/" in r[3] and "/bench/" not in r[3]]
    for own, cum, calls, where in sorted(ours, key=lambda r: r[1], reverse=True)[:top]:
        out.write(f"    {cum / total:6.1%} cum {own:7.3f} s own {calls:>8} calls  "
                  f"{where}\n")
    return out.getvalue()


def _short(path: str) -> str:
    for marker in ("site-packages/", "wrenn_engine/", "lib/python3"):
        at = path.find(marker)
        if at >= 0:
            return path[at + (len(marker) if marker != "wrenn_engine/" else 0):]
    return os.path.basename(path)
