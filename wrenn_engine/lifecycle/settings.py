"""Knobs of the lifecycle: timeouts and limits the steps use."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LifecycleSettings:
    #: Seconds to wait for a new VMM's API socket to answer.
    launch_timeout_s: float = 10.0
    #: Seconds for a graceful VM and VMM shutdown before SIGTERM, then SIGKILL.
    shutdown_timeout_s: float = 5.0
    #: How many network slots there are (0 to max_slots - 1).
    max_slots: int = 4096
    #: How many times a step re-plans when its slot was taken concurrently.
    slot_retries: int = 16
