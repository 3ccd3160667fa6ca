"""Realistic events, fast: one real lifecycle on in-memory drivers, replicated.

The template is the history of one sandbox that the engine itself wrote
(create, start, pause, resume, destroy on ``FakeHost``): real types, real
payload shapes and sizes, real metadata. Large logs are that history copied
for many sandboxes with their ids, actors, hosts, correlation ids and times
rewritten, and bulk-inserted with plain ``sqlite3`` (generation time is not
part of any figure). Streams are interleaved in waves of sandboxes, as a
busy host writes them, so one sandbox's events are spread over the log.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from wrenn_engine.bench.common import Scratch, sqlite_url
from wrenn_engine.domain.events import Metadata, NewEvent, RecordedEvent
from wrenn_engine.engine import Engine, EngineSettings
from wrenn_engine.host.fake import FakeHost
from wrenn_engine.lifecycle.settings import LifecycleSettings

#: Sandboxes whose streams are interleaved with each other in the log.
WAVE = 256
#: Stand-ins, of the template id's length, rewritten per sandbox.
SID = "sb-§§§§§§§§§§"
_SLOT_RESOURCE = re.compile(r'"kind": "slot", "name": "\d+"')
_SLOT_FIELD = re.compile(r'"slot": \d+([,}])')


@dataclass(frozen=True, slots=True)
class FakeFiles:
    """What an engine on fakes needs on disk: kernel, image, VMM, run dir."""

    kernel: str
    image: str
    vmm: str
    run_dir: str


def fake_files(scratch: Scratch, tag: str) -> FakeFiles:
    base = scratch.mkdir(tag)
    kernel = os.path.join(base, "vmlinux")
    with open(kernel, "wb") as f:
        f.write(b"\x7fELF bench kernel")
    image = os.path.join(base, "rootfs.ext4")
    with open(image, "wb") as f:
        f.write(b"\0" * 4096)
    vmm = os.path.join(base, "fake-vmm")
    with open(vmm, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(vmm, os.stat(vmm).st_mode | stat.S_IXUSR)
    run_dir = os.path.join(base, "run")
    os.mkdir(run_dir, 0o700)
    return FakeFiles(kernel, image, vmm, run_dir)


def fake_settings(files: FakeFiles, host_id: str = "bench-host",
                  **overrides: Any) -> EngineSettings:
    base: dict[str, Any] = {
        "host_id": host_id,
        "vmm": files.vmm,
        "run_dir": files.run_dir,
        "workers": False,
        "lifecycle": LifecycleSettings(launch_timeout_s=2, shutdown_timeout_s=2),
    }
    base.update(overrides)
    return EngineSettings(**base)


def open_fake_engine(url: str, files: FakeFiles, host: FakeHost | None = None,
                     **overrides: Any) -> Engine:
    host = host if host is not None else FakeHost()
    return Engine.open(url, drivers=host.drivers(),
                       settings=fake_settings(files, **overrides), auto_upgrade=True)


# --- the template -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TemplateEvent:
    """One event of the template with its sandbox id replaced by ``SID``."""

    type: str
    schema_version: int
    text: str  # the data as JSON, with SID where the sandbox id was
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class Template:
    """One real lifecycle, cut into the parts a longer history repeats.

    ``head`` is create and start (ends running), ``cycle`` one pause and
    resume (running again), ``tail`` destroy.
    """

    head: tuple[TemplateEvent, ...]
    cycle: tuple[TemplateEvent, ...]
    tail: tuple[TemplateEvent, ...]

    def stream(self, length: int) -> list[TemplateEvent]:
        """A history of about ``length`` events ending destroyed: head,
        as many pause/resume cycles as fit, tail (never shorter than a full
        lifecycle)."""
        room = max(0, length - len(self.head) - len(self.tail))
        cycles = max(1, round(room / len(self.cycle)))
        return [*self.head, *self.cycle * cycles, *self.tail]

    def running(self) -> list[TemplateEvent]:
        """The history of a sandbox that is running (create and start)."""
        return list(self.head)

    def long_stream(self, length: int) -> list[TemplateEvent]:
        """Exactly ``length`` events: head, then cycles, cut where it ends."""
        out = list(self.head)
        while len(out) < length:
            out.extend(self.cycle)
        return out[:length]


def record_template(scratch: Scratch) -> Template:
    """Run one lifecycle on FakeHost and keep its history as the template."""
    files = fake_files(scratch, "template")
    engine = open_fake_engine(sqlite_url(scratch.path("template", "engine.db")), files)
    try:
        sandbox = engine.create(kernel_path=files.kernel, rootfs_path=files.image,
                                start=False)
        engine.start(sandbox.id)
        engine.pause(sandbox.id)
        engine.resume(sandbox.id)
        engine.destroy(sandbox.id)
        history = engine.store.read_stream(sandbox.id)
    finally:
        engine.close()

    events = [
        TemplateEvent(e.type, e.schema_version,
                      json.dumps(e.data).replace(sandbox.id, SID), e.metadata)
        for e in history
    ]
    ends = [i + 1 for i, e in enumerate(history) if e.type == "transition.completed"]
    if len(ends) != 4:
        raise RuntimeError(f"the template lifecycle has {len(ends)} completed "
                           "transitions, expected 4 (start, pause, resume, destroy)")
    start_end, _pause_end, resume_end, _destroy_end = ends
    return Template(tuple(events[:start_end]), tuple(events[start_end:resume_end]),
                    tuple(events[resume_end:]))


def sandbox_id(index: int) -> str:
    """The id of generated sandbox ``index`` (the template id's length)."""
    return f"sb-{index:010d}"


def rewrite(text: str, stream_id: str, slot: int | None = None) -> str:
    """A template event's data for another sandbox (and another slot)."""
    text = text.replace(SID, stream_id)
    if slot is not None:
        text = _SLOT_RESOURCE.sub(f'"kind": "slot", "name": "{slot}"', text)
        text = _SLOT_FIELD.sub(rf'"slot": {slot}\1', text)
    return text


def template_payloads(template_events: list[TemplateEvent], stream_id: str,
                      slot: int | None = None) -> list[NewEvent]:
    """The events to append for a sandbox ``stream_id`` holding ``slot``."""
    return [NewEvent(t.type, json.loads(rewrite(t.text, stream_id, slot)),
                     t.schema_version) for t in template_events]


def recorded_stream(template_events: list[TemplateEvent], stream_id: str,
                    start: datetime | None = None) -> list[RecordedEvent]:
    """RecordedEvents of one stream, each with its own decoded data."""
    start = start or datetime.now(UTC)
    return [
        RecordedEvent(
            position=version, stream_id=stream_id, version=version, type=t.type,
            schema_version=t.schema_version,
            data=json.loads(t.text.replace(SID, stream_id)),
            metadata=t.metadata, recorded_at=start + timedelta(milliseconds=version),
        )
        for version, t in enumerate(template_events, 1)
    ]


# --- bulk logs ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogShape:
    """Who and where, per generated sandbox: the audit filters' targets."""

    sandboxes: int
    hosts: int = 16
    actors: int = 200
    span: timedelta = timedelta(days=30)

    def host_of(self, index: int) -> str:
        return f"host-{index % self.hosts:02d}"

    def actor_of(self, index: int) -> str:
        return f"user-{index % self.actors:03d}"


@dataclass(frozen=True, slots=True)
class LoadedLog:
    """What ``load_engine_log`` wrote."""

    events: int
    sandboxes: int
    first_time: datetime
    last_time: datetime
    shape: LogShape


def _rows(template_events: list[TemplateEvent], shape: LogShape, t0: datetime,
          total: int, *, slots: bool = False) -> Iterator[tuple[Any, ...]]:
    """Event rows in position order: waves of interleaved sandboxes."""
    step_us = shape.span / timedelta(microseconds=1) / max(total, 1)
    corr_of: dict[str | None, str] = {}
    for t in template_events:
        corr = t.metadata.correlation_id
        corr_of.setdefault(corr, f"{len(corr_of):04x}")
    texts = [t.text for t in template_events]
    position = 0
    for wave in range(0, shape.sandboxes, WAVE):
        members = range(wave, min(shape.sandboxes, wave + WAVE))
        pairs = zip(template_events, texts, strict=True)
        for version, (t, text) in enumerate(pairs, 1):
            corr = corr_of[t.metadata.correlation_id]
            for index in members:
                position += 1
                sid = sandbox_id(index)
                data = rewrite(text, sid, index + 1 if slots else None)
                actor = (shape.actor_of(index) if t.metadata.actor == "api"
                         else t.metadata.actor)
                when = t0 + timedelta(microseconds=position * step_us)
                yield (position, sid, version, t.type, t.schema_version, data, actor,
                       shape.host_of(index), None, f"{index:012x}{corr}", None,
                       when.replace(tzinfo=None).isoformat(" ", "microseconds"))


_INSERT_EVENT = (
    "INSERT INTO events (position, stream_id, version, type, schema_version, data, "
    "actor, host_id, command_id, correlation_id, causation_id, recorded_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def load_engine_log(db_path: str, template_events: list[TemplateEvent],
                    shape: LogShape, *, slots: bool = False) -> LoadedLog:
    """Bulk-insert ``shape.sandboxes`` copies of a stream into a migrated,
    empty engine database. Projections are left empty (rebuild fills them)."""
    total = shape.sandboxes * len(template_events)
    t0 = datetime.now(UTC) - shape.span
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        # Loading is not measured: no fsync per batch.
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN IMMEDIATE")
        batch: list[tuple[Any, ...]] = []
        for row in _rows(template_events, shape, t0, total, slots=slots):
            batch.append(row)
            if len(batch) >= 50_000:
                conn.executemany(_INSERT_EVENT, batch)
                batch.clear()
        if batch:
            conn.executemany(_INSERT_EVENT, batch)
        conn.execute("COMMIT")
        # No ANALYZE: the store never runs it, so the planner works without
        # statistics here as it does in production.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return LoadedLog(total, shape.sandboxes, t0, t0 + shape.span, shape)


def load_eventsourcing_log(db_path: str, template_events: list[TemplateEvent],
                           shape: LogShape) -> list[uuid.UUID]:
    """The same events in eventsourcing's own table, encoded by its own
    mapper's transcoder, so its repository can reconstruct them. Returns the
    aggregate ids."""
    from eventsourcing.application import Application

    from wrenn_engine.bench import es_model

    app: Application[Any] = Application(env={
        "PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": db_path,
    })
    transcoder = app.mapper.transcoder
    stamp = datetime(2000, 1, 1, tzinfo=UTC)
    stamp_text = stamp.isoformat()
    encoded: list[tuple[str, str]] = []
    for version, t in enumerate(template_events, 1):
        state = es_model.event_state(
            t.type, json.loads(t.text), Metadata(actor="§ACTOR§", host_id="§HOST§",
                                                 correlation_id="§CORR§"),
            stamp, first=version == 1,
        )
        encoded.append((es_model.event_topic(version == 1),
                        transcoder.encode(state).decode("utf-8")))
    app.close()

    total = shape.sandboxes * len(template_events)
    t0 = datetime.now(UTC) - shape.span
    step_us = shape.span / timedelta(microseconds=1) / max(total, 1)
    ids = [uuid.UUID(int=index + 1) for index in range(shape.sandboxes)]

    def rows() -> Iterator[tuple[Any, ...]]:
        position = 0
        for wave in range(0, shape.sandboxes, WAVE):
            members = range(wave, min(shape.sandboxes, wave + WAVE))
            for version, (topic, text) in enumerate(encoded, 1):
                for index in members:
                    position += 1
                    when = t0 + timedelta(microseconds=position * step_us)
                    state = (text.replace(SID, sandbox_id(index))
                             .replace("§ACTOR§", shape.actor_of(index))
                             .replace("§HOST§", shape.host_of(index))
                             .replace("§CORR§", f"{index:012x}")
                             .replace(stamp_text, when.isoformat()))
                    yield (ids[index].hex, version, topic, state.encode("utf-8"))

    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN IMMEDIATE")
        batch: list[tuple[Any, ...]] = []
        for row in rows():
            batch.append(row)
            if len(batch) >= 50_000:
                conn.executemany("INSERT INTO stored_events VALUES (?, ?, ?, ?)", batch)
                batch.clear()
        if batch:
            conn.executemany("INSERT INTO stored_events VALUES (?, ?, ?, ?)", batch)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return ids
