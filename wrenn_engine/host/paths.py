"""Per-sandbox directories and the paths derived from them.

Each sandbox owns one directory (``VMConfig.sandbox_dir``): its CoW disk, its
snapshot, the VMM log and the event-monitor file live there and nowhere else,
so two sandboxes never share a file (the Go original let several sandboxes
trample one VM directory). The directory is created mode 0700 and checked on
the open file descriptor, never by a check-then-act on the path: a symlink, a
non-directory, a directory owned by another user or one that others can
enter is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from dataclasses import dataclass

from wrenn_engine.domain.config import (
    UNIX_SOCKET_PATH_MAX,
    VMConfig,
    check_path,
)
from wrenn_engine.errors import ConfigError, HostError

log = logging.getLogger(__name__)

SANDBOX_DIR_MODE = 0o700

COW_FILE_NAME = "rootfs.cow"
SNAPSHOT_DIR_NAME = "snapshot"
SNAPSHOT_TMP_DIR_NAME = "snapshot.partial"
VMM_LOG_NAME = "vmm.log"
EVENT_MONITOR_NAME = "vmm-events.json"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def prepare_sandbox_dir(path: str) -> None:
    """Create the sandbox directory ``path`` with mode 0700, or accept it as is.

    The parent must already exist. An existing ``path`` is accepted only if it
    is a real directory (not a symlink), owned by the effective uid, with mode
    exactly 0700. Anything else raises :class:`HostError` saying what to do.
    """
    parent, name = _split(path)
    parent_fd = _open_parent(path, parent)
    try:
        created = _mkdir(path, name, parent_fd)

        try:
            fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
        except OSError as exc:
            raise _refusal(path, name, parent_fd, exc) from exc

        try:
            if created:
                os.fchmod(fd, SANDBOX_DIR_MODE)
            _check_owned_private(path, os.fstat(fd))
        finally:
            os.close(fd)
    finally:
        os.close(parent_fd)

    if created:
        log.info("sandbox directory %s created (mode 0700)", path)


def remove_sandbox_dir(path: str) -> None:
    """Remove the sandbox directory ``path`` and everything in it.

    Idempotent: a missing directory is success. A symlink at ``path`` is
    refused rather than followed, and symlinks inside the tree are removed,
    never followed. A directory owned by another user is refused.
    """
    parent, name = _split(path)
    try:
        parent_fd = os.open(parent, _DIR_FLAGS)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise HostError(
            f"cannot open {parent} to remove sandbox directory {path}: "
            f"{exc.strerror}; check its permissions."
        ) from exc

    try:
        try:
            info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(info.st_mode):
            raise HostError(
                f"sandbox directory {path} is a symlink; it was not made by "
                "wrenn-engine and is left alone. Remove the symlink yourself."
            )
        if not stat.S_ISDIR(info.st_mode):
            raise HostError(
                f"sandbox directory {path} is not a directory; it was not made "
                "by wrenn-engine and is left alone. Remove it yourself."
            )
        if info.st_uid != os.geteuid():
            raise HostError(
                f"sandbox directory {path} is owned by uid {info.st_uid}, not "
                f"{os.geteuid()}; it was not made by this engine and is left "
                "alone. Remove it as its owner."
            )

        try:
            shutil.rmtree(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise HostError(
                f"cannot remove sandbox directory {path}: {exc}; something "
                "may still hold files in it (a VMM, a mount)."
            ) from exc
    finally:
        os.close(parent_fd)

    log.info("sandbox directory %s removed", path)


@dataclass(frozen=True, slots=True)
class SandboxPaths:
    """Every path one sandbox uses, derived from its effective config.

    ``sandbox_dir`` and ``socket_path`` come from the config (after
    ``with_defaults``); the rest are named inside ``sandbox_dir``. Building
    one validates all of them and raises :class:`ConfigError` if a path is
    relative, holds ``..``, ``,``, ``=`` or NUL, escapes the directory, or
    overflows a kernel limit (the API socket path fits 107 bytes).
    """

    sandbox_dir: str
    socket_path: str = ""

    def __post_init__(self) -> None:
        check_path("sandbox_dir", self.sandbox_dir)
        if self.sandbox_dir == "/":
            raise ConfigError(
                "sandbox_dir",
                "is the root directory",
                hint="give each sandbox a directory of its own, e.g. /tmp/ch-vm-<id>",
            )

        for field, value in self.derived().items():
            check_path(field, value)
            if os.path.dirname(value) != self.sandbox_dir:
                raise ConfigError(
                    field,
                    f"{value!r} is not directly inside {self.sandbox_dir!r}",
                    hint="derived paths must stay in the sandbox directory",
                )

        if self.socket_path:
            check_path("socket_path", self.socket_path)
            size = len(self.socket_path.encode())
            if size > UNIX_SOCKET_PATH_MAX:
                raise ConfigError(
                    "socket_path",
                    f"{self.socket_path!r} is {size} bytes long",
                    limit=f"{UNIX_SOCKET_PATH_MAX} bytes for a unix socket path",
                    hint="use a shorter directory or sandbox id",
                )

    @classmethod
    def from_config(cls, config: VMConfig) -> SandboxPaths:
        """The paths of ``config`` once its defaults are filled in."""
        effective = config.with_defaults()
        return cls(effective.sandbox_dir, effective.socket_path)

    @property
    def cow_file(self) -> str:
        """The per-sandbox copy-on-write disk (CoW file, overlay or copy)."""
        return os.path.join(self.sandbox_dir, COW_FILE_NAME)

    @property
    def snapshot_dir(self) -> str:
        """Where a complete snapshot lives (renamed into place on success)."""
        return os.path.join(self.sandbox_dir, SNAPSHOT_DIR_NAME)

    @property
    def snapshot_tmp_dir(self) -> str:
        """Where ``vm.snapshot`` writes before the rename; removed on failure."""
        return os.path.join(self.sandbox_dir, SNAPSHOT_TMP_DIR_NAME)

    @property
    def vmm_log(self) -> str:
        return os.path.join(self.sandbox_dir, VMM_LOG_NAME)

    @property
    def event_monitor(self) -> str:
        """The file given to the VMM's ``--event-monitor path=``."""
        return os.path.join(self.sandbox_dir, EVENT_MONITOR_NAME)

    def derived(self) -> dict[str, str]:
        """The derived paths by name (everything but the two given ones)."""
        return {
            "cow_file": self.cow_file,
            "snapshot_dir": self.snapshot_dir,
            "snapshot_tmp_dir": self.snapshot_tmp_dir,
            "vmm_log": self.vmm_log,
            "event_monitor": self.event_monitor,
        }


def _split(path: str) -> tuple[str, str]:
    check_path("sandbox_dir", path)
    parent, name = os.path.split(path)
    if not name:
        raise HostError("refusing to use the root directory as a sandbox directory")
    return parent, name


def _open_parent(path: str, parent: str) -> int:
    try:
        return os.open(parent, _DIR_FLAGS)
    except FileNotFoundError as exc:
        raise HostError(
            f"cannot create sandbox directory {path}: its parent {parent} does "
            "not exist; create it first or choose another sandbox_dir."
        ) from exc
    except OSError as exc:
        raise HostError(
            f"cannot create sandbox directory {path}: opening {parent} failed: "
            f"{exc.strerror}; check that it is a directory you can write."
        ) from exc


def _mkdir(path: str, name: str, parent_fd: int) -> bool:
    try:
        os.mkdir(name, SANDBOX_DIR_MODE, dir_fd=parent_fd)
    except FileExistsError:
        return False
    except OSError as exc:
        raise HostError(
            f"cannot create sandbox directory {path}: {exc.strerror}; check "
            "the permissions and free space of its parent."
        ) from exc
    return True


def _refusal(path: str, name: str, parent_fd: int, exc: OSError) -> HostError:
    """Explain why an existing ``path`` could not be opened as a directory."""
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        try:
            info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except OSError:
            info = None
        if info is not None and stat.S_ISLNK(info.st_mode):
            return HostError(
                f"sandbox directory {path} is a symlink; refusing to follow it. "
                "Remove the symlink (wrenn-engine never makes one) or choose "
                "another sandbox_dir."
            )
        return HostError(
            f"sandbox directory {path} exists but is not a directory; remove "
            "it or choose another sandbox_dir."
        )
    return HostError(
        f"cannot open sandbox directory {path}: {exc.strerror}; check its permissions."
    )


def _check_owned_private(path: str, info: os.stat_result) -> None:
    uid = os.geteuid()
    if info.st_uid != uid:
        raise HostError(
            f"sandbox directory {path} is owned by uid {info.st_uid}, not {uid}; "
            "another user may control it. Remove it (as its owner) or choose "
            "another sandbox_dir."
        )

    mode = stat.S_IMODE(info.st_mode)
    if mode != SANDBOX_DIR_MODE:
        raise HostError(
            f"sandbox directory {path} has mode {mode:04o}, expected 0700 (no "
            "access for group or others); run `chmod 0700` on it if it is "
            "yours, or remove it."
        )
