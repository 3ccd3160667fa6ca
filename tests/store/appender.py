"""One writer of the two-process concurrency test, run as a script:

    python appender.py URL WRITER SHARED_STREAM OWN_STREAM COUNT GO_FILE

It says it is ready on stdout, waits until GO_FILE exists (so both writers
start together), then appends COUNT activity events to its own stream and
COUNT to the shared one, retrying the shared appends on ConcurrencyError.
Any other error ends it with a traceback and a non-zero exit status.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from wrenn_engine.domain.events import ActivityRecorded, Metadata, SandboxCreated
from wrenn_engine.errors import ConcurrencyError
from wrenn_engine.store import EventStore, open_store


def append_with_retry(
    store: EventStore, stream_id: str, detail: str, actor: str
) -> int:
    """Append one event to a contended stream; return how often it lost."""
    conflicts = 0
    while True:
        state = store.get_sandbox(stream_id)
        version = state.version if state is not None else 0
        try:
            store.append(
                stream_id,
                [ActivityRecorded(detail).to_new()],
                expected_version=version,
                metadata=Metadata(actor=actor),
            )
            return conflicts
        except ConcurrencyError:
            conflicts += 1


def main(url: str, writer: str, shared: str, own: str, count: int, go: Path) -> None:
    store = open_store(url)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)

    conflicts = 0
    store.append(
        own,
        [SandboxCreated(config={}, host_id="h1").to_new()],
        expected_version=0,
        metadata=Metadata(actor=writer),
    )
    for seq in range(count):
        store.append(
            own,
            [ActivityRecorded(f"{writer}:{seq}").to_new()],
            expected_version=seq + 1,
            metadata=Metadata(actor=writer),
        )
        conflicts += append_with_retry(store, shared, f"{writer}:{seq}", writer)
    store.close()
    print(json.dumps({"writer": writer, "conflicts": conflicts}), flush=True)


if __name__ == "__main__":
    url_, writer_, shared_, own_, count_, go_ = sys.argv[1:]
    main(url_, writer_, shared_, own_, int(count_), Path(go_))
