"""Sandbox directories and derived paths: real directories, modes and owners."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root
from wrenn_engine.domain.config import VMConfig
from wrenn_engine.errors import ConfigError, HostError
from wrenn_engine.host.paths import (
    SandboxPaths,
    prepare_sandbox_dir,
    remove_sandbox_dir,
)


@pytest.fixture
def umask_wide_open() -> Iterator[None]:
    """A umask that would leave group/other bits (or drop owner bits)."""
    previous = os.umask(0o222)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- prepare_sandbox_dir -------------------------------------------------------------


def test_prepare_creates_mode_0700_whatever_the_umask(
    tmp_path: Path, umask_wide_open: None
) -> None:
    target = tmp_path / "sandbox"

    prepare_sandbox_dir(str(target))

    info = os.lstat(target)
    assert stat.S_ISDIR(info.st_mode)
    assert _mode(target) == 0o700
    assert info.st_uid == os.geteuid()


def test_prepare_accepts_its_own_directory_again(tmp_path: Path) -> None:
    target = tmp_path / "sandbox"
    prepare_sandbox_dir(str(target))
    (target / "rootfs.cow").write_bytes(b"kept")

    prepare_sandbox_dir(str(target))

    assert (target / "rootfs.cow").read_bytes() == b"kept"
    assert _mode(target) == 0o700


def test_prepare_refuses_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    os.chmod(real, 0o700)
    link = tmp_path / "sandbox"
    link.symlink_to(real)

    with pytest.raises(HostError, match="is a symlink; refusing to follow it"):
        prepare_sandbox_dir(str(link))

    assert link.is_symlink()
    assert list(real.iterdir()) == []


def test_prepare_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "sandbox"
    link.symlink_to(tmp_path / "missing")

    with pytest.raises(HostError, match="symlink"):
        prepare_sandbox_dir(str(link))

    assert not (tmp_path / "missing").exists()


def test_prepare_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "sandbox"
    target.write_text("not a dir")

    with pytest.raises(HostError, match="not a directory"):
        prepare_sandbox_dir(str(target))

    assert target.read_text() == "not a dir"


@pytest.mark.host
def test_prepare_refuses_a_directory_owned_by_another_uid(tmp_path: Path) -> None:
    require_root()
    target = tmp_path / "sandbox"
    target.mkdir(mode=0o700)
    os.chown(target, 65534, 65534)

    with pytest.raises(HostError, match="owned by uid 65534"):
        prepare_sandbox_dir(str(target))

    assert os.lstat(target).st_uid == 65534


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701, 0o500, 0o1700])
def test_prepare_refuses_a_wrong_mode(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "sandbox"
    target.mkdir()
    os.chmod(target, mode)

    with pytest.raises(HostError, match=f"mode {mode:04o}, expected 0700"):
        prepare_sandbox_dir(str(target))

    assert _mode(target) == mode


def test_prepare_needs_the_parent(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "sandbox"

    with pytest.raises(HostError, match=r"parent .* does not exist"):
        prepare_sandbox_dir(str(target))

    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("bad", ["relative/dir", "/a/../b", "/a/b/", "/"])
def test_prepare_refuses_paths_that_are_not_plain(bad: str) -> None:
    with pytest.raises((ConfigError, HostError)):
        prepare_sandbox_dir(bad)


# --- remove_sandbox_dir ---------------------------------------------------------------


def test_remove_is_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "sandbox"
    prepare_sandbox_dir(str(target))
    (target / "snapshot").mkdir()
    (target / "snapshot" / "state.json").write_text("{}")
    (target / "vmm.log").write_text("log")

    remove_sandbox_dir(str(target))
    assert not os.path.lexists(target)

    remove_sandbox_dir(str(target))
    remove_sandbox_dir(str(tmp_path / "never-existed" / "sandbox"))


def test_remove_does_not_follow_a_symlink_inside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    target = tmp_path / "sandbox"
    prepare_sandbox_dir(str(target))
    (target / "link").symlink_to(outside)
    (target / "nested").mkdir()
    (target / "nested" / "link").symlink_to(outside / "precious")

    remove_sandbox_dir(str(target))

    assert not os.path.lexists(target)
    assert (outside / "precious").read_text() == "keep me"


def test_remove_refuses_a_symlink_at_the_top(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "precious").write_text("keep me")
    link = tmp_path / "sandbox"
    link.symlink_to(real)

    with pytest.raises(HostError, match="is a symlink"):
        remove_sandbox_dir(str(link))

    assert link.is_symlink()
    assert (real / "precious").read_text() == "keep me"


@pytest.mark.host
def test_remove_refuses_a_directory_owned_by_another_uid(tmp_path: Path) -> None:
    require_root()
    target = tmp_path / "sandbox"
    target.mkdir(mode=0o700)
    (target / "theirs").write_text("x")
    os.chown(target, 65534, 65534)

    with pytest.raises(HostError, match="owned by uid 65534"):
        remove_sandbox_dir(str(target))

    assert (target / "theirs").exists()


# --- SandboxPaths ---------------------------------------------------------------------


def test_sandbox_paths_stay_inside_the_directory() -> None:
    paths = SandboxPaths("/tmp/ch-vm-abc", "/tmp/ch-abc.sock")

    derived = paths.derived()

    assert set(derived) == {
        "cow_file",
        "snapshot_dir",
        "snapshot_tmp_dir",
        "vmm_log",
        "event_monitor",
    }
    assert len(set(derived.values())) == len(derived)
    for value in derived.values():
        assert os.path.dirname(value) == "/tmp/ch-vm-abc"
    assert paths.cow_file == "/tmp/ch-vm-abc/rootfs.cow"
    assert paths.snapshot_tmp_dir != paths.snapshot_dir


def test_sandbox_paths_from_the_effective_config() -> None:
    config = VMConfig(sandbox_id="sb-1")

    paths = SandboxPaths.from_config(config)

    assert paths.sandbox_dir == "/tmp/ch-vm-sb-1"
    assert paths.socket_path == "/tmp/ch-sb-1.sock"


def test_sandbox_paths_socket_limit() -> None:
    fits = "/tmp/" + "s" * (107 - len("/tmp/"))
    assert len(fits.encode()) == 107
    SandboxPaths("/tmp/ch-vm-x", fits)

    with pytest.raises(ConfigError) as caught:
        SandboxPaths("/tmp/ch-vm-x", fits + "s")

    assert caught.value.field == "socket_path"
    assert "107 bytes" in str(caught.value)


@pytest.mark.parametrize(
    ("sandbox_dir", "field"),
    [
        ("relative", "sandbox_dir"),
        ("/tmp/a/../b", "sandbox_dir"),
        ("/tmp/a/", "sandbox_dir"),
        ("/tmp/a,b", "sandbox_dir"),
        ("/tmp/a=b", "sandbox_dir"),
        ("/", "sandbox_dir"),
        ("/tmp/" + "d" * 4091, "sandbox_dir"),
    ],
)
def test_sandbox_paths_refuse_bad_directories(sandbox_dir: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SandboxPaths(sandbox_dir)

    assert caught.value.field == field


def test_sandbox_paths_refuse_a_long_derived_path() -> None:
    near_limit = "/" + "d" * 4080

    with pytest.raises(ConfigError) as caught:
        SandboxPaths(near_limit)

    assert caught.value.field in {
        "cow_file",
        "snapshot_dir",
        "snapshot_tmp_dir",
        "vmm_log",
        "event_monitor",
    }
