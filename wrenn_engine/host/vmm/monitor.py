"""Following a VMM's ``--event-monitor`` file.

cloud-hypervisor writes one JSON object per lifecycle event: ``timestamp``
(``secs``, ``nanos`` since the VMM started), ``source``, ``event`` and
``properties`` (an object or null). Upstream pretty-prints each object over
several lines and puts a blank line after it; one object per line is read as
well. The reader keeps partial lines until they are complete and skips (with
a warning) text that is not an event.

:func:`read_events` reads the complete events after an offset, for a
poller. :class:`EventMonitor` follows the file from a daemon thread and hands every
event to ``on_event``. It also tells guest-initiated exits apart from the
engine's own stop, which calls :meth:`EventMonitor.expect_shutdown` first:

- ``vm`` ``shutdown`` while no stop is expected: the guest powered off
  (:data:`POWEROFF`);
- ``guest`` ``panic``: the guest kernel panicked (:data:`PANIC`);
- ``vmm`` ``shutdown`` while no stop is expected, or the VMM process gone
  (``is_alive`` returns False) without either: :data:`VMM_EXIT`.

``on_exit`` is called once, with the first of these. Callbacks run on the
monitor's thread; they must not block for long.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: The guest powered off (or the VM was shut down by someone else).
POWEROFF = "poweroff"
#: The guest kernel panicked.
PANIC = "panic"
#: The VMM process went away without the engine asking.
VMM_EXIT = "vmm_exit"

_MAX_PENDING_BYTES = 1024 * 1024
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class VmmEvent:
    """One event of the VMM's event monitor."""

    source: str
    event: str
    secs: int = 0
    nanos: int = 0
    properties: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``source.event``, e.g. ``vm.booted`` or ``guest.panic``."""
        return f"{self.source}.{self.event}"

    @classmethod
    def parse(cls, data: object) -> VmmEvent:
        """An event from a decoded JSON object; ValueError if it is not one."""
        if not isinstance(data, dict):
            raise ValueError("an event is a JSON object")
        source, event = data.get("source"), data.get("event")
        stamp = data.get("timestamp")
        if not isinstance(source, str) or not isinstance(event, str):
            raise ValueError("an event needs string fields source and event")
        if not isinstance(stamp, dict) or not all(
            isinstance(stamp.get(k), int) for k in ("secs", "nanos")
        ):
            raise ValueError("an event needs timestamp {secs, nanos}")
        properties = data.get("properties") or {}
        if not isinstance(properties, dict):
            raise ValueError("event properties are an object or null")
        return cls(
            source,
            event,
            stamp["secs"],
            stamp["nanos"],
            {str(k): str(v) for k, v in properties.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "timestamp": {"secs": self.secs, "nanos": self.nanos},
            "source": self.source,
            "event": self.event,
            "properties": dict(self.properties) or None,
        }


@dataclass(frozen=True, slots=True)
class GuestExit:
    """A VM that ended without the engine asking: how, and the event that said so."""

    kind: str  # POWEROFF, PANIC or VMM_EXIT
    detail: str
    event: VmmEvent | None = None


class EventParser:
    """Splits the event-monitor byte stream into events, tolerating partial lines.

    An object ends on a line that starts at column 0 and ends with ``}``: the
    closing brace of upstream's pretty-printed objects, or a one-line object.
    """

    def __init__(self) -> None:
        self._partial = b""
        self._lines: list[str] = []
        self._fed = 0
        #: Bytes fed so far that end on an event boundary (nothing half-read).
        self.settled = 0
        self.skipped: list[str] = []

    def feed(self, data: bytes) -> list[VmmEvent]:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        events: list[VmmEvent] = []
        for raw in complete:
            self._fed += len(raw) + 1
            event = self._line(raw.decode("utf-8", "replace").rstrip("\r"))
            if event is not None:
                events.append(event)
            if not self._lines:
                self.settled = self._fed
        if len(self._partial) > _MAX_PENDING_BYTES:
            self._skip(self._partial.decode("utf-8", "replace"))
            self._partial = b""
        return events

    def finish(self) -> list[VmmEvent]:
        """Whatever is left once the writer is gone (a last line without newline)."""
        rest, self._partial = self._partial, b""
        events = self.feed(rest + b"\n") if rest.strip() else []
        if self._lines:
            self._skip("\n".join(self._lines))
            self._lines = []
        return events

    def _line(self, line: str) -> VmmEvent | None:
        if not self._lines and not line.strip():
            return None
        self._lines.append(line)
        if line[:1].isspace() or not line.rstrip().endswith("}"):
            if sum(len(x) for x in self._lines) > _MAX_PENDING_BYTES:
                self._skip("\n".join(self._lines))
                self._lines = []
            return None

        text = "\n".join(self._lines)
        self._lines = []
        try:
            return VmmEvent.parse(json.loads(text))
        except ValueError:
            self._skip(text)
            return None

    def _skip(self, text: str) -> None:
        self.skipped.append(text[:200])


def read_events(path: str, offset: int = 0) -> tuple[list[VmmEvent], int]:
    """The complete events in ``path`` after byte ``offset``, and the offset to
    read from next time (after the last complete event).

    For a poller that keeps only an offset between reads. A file shorter
    than ``offset`` was started anew by a new VMM and is read from the start;
    a missing file has no events yet.
    """
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size < offset:
                offset = 0
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    parser = EventParser()
    events = parser.feed(data)
    for text in parser.skipped:
        logger.warning("skipped text in %s that is not an event: %r", path, text)
    return events, offset + parser.settled


def classify(event: VmmEvent, shutdown_expected: bool) -> str | None:
    """The guest-initiated exit ``event`` announces, or None."""
    if event.source == "guest" and event.event == "panic":
        return PANIC
    if shutdown_expected:
        return None
    if event.source == "vm" and event.event == "shutdown":
        return POWEROFF
    if event.source == "vmm" and event.event == "shutdown":
        return VMM_EXIT
    return None


class EventMonitor:
    """Follows ``path`` in a daemon thread; see the module docstring.

    ``is_alive``: called every ``poll_interval`` seconds; once it returns
    False the file is read one last time and the thread ends.
    """

    def __init__(
        self,
        path: str,
        on_event: Callable[[VmmEvent], None],
        *,
        on_exit: Callable[[GuestExit], None] | None = None,
        is_alive: Callable[[], bool] | None = None,
        sandbox_id: str = "",
        poll_interval: float = 0.05,
    ) -> None:
        self.path = path
        self.on_event = on_event
        self.on_exit = on_exit
        self.is_alive = is_alive
        self.sandbox_id = sandbox_id
        self.poll_interval = poll_interval
        self._parser = EventParser()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._shutdown_expected = False
        self._events: list[VmmEvent] = []
        self._exit: GuestExit | None = None
        self._file: Any = None
        self._inode: tuple[int, int] | None = None
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"vmm-events-{sandbox_id or path}"
        )

    # --- control ------------------------------------------------------------

    def start(self) -> EventMonitor:
        self._thread.start()
        return self

    def expect_shutdown(self) -> None:
        """The engine is about to stop the VM: its shutdown is not the guest's."""
        with self._lock:
            self._shutdown_expected = True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following, after reading what is already in the file."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> EventMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what it saw --------------------------------------------------------

    @property
    def events(self) -> list[VmmEvent]:
        with self._lock:
            return list(self._events)

    @property
    def exit(self) -> GuestExit | None:
        with self._lock:
            return self._exit

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # --- the thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._read()
                if self.is_alive is not None and not self.is_alive():
                    self._read()
                    self._finish()
                    self._report(GuestExit(VMM_EXIT, "the VMM process exited"))
                    return
                self._stop.wait(self.poll_interval)
            self._read()
            self._finish()
        finally:
            if self._file is not None:
                self._file.close()

    def _read(self) -> None:
        self._reopen_if_replaced()
        if self._file is None:
            return
        while True:
            data = self._file.read(_READ_CHUNK)
            if not data:
                return
            for event in self._parser.feed(data):
                self._deliver(event)
            self._warn_skipped()

    def _finish(self) -> None:
        for event in self._parser.finish():
            self._deliver(event)
        self._warn_skipped()

    def _reopen_if_replaced(self) -> None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return
        identity = (info.st_dev, info.st_ino)
        truncated = self._file is not None and info.st_size < self._file.tell()
        if identity == self._inode and not truncated:
            return
        if self._file is not None:
            logger.info(
                "sandbox %s: event file %s was replaced or truncated; "
                "reading it from the start",
                self.sandbox_id,
                self.path,
            )
            self._file.close()
        self._file = open(self.path, "rb")  # noqa: SIM115 - held across reads
        self._inode = identity
        self._parser = EventParser()

    def _deliver(self, event: VmmEvent) -> None:
        with self._lock:
            self._events.append(event)
            kind = classify(event, self._shutdown_expected)
        logger.debug("sandbox %s: VMM event %s", self.sandbox_id, event.name)
        try:
            self.on_event(event)
        except Exception:
            logger.exception(
                "sandbox %s: on_event failed for %s", self.sandbox_id, event.name
            )
        if kind is not None:
            self._report(GuestExit(kind, f"event {event.name}", event))

    def _report(self, notice: GuestExit) -> None:
        with self._lock:
            if self._exit is not None or (
                notice.kind == VMM_EXIT
                and notice.event is None
                and self._shutdown_expected
            ):
                return
            self._exit = notice
        logger.warning(
            "sandbox %s: VM ended without the engine asking: %s (%s)",
            self.sandbox_id,
            notice.kind,
            notice.detail,
        )
        if self.on_exit is not None:
            try:
                self.on_exit(notice)
            except Exception:
                logger.exception("sandbox %s: on_exit failed", self.sandbox_id)

    def _warn_skipped(self) -> None:
        while self._parser.skipped:
            text = self._parser.skipped.pop(0)
            logger.warning(
                "sandbox %s: skipped text in %s that is not an event: %r",
                self.sandbox_id,
                self.path,
                text,
            )
