"""Failpoints: inject a failure or a crash at a named point of a pipeline.

``WRENN_ENGINE_FAILPOINTS="vm.boot=error,network.prepare.done=crash"``. A
name is a step name (fires before the step's effect) or ``<step>.done``
(after the effect, before its result is recorded). ``error`` makes the step
raise FailpointError; ``crash`` kills the process at once with SIGKILL, with
no cleanup, as a power cut or OOM kill would.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from wrenn_engine.errors import ConfigError, FailpointError

log = logging.getLogger(__name__)

ENV = "WRENN_ENGINE_FAILPOINTS"
ACTIONS = ("error", "crash")


def parse(spec: str) -> dict[str, str]:
    """``"a=error,b.done=crash"`` -> ``{"a": "error", "b.done": "crash"}``."""
    points: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, action = item.partition("=")
        if not sep or action not in ACTIONS or not name:
            raise ConfigError(
                ENV,
                f"{item!r} is not name=action",
                limit=f"actions: {', '.join(ACTIONS)}",
                hint="`wrenn-engine debug failpoints` lists the names",
            )
        points[name] = action
    return points


class Failpoints:
    """The armed failpoints of one engine. Thread-safe."""

    def __init__(self, points: dict[str, str] | None = None):
        self._points = dict(points or {})
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> Failpoints:
        return cls(parse(os.environ.get(ENV, "")))

    def arm(self, name: str, action: str) -> None:
        if action not in ACTIONS:
            raise ConfigError(
                "action",
                f"{action!r} is not a failpoint action",
                limit=", ".join(ACTIONS),
            )
        with self._lock:
            self._points[name] = action

    def disarm(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._points.clear()
            else:
                self._points.pop(name, None)

    def armed(self) -> dict[str, str]:
        with self._lock:
            return dict(self._points)

    def hit(self, name: str, sandbox_id: str) -> None:
        if not self._points:
            return
        with self._lock:
            action = self._points.get(name)
        if action == "error":
            raise FailpointError(name)
        if action == "crash":
            log.warning(
                "sandbox %s: failpoint %s: killing the process", sandbox_id, name
            )
            os.kill(os.getpid(), signal.SIGKILL)


def names(step_names: list[str]) -> list[str]:
    """Every failpoint name for these steps: each step and its ``.done``."""
    out: list[str] = []
    for step in step_names:
        out += [step, f"{step}.done"]
    return out
