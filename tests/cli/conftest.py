"""Fixtures for the CLI tests: run ``main`` in-process, a database, stand-ins.

Commands that act run on the fake drivers (``WRENN_ENGINE_DRIVERS=fake``),
whose host is a JSON file in the test's directory; every other path the CLI
might touch (state directory, run directory) is in the test's directory too.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from wrenn_engine.cli.main import main
from wrenn_engine.domain.events import (
    ActivityRecorded,
    Metadata,
    NewEvent,
    SandboxCreated,
)
from wrenn_engine.store import EventStore, open_store


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def jsonl(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


Run = Callable[..., Result]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private state directory; no WRENN_ENGINE_DB; fake drivers."""
    home = tmp_path / "home"
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setenv("WRENN_ENGINE_HOME", str(home))
    monkeypatch.delenv("WRENN_ENGINE_DB", raising=False)
    monkeypatch.delenv("WRENN_ENGINE_FAILPOINTS", raising=False)
    monkeypatch.setenv("WRENN_ENGINE_DRIVERS", "fake")
    monkeypatch.setenv("WRENN_ENGINE_FAKE_HOST", str(tmp_path / "fake-host.json"))
    monkeypatch.setenv("WRENN_ENGINE_RUN_DIR", str(run_dir))
    monkeypatch.setenv("WRENN_ENGINE_HOST_ID", "host-a")
    return home


@pytest.fixture
def cli(home: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    """``cli("ls", "--json")`` runs ``main`` in this process."""

    def run(*argv: str) -> Result:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_backends: run the test's `db` on SQLite and on PostgreSQL"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``db`` is SQLite, and also PostgreSQL where the backend matters."""
    if "backend" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("both_backends") is not None
        metafunc.parametrize(
            "backend", ["sqlite", "postgresql"] if both else ["sqlite"]
        )


@pytest.fixture
def db(backend: str, request: pytest.FixtureRequest, cli: Run) -> str:
    """A database at the head revision (SQLite; PostgreSQL too when marked)."""
    url = str(
        request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    )
    result = cli("--db", url, "db", "upgrade")
    assert result.code == 0, result.err
    return url


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """A kernel, a template image and an executable standing in for the VMM."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF stand-in kernel")
    image = tmp_path / "rootfs.ext4"
    image.write_bytes(b"\0" * 4096)
    vmm = tmp_path / "stand-in-vmm"
    vmm.write_text("#!/bin/sh\nexit 0\n")
    vmm.chmod(vmm.stat().st_mode | stat.S_IXUSR)
    return {"kernel": str(kernel), "image": str(image), "vmm": str(vmm)}


@pytest.fixture
def create(cli: Run, db: str, files: dict[str, str]) -> Callable[..., str]:
    """Create (and start) a sandbox through the CLI; return its id."""

    def make(*extra: str) -> str:
        result = cli(
            "--db",
            db,
            "create",
            "--kernel",
            files["kernel"],
            "--image",
            files["image"],
            "--vmm",
            files["vmm"],
            *extra,
        )
        assert result.code == 0, result.err
        return result.out.strip()

    return make


@pytest.fixture
def store(db: str) -> Iterator[EventStore]:
    opened = open_store(db)
    try:
        yield opened
    finally:
        opened.close()


def append_sandbox(
    store: EventStore,
    sandbox_id: str,
    *,
    actor: str = "tester",
    host_id: str = "host-a",
    activities: int = 0,
) -> None:
    """A sandbox's first event, then ``activities`` activity events."""
    store.append(
        sandbox_id,
        [SandboxCreated({"vcpus": 1}, host_id).to_new()],
        expected_version=0,
        metadata=Metadata(actor=actor, host_id=host_id),
    )
    append_activity(store, sandbox_id, activities, actor=actor, host_id=host_id)


def append_activity(
    store: EventStore,
    sandbox_id: str,
    count: int = 1,
    *,
    actor: str = "tester",
    host_id: str = "host-a",
) -> None:
    for _ in range(count):
        version = len(store.read_stream(sandbox_id))
        new: NewEvent = ActivityRecorded(f"use {version}").to_new()
        store.append(
            sandbox_id,
            [new],
            expected_version=version,
            metadata=Metadata(actor=actor, host_id=host_id),
        )


def listing(path: Path) -> list[str]:
    """Every path under ``path`` (empty when it does not exist)."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def script() -> str:
    """The installed console script beside this interpreter."""
    import sys

    found = os.path.join(os.path.dirname(sys.executable), "wrenn-engine")
    assert os.path.isfile(found), "the wrenn-engine script is not installed"
    return found
