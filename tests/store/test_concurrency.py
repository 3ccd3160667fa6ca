"""Many threads and two processes append at once, on SQLite and PostgreSQL.

What must hold afterwards: exact counts, contiguous versions, every event
once (none lost, none doubled), no lock error reaching a caller, and a
follower reading "after position P" while the writers run sees every event.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from tests.store.appender import append_with_retry
from tests.store.builders import created, meta
from wrenn_engine.domain.events import ActivityRecorded, Metadata, RecordedEvent
from wrenn_engine.store import SqlEventStore

APPENDER = Path(__file__).with_name("appender.py")


def _details(events: list[RecordedEvent]) -> list[str]:
    return [e.data["detail"] for e in events if e.type == "sandbox.activity_recorded"]


def _check_log(store: SqlEventStore, writers: list[str], count: int) -> None:
    shared = store.read_stream("shared")
    assert [e.version for e in shared] == list(range(1, len(writers) * count + 2))
    expected = sorted(f"{w}:{seq}" for w in writers for seq in range(count))
    assert sorted(_details(shared)) == expected

    for writer in writers:
        own = store.read_stream(f"own-{writer}")
        assert [e.version for e in own] == list(range(1, count + 2))
        assert _details(own) == [f"{writer}:{seq}" for seq in range(count)]

    everything = list(store.read_all(batch_size=50))
    positions = [e.position for e in everything]
    assert positions == sorted(set(positions))
    assert len(everything) == 1 + len(writers) * (2 * count + 1)
    assert store.verify_projections() == []


class Follower(threading.Thread):
    """Reads the log "after the last position seen" until told to stop."""

    def __init__(self, store: SqlEventStore) -> None:
        super().__init__(name="follower")
        self.store = store
        self.seen: list[int] = []
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                finishing = self.done.is_set()
                after = self.seen[-1] if self.seen else 0
                self.seen += [
                    e.position
                    for e in self.store.read_all(after_position=after, batch_size=7)
                ]
                if finishing:
                    return
                self.store.wait_for_events(self.seen[-1] if self.seen else 0, 0.05)
        except BaseException as exc:
            self.error = exc


def test_threads_append_to_one_stream_and_to_their_own(
    store: SqlEventStore,
) -> None:
    writers = [f"t{i}" for i in range(5)]
    count = 16
    store.append("shared", [created()], expected_version=0, metadata=meta())
    follower = Follower(store)
    follower.start()
    errors: list[BaseException] = []
    conflicts: list[int] = []
    barrier = threading.Barrier(len(writers))

    def write(writer: str) -> None:
        try:
            barrier.wait()
            own = f"own-{writer}"
            store.append(
                own, [created()], expected_version=0, metadata=Metadata(actor=writer)
            )
            for seq in range(count):
                store.append(
                    own,
                    [ActivityRecorded(f"{writer}:{seq}").to_new()],
                    expected_version=seq + 1,
                    metadata=Metadata(actor=writer),
                )
                conflicts.append(
                    append_with_retry(store, "shared", f"{writer}:{seq}", writer)
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    follower.done.set()
    follower.join()

    assert errors == []
    assert follower.error is None
    _check_log(store, writers, count)
    everything = list(store.read_all())
    assert follower.seen == [e.position for e in everything]
    # Times are taken under the append lock: they never go back in position order.
    times = [e.recorded_at for e in everything]
    assert times == sorted(times)


def test_two_processes_append_to_one_stream_and_to_their_own(
    store: SqlEventStore,
    tmp_path: Path,
) -> None:
    writers = ["p1", "p2"]
    count = 25
    store.append("shared", [created()], expected_version=0, metadata=meta())
    go = tmp_path / "go"
    follower = Follower(store)
    follower.start()

    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(APPENDER),
                store.url,
                w,
                "shared",
                f"own-{w}",
                str(count),
                str(go),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in writers
    ]
    outputs: list[tuple[int, str, str]] = []
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        follower.done.set()
        follower.join()

    for returncode, out, err in outputs:
        assert returncode == 0, err
        assert "locked" not in err
        assert json.loads(out)["writer"] in writers
    assert follower.error is None
    _check_log(store, writers, count)
    assert follower.seen == [e.position for e in store.read_all()]
