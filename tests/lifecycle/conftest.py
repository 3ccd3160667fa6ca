"""Fixtures for lifecycle tests: an engine on a real store over fake drivers."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wrenn_engine.engine import Engine, EngineSettings
from wrenn_engine.host.fake import FakeHost
from wrenn_engine.lifecycle.failpoints import Failpoints
from wrenn_engine.lifecycle.settings import LifecycleSettings


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """A kernel, a template image and an executable standing in for the VMM."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF fake kernel")
    image = tmp_path / "rootfs.ext4"
    image.write_bytes(b"\0" * 4096)
    vmm = tmp_path / "fake-vmm"
    vmm.write_text("#!/bin/sh\nexit 0\n")
    vmm.chmod(vmm.stat().st_mode | stat.S_IXUSR)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    return {
        "kernel": str(kernel),
        "image": str(image),
        "vmm": str(vmm),
        "run_dir": str(run),
    }


def settings_for(files: dict[str, str], **overrides: object) -> EngineSettings:
    base: dict[str, object] = {
        "host_id": "host-a",
        "vmm": files["vmm"],
        "run_dir": files["run_dir"],
        "workers": False,
        "lifecycle": LifecycleSettings(launch_timeout_s=2, shutdown_timeout_s=2),
    }
    base.update(overrides)
    return EngineSettings(**base)  # type: ignore[arg-type]


EngineFactory = Callable[..., Engine]


@pytest.fixture
def make_engine(files: dict[str, str], sqlite_url: str) -> Iterator[EngineFactory]:
    """Open engines over one SQLite file and one fake host; closed afterwards."""
    opened: list[Engine] = []

    def make(
        host: FakeHost | None = None,
        url: str | None = None,
        failpoints: dict[str, str] | None = None,
        **settings: object,
    ) -> Engine:
        host = host if host is not None else FakeHost()
        engine = Engine.open(
            url or sqlite_url,
            drivers=host.drivers(),
            settings=settings_for(files, **settings),
            failpoints=Failpoints(failpoints or {}),
            auto_upgrade=True,
        )
        engine.fake_host = host  # type: ignore[attr-defined]
        opened.append(engine)
        return engine

    yield make
    for engine in opened:
        engine.close()


@pytest.fixture
def engine(make_engine: EngineFactory) -> Engine:
    return make_engine()


def create(engine: Engine, files: dict[str, str], **kwargs: object):  # type: ignore[no-untyped-def]
    return engine.create(
        kernel_path=files["kernel"], rootfs_path=files["image"], **kwargs
    )  # type: ignore[arg-type]


def types(engine: Engine, sandbox_id: str) -> list[str]:
    return [e.type for e in engine.history(sandbox_id)]


def host_objects(engine: Engine) -> set[str]:
    return set(engine.fake_host.objects)  # type: ignore[attr-defined]


def sandbox_dir_exists(engine: Engine, sandbox_id: str) -> bool:
    return os.path.isdir(os.path.join(engine.settings.run_dir or "", sandbox_id))
