"""Upcasters: lift stored events of an older schema version to today's shape.

An upcaster is registered for one event type and one schema version and
returns the data at the next version. Reading an event applies upcasters
one version at a time until the current version is reached. A type nobody
knows, or a version with no path to the current one, raises
UnknownEventError naming the stream and version; nothing is ever skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wrenn_engine.domain.events import EVENT_TYPES
from wrenn_engine.errors import UnknownEventError

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

#: (event type, from schema version) -> function producing version + 1.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Decorator: register ``fn`` to lift ``event_type`` from ``from_version``."""

    def register(fn: Upcaster) -> Upcaster:
        key = (event_type, from_version)
        if key in UPCASTERS:
            raise ValueError(f"an upcaster for {event_type} v{from_version} exists")
        UPCASTERS[key] = fn
        return fn

    return register


def current_version(event_type: str) -> int | None:
    cls = EVENT_TYPES.get(event_type)
    return cls.schema_version if cls is not None else None


def upcast(
    stream_id: str,
    version: int,
    event_type: str,
    schema_version: int,
    data: dict[str, Any],
) -> tuple[int, dict[str, Any]]:
    """Return ``(current schema version, data in the current shape)``."""
    target = current_version(event_type)
    if target is None or schema_version > target or schema_version < 1:
        raise UnknownEventError(stream_id, version, event_type, schema_version)
    while schema_version < target:
        step = UPCASTERS.get((event_type, schema_version))
        if step is None:
            raise UnknownEventError(stream_id, version, event_type, schema_version)
        data = step(dict(data))
        schema_version += 1
    return schema_version, data


# --- the project's own upcasters ------------------------------------------------
#
# None yet: every event type is at schema version 1. When a shape changes,
# bump the class's ``schema_version`` and register, below this comment, a
# function decorated with ``upcaster(<type>, <old version>)`` that returns the
# data in the next version's shape (for instance with a new field's default
# filled in). tests/store/test_upcasting.py shows one end to end.
