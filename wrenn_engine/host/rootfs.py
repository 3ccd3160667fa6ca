"""Copy-on-write root filesystems over shared, read-only template images.

Three strategies, chosen by :func:`detect_strategy` in this order unless the
settings name one:

``dm-snapshot``
    What the Go original does. One read-only loop device per template,
    shared by every sandbox on that template; per sandbox a sparse CoW file
    on its own loop device and a device-mapper snapshot over the two. The
    VMM opens ``/dev/mapper/<dm_name>`` as a raw disk.
``qcow2``
    A qcow2 overlay whose backing file is the template (``qemu-img``); the
    VMM opens it with ``image_type`` Qcow2 and ``backing_files``.
``copy``
    A reflink copy of the template where the filesystem supports it, a
    sparse copy elsewhere. Raw.

Bookkeeping lives in ``RootfsSettings.work_dir`` and is guarded by one file
lock, so it holds across threads, processes and engine restarts:

- ``cow/<sandbox_id>.json`` records a CoW file before it is created and is
  removed after the file is deleted; it is what makes a file, or a loop
  device on it, "ours" for :meth:`LinuxRootfsDriver.leftovers`.
- ``templates/<key>.json`` records a template whose read-only loop device we
  attach, before the loop is set up.
- The reference count of a template loop device is never stored: it is the
  number of CoW loop devices the kernel reports (``losetup -J -l``) whose
  back-file is the CoW file of a dm-snapshot sandbox on that template. A
  crash therefore cannot leave a count that is wrong, only kernel objects
  that ``leftovers`` finds.

Every external command goes through one runner (:func:`run_command`) that
raises :class:`HostCommandError`; tests swap it for a recorder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from wrenn_engine.domain.config import SANDBOX_ID_MAX, SANDBOX_ID_RE
from wrenn_engine.errors import (
    ConfigError,
    HostCommandError,
    HostError,
    InsufficientSpace,
    ResourceBusy,
)
from wrenn_engine.host.base import RootfsAttachment, RootfsPlan
from wrenn_engine.host.paths import SandboxPaths
from wrenn_engine.settings import state_dir

log = logging.getLogger(__name__)

DM_SNAPSHOT = "dm-snapshot"
QCOW2 = "qcow2"
COPY = "copy"
STRATEGIES = (DM_SNAPSHOT, QCOW2, COPY)
AUTO = "auto"

#: The device-mapper control node; its absence means the kernel has no dm.
DM_CONTROL = "/dev/mapper/control"

MIB = 1024 * 1024
#: Room a fresh qcow2 overlay needs (its header and first tables).
QCOW2_OVERLAY_BYTES = 4 * MIB
#: dm-snapshot chunk size in 512-byte sectors (4 KiB), as the original.
DM_CHUNK_SECTORS = 8

#: ``FICLONE`` from linux/fs.h; Python's fcntl only names it from 3.12.
FICLONE = 0x40049409
_COPY_CHUNK = 1 * MIB
_ZEROS = bytes(_COPY_CHUNK)
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL}

#: Runs one command (argv) and returns its stdout, or raises HostCommandError.
CommandRunner = Callable[[Sequence[str]], str]


# --- settings and strategy detection ------------------------------------------


def _default_work_dir() -> str:
    return str(state_dir() / "rootfs")


@dataclass(frozen=True, slots=True)
class RootfsSettings:
    """How the rootfs driver works on this host.

    ``strategy``: ``auto`` (the first available of dm-snapshot, qcow2, copy)
    or one of them. ``cow_size_bytes``: apparent size of a dm-snapshot CoW
    file (sparse, so it costs nothing until written); 0 sizes it to hold a
    full rewrite of the template (template + 1/64 for exception metadata + 1
    MiB). ``work_dir``: the lock and the bookkeeping described in the module
    docstring; ``$WRENN_ENGINE_HOME/rootfs`` by default. ``min_free_bytes``:
    free space that must remain after a write. ``dm_prefix``: names of our
    dm devices start with it. ``command_timeout``: seconds per command.
    """

    strategy: str = AUTO
    cow_size_bytes: int = 0
    work_dir: str = field(default_factory=_default_work_dir)
    min_free_bytes: int = 256 * MIB
    dm_prefix: str = "wrenn-"
    command_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.strategy not in (AUTO, *STRATEGIES):
            raise ConfigError(
                "rootfs.strategy",
                f"{self.strategy!r} is not a rootfs strategy",
                limit=", ".join((AUTO, *STRATEGIES)),
            )
        if self.cow_size_bytes < 0 or self.cow_size_bytes % 512:
            raise ConfigError(
                "rootfs.cow_size_bytes",
                f"{self.cow_size_bytes} is not usable",
                limit="0 (size from the template) or a positive multiple of 512",
            )
        if not self.work_dir.startswith("/"):
            raise ConfigError(
                "rootfs.work_dir",
                f"{self.work_dir!r} is not absolute",
                hint="give the full path, starting with '/'",
            )
        if self.min_free_bytes < 0:
            raise ConfigError(
                "rootfs.min_free_bytes", "is negative", limit="0 or more bytes"
            )
        if not self.dm_prefix or "/" in self.dm_prefix or len(self.dm_prefix) > 32:
            raise ConfigError(
                "rootfs.dm_prefix",
                f"{self.dm_prefix!r} is not usable",
                limit="1 to 32 characters without '/'",
            )
        if self.command_timeout <= 0:
            raise ConfigError("rootfs.command_timeout", "must be positive")


def strategy_unavailable(strategy: str) -> str:
    """Why ``strategy`` cannot run on this host, or ``""`` if it can."""
    if strategy == DM_SNAPSHOT:
        # /dev/mapper/control alone proves nothing: libdevmapper creates the
        # node on first use even where the kernel has no driver behind it.
        if not os.path.exists(DM_CONTROL) or not _kernel_has_device_mapper():
            return f"the kernel has no device-mapper ({DM_CONTROL} is not backed)"
        missing = [tool for tool in ("dmsetup", "losetup") if not shutil.which(tool)]
        if missing:
            return f"{' and '.join(missing)} not on PATH"
        return ""
    if strategy == QCOW2:
        return "" if shutil.which("qemu-img") else "qemu-img not on PATH"
    if strategy == COPY:
        return ""
    return f"unknown strategy {strategy!r}"


def _kernel_has_device_mapper() -> bool:
    """True when the running kernel registered the device-mapper misc device."""
    try:
        with open("/proc/misc") as f:
            return any(line.split()[1:] == ["device-mapper"] for line in f)
    except OSError:
        return False


def detect_strategy() -> str:
    """The first strategy this host supports: dm-snapshot, qcow2, then copy."""
    for strategy in STRATEGIES:
        if not strategy_unavailable(strategy):
            return strategy
    return COPY


# --- commands and loop devices ------------------------------------------------


def run_command(argv: Sequence[str], timeout: float = 60.0) -> str:
    """Run ``argv`` (no shell, C locale) and return its stdout.

    A non-zero exit, a missing program or a timeout raises
    :class:`HostCommandError` with argv, exit code and stderr, chained to
    the cause.
    """
    env = {**os.environ, "LC_ALL": "C"}
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.CalledProcessError as exc:
        raise HostCommandError(argv, exc.returncode, exc.stderr or "") from exc
    except FileNotFoundError as exc:
        raise HostCommandError(
            argv,
            127,
            f"{argv[0]} is not installed or not on PATH "
            "(make system-deps installs the host tools)",
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise HostCommandError(argv, -1, f"timed out after {timeout:g}s") from exc
    return done.stdout


@dataclass(frozen=True, slots=True)
class LoopDevice:
    """One attached loop device, as ``losetup -J -l`` reports it."""

    name: str
    back_file: str
    read_only: bool
    autoclear: bool


def list_loop_devices(runner: CommandRunner = run_command) -> list[LoopDevice]:
    """Every attached loop device on the host (``losetup -J -l``)."""
    out = runner(["losetup", "-J", "-l"])
    if not out.strip():
        return []
    try:
        entries = json.loads(out).get("loopdevices", [])
    except (ValueError, AttributeError) as exc:
        raise HostError(
            f"cannot parse `losetup -J -l` output ({exc}); is util-linux's "
            "losetup 2.27 or newer installed?"
        ) from exc
    return [
        LoopDevice(
            name=str(entry["name"]),
            back_file=_strip_deleted(str(entry.get("back-file") or "")),
            read_only=_flag(entry.get("ro")),
            autoclear=_flag(entry.get("autoclear")),
        )
        for entry in entries
    ]


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip() in ("1", "true")
    return bool(value)


def _strip_deleted(back_file: str) -> str:
    suffix = " (deleted)"
    return back_file[: -len(suffix)] if back_file.endswith(suffix) else back_file


def resource_names(plan: RootfsPlan, attachment: RootfsAttachment) -> set[str]:
    """The ``"kind:name"`` strings :meth:`LinuxRootfsDriver.leftovers` expects
    in ``known`` for one sandbox (its CoW file, and while attached its loop
    devices and dm device)."""
    names = {f"cow:{plan.cow_path}"}
    for loop in (attachment.template_loop, attachment.cow_loop):
        if loop:
            names.add(f"loop:{loop}")
    if attachment.dm_name:
        names.add(f"dm:{attachment.dm_name}")
    return names


# --- file helpers (module functions so tests can inject failures) --------------


def _fsync_fd(fd: int) -> None:
    os.fsync(fd)


def _close_fd(fd: int) -> None:
    os.close(fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def _new_file(path: str) -> Iterator[int]:
    """Create ``path`` exclusively (mode 0600) and yield its fd.

    The file is fsynced and closed on success. On any failure, including a
    failing fsync or close, the file is unlinked before the error goes on.
    """
    fd = os.open(
        path,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
    )
    try:
        try:
            yield fd
            _fsync_fd(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        _close_fd(fd)
    except BaseException:
        _unlink_quietly(path)
        raise


def _write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    temp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    _unlink_quietly(temp)
    with _new_file(temp) as fd:
        os.write(fd, json.dumps(data, sort_keys=True).encode())
    try:
        os.replace(temp, path)
    except BaseException:
        _unlink_quietly(temp)
        raise


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise HostError(
            f"rootfs bookkeeping file {path} is not valid JSON ({exc}); remove "
            "it after checking `losetup -l` for loop devices it described."
        ) from exc
    return data if isinstance(data, dict) else None


def _sparse_copy(src: int, dst: int, size: int) -> None:
    """Copy only the data regions of ``src``, and skip zero chunks inside them."""
    os.ftruncate(dst, size)
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        try:
            hole = os.lseek(src, data, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            hole = size
        _copy_range(src, dst, data, min(hole, size))
        offset = hole


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    position = start
    while position < end:
        chunk = os.pread(src, min(_COPY_CHUNK, end - position), position)
        if not chunk:
            return
        zero = chunk == _ZEROS if len(chunk) == _COPY_CHUNK else not chunk.strip(b"\0")
        if not zero:
            view = memoryview(chunk)
            written = 0
            while written < len(chunk):
                written += os.pwrite(dst, view[written:], position + written)
        position += len(chunk)


# --- bookkeeping records -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CowRecord:
    sandbox_id: str
    strategy: str
    cow_path: str  # as planned (what the lifecycle knows)
    cow_real: str  # canonical, as the kernel names a loop's back-file
    template_path: str  # canonical
    dm_name: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _CowRecord:
        return cls(**{item.name: str(data.get(item.name, "")) for item in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return {item.name: getattr(self, item.name) for item in fields(self)}


def _canonical(path: str) -> str:
    return os.path.realpath(path)


# --- the driver -----------------------------------------------------------------


class LinuxRootfsDriver:
    """The :class:`~wrenn_engine.host.base.RootfsDriver` for Linux hosts."""

    def __init__(
        self,
        settings: RootfsSettings | None = None,
        runner: CommandRunner | None = None,
    ) -> None:
        self.settings = settings or RootfsSettings()
        timeout = self.settings.command_timeout

        def default_runner(argv: Sequence[str]) -> str:
            return run_command(argv, timeout=timeout)

        self.runner: CommandRunner = runner or default_runner
        self._cow_dir = os.path.join(self.settings.work_dir, "cow")
        self._template_dir = os.path.join(self.settings.work_dir, "templates")
        self._lock_path = os.path.join(self.settings.work_dir, "rootfs.lock")

    # --- planning -------------------------------------------------------------

    def strategy(self) -> str:
        """The strategy new plans use (resolving ``auto`` on this host)."""
        if self.settings.strategy == AUTO:
            return detect_strategy()
        return self.settings.strategy

    def plan(self, sandbox_id: str, template_path: str, sandbox_dir: str) -> RootfsPlan:
        """Choose the strategy and the paths; touch nothing.

        Raises :class:`ConfigError` for a bad id, a template that is not a
        regular file, or a configured strategy this host cannot run.
        """
        if len(sandbox_id) > SANDBOX_ID_MAX or not SANDBOX_ID_RE.fullmatch(sandbox_id):
            raise ConfigError(
                "sandbox_id",
                f"{sandbox_id!r} is not a valid id",
                limit="a-z, 0-9, '-' and '_', at most 63 characters",
            )
        template = self._template_size(template_path)
        strategy = self.strategy()
        if self.settings.strategy != AUTO:
            problem = strategy_unavailable(strategy)
            if problem:
                raise ConfigError(
                    "rootfs.strategy",
                    f"{strategy} cannot run here: {problem}",
                    hint="use strategy auto, or install what is missing",
                )
        cow_path = SandboxPaths(sandbox_dir).cow_file

        if strategy == DM_SNAPSHOT:
            dm_name = f"{self.settings.dm_prefix}{sandbox_id}"
            cow_size = self.settings.cow_size_bytes or _default_cow_size(template)
            return RootfsPlan(
                sandbox_id=sandbox_id,
                strategy=strategy,
                template_path=template_path,
                cow_path=cow_path,
                disk_path=f"/dev/mapper/{dm_name}",
                image_type="Raw",
                dm_name=dm_name,
                cow_size_bytes=cow_size,
            )
        if strategy == QCOW2:
            return RootfsPlan(
                sandbox_id=sandbox_id,
                strategy=strategy,
                template_path=template_path,
                cow_path=cow_path,
                disk_path=cow_path,
                image_type="Qcow2",
                backing_files=True,
            )
        return RootfsPlan(
            sandbox_id=sandbox_id,
            strategy=strategy,
            template_path=template_path,
            cow_path=cow_path,
            disk_path=cow_path,
            image_type="Raw",
        )

    # --- prepare / attach / detach / remove -------------------------------------

    def prepare(self, plan: RootfsPlan) -> RootfsAttachment:
        """Create the CoW disk and attach it. On failure, remove what it made."""
        record = self._record_for(plan)
        if os.path.lexists(plan.cow_path) or os.path.lexists(
            self._record_path(plan.sandbox_id)
        ):
            raise ResourceBusy(
                "CoW file",
                plan.cow_path,
                "it, or its record, is left by an earlier prepare",
            )
        self._check_space(plan)
        self._ensure_work_dirs()

        if plan.strategy == DM_SNAPSHOT:
            with self._locked():
                return self._prepare_dm(plan, record)

        self._register(record)
        try:
            if plan.strategy == QCOW2:
                self._create_overlay(plan)
            else:
                self._create_copy(plan)
        except BaseException:
            self._unregister(record)
            raise

        log.info(
            "sandbox %s: rootfs prepared (%s, %s)",
            plan.sandbox_id,
            plan.strategy,
            plan.disk_path,
        )
        return RootfsAttachment()

    def attach(self, plan: RootfsPlan) -> RootfsAttachment:
        """Attach an existing CoW disk again (after pause or stop)."""
        if not os.path.isfile(plan.cow_path):
            raise HostError(
                f"sandbox {plan.sandbox_id}: CoW disk {plan.cow_path} is missing; "
                "the sandbox's disk is lost and it cannot be started again."
            )
        if plan.strategy != DM_SNAPSHOT:
            return RootfsAttachment()

        self._ensure_work_dirs()
        with self._locked():
            attachment = self._attach_dm(plan, self._record_for(plan))

        log.info("sandbox %s: rootfs attached (%s)", plan.sandbox_id, plan.disk_path)
        return attachment

    def detach(self, plan: RootfsPlan, attachment: RootfsAttachment) -> None:
        """Release the dm device and loop devices; keep the CoW file.

        What is released is found from the kernel (dm names, loop back-files),
        not from ``attachment``, so a stale attachment is harmless.
        """
        if plan.strategy != DM_SNAPSHOT:
            return

        self._ensure_work_dirs()
        with self._locked():
            self._detach_dm(plan, self._record_for(plan))

        log.info("sandbox %s: rootfs detached", plan.sandbox_id)

    def remove(self, plan: RootfsPlan, attachment: RootfsAttachment) -> None:
        """Detach and delete the CoW file and its record. Idempotent."""
        self.detach(plan, attachment)

        try:
            _unlink_quietly(plan.cow_path)
        except OSError as exc:
            raise HostError(
                f"sandbox {plan.sandbox_id}: cannot delete CoW disk "
                f"{plan.cow_path}: {exc.strerror}; check its directory's permissions."
            ) from exc
        self._unregister(self._record_for(plan))

        log.info("sandbox %s: rootfs removed (%s)", plan.sandbox_id, plan.cow_path)

    # --- leftovers ----------------------------------------------------------------

    def leftovers(self, known: set[str]) -> list[tuple[str, str]]:
        """Rootfs objects this engine made that ``known`` omits.

        ``known`` holds ``"kind:name"`` strings (see :func:`resource_names`).
        Kinds: ``dm`` (dm devices named with our prefix), ``loop`` (loop
        devices on our CoW files, and read-only ones on templates we
        recorded), ``cow`` (CoW files we recorded). Listed in the order they
        can be removed: dm devices, CoW loops, template loops, CoW files.
        """
        self._ensure_work_dirs()
        with self._locked():
            records = self._records()
            templates = self._templates()
            loops = list_loop_devices(self.runner) if shutil.which("losetup") else []
            dms = self._dm_names() if not strategy_unavailable(DM_SNAPSHOT) else []

        cows = {record.cow_real for record in records}
        found: list[tuple[str, str]] = []
        prefix = self.settings.dm_prefix
        found += [("dm", name) for name in dms if name.startswith(prefix)]
        found += [("loop", loop.name) for loop in loops if loop.back_file in cows]
        found += [
            ("loop", loop.name)
            for loop in loops
            if loop.read_only
            and loop.back_file in templates
            and loop.back_file not in cows
        ]
        found += [("cow", record.cow_path) for record in records]
        return [(kind, name) for kind, name in found if f"{kind}:{name}" not in known]

    def remove_leftover(self, kind: str, name: str) -> None:
        """Remove one object :meth:`leftovers` reported. Absent is success.

        Refuses (:class:`HostError`) to touch a loop device that is not ours,
        and (:class:`ResourceBusy`) a template loop or CoW file still in use.
        """
        if kind not in ("dm", "loop", "cow"):
            raise ConfigError(
                "kind", f"{kind!r} is not a rootfs leftover kind", limit="dm, loop, cow"
            )
        self._ensure_work_dirs()
        with self._locked():
            if kind == "dm":
                self._remove_dm_leftover(name)
            elif kind == "loop":
                self._remove_loop_leftover(name)
            else:
                self._remove_cow_leftover(name)

        log.info("rootfs leftover %s %s removed", kind, name)

    # --- free space ---------------------------------------------------------------

    def free_bytes(self, path: str) -> int:
        """Bytes an unprivileged writer may still use on ``path``'s filesystem."""
        info = os.statvfs(path)
        return info.f_bavail * info.f_frsize

    def _check_space(self, plan: RootfsPlan) -> None:
        if plan.strategy == COPY:
            try:
                needed = os.stat(plan.template_path).st_blocks * 512
            except OSError as exc:
                raise HostError(
                    f"sandbox {plan.sandbox_id}: template {plan.template_path} "
                    f"cannot be read: {exc.strerror}; restore the template image."
                ) from exc
        elif plan.strategy == QCOW2:
            needed = QCOW2_OVERLAY_BYTES
        else:
            needed = 0
        needed += self.settings.min_free_bytes

        directory = os.path.dirname(plan.cow_path)
        try:
            available = self.free_bytes(directory)
        except FileNotFoundError as exc:
            raise HostError(
                f"sandbox {plan.sandbox_id}: sandbox directory {directory} does "
                "not exist; create it (paths.prepare_sandbox_dir) before the rootfs."
            ) from exc
        if available < needed:
            raise InsufficientSpace(directory, needed, available)

    # --- qcow2 and copy -------------------------------------------------------------

    def _create_overlay(self, plan: RootfsPlan) -> None:
        with (
            self._translated(plan, "reserve the qcow2 overlay"),
            _new_file(plan.cow_path),
        ):
            pass
        try:
            self.runner(
                [
                    "qemu-img",
                    "create",
                    "-f",
                    "qcow2",
                    "-F",
                    "raw",
                    "-b",
                    plan.template_path,
                    plan.cow_path,
                ]
            )
        except BaseException:
            _unlink_quietly(plan.cow_path)
            raise

    def _create_copy(self, plan: RootfsPlan) -> None:
        with self._translated(plan, "copy the template"):
            src = os.open(plan.template_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(src).st_size
                with _new_file(plan.cow_path) as dst:
                    try:
                        fcntl.ioctl(dst, FICLONE, src)
                    except OSError as exc:
                        if exc.errno not in _NO_REFLINK:
                            raise
                        _sparse_copy(src, dst, size)
            finally:
                os.close(src)

    # --- dm-snapshot ------------------------------------------------------------------

    def _prepare_dm(self, plan: RootfsPlan, record: _CowRecord) -> RootfsAttachment:
        self._register(record)
        try:
            with (
                self._translated(plan, "create the CoW file"),
                _new_file(plan.cow_path) as fd,
            ):
                os.ftruncate(fd, plan.cow_size_bytes)
            try:
                attachment = self._attach_dm(plan, record)
            except BaseException:
                _unlink_quietly(plan.cow_path)
                raise
        except BaseException:
            self._unregister(record)
            raise

        log.info(
            "sandbox %s: rootfs prepared (dm-snapshot, %s over %s)",
            plan.sandbox_id,
            plan.disk_path,
            attachment.template_loop,
        )
        return attachment

    def _attach_dm(self, plan: RootfsPlan, record: _CowRecord) -> RootfsAttachment:
        """Template loop, CoW loop, dm snapshot; undone in reverse on failure.

        Runs under the lock.
        """
        loops = list_loop_devices(self.runner)
        busy = [loop.name for loop in loops if loop.back_file == record.cow_real]
        if busy:
            raise ResourceBusy(
                "loop device", busy[0], f"already attached to {plan.cow_path}"
            )
        sectors = os.stat(record.template_path).st_size // 512
        self._register(record)

        try:
            template_loop = self._acquire_template_loop(record.template_path, loops)
            cow_loop = self.runner(["losetup", "--find", "--show", record.cow_real])
            cow_loop = cow_loop.strip()
            try:
                table = (
                    f"0 {sectors} snapshot {template_loop} {cow_loop} P "
                    f"{DM_CHUNK_SECTORS}"
                )
                self.runner(["dmsetup", "create", plan.dm_name, "--table", table])
            except BaseException as exc:
                self._undo(plan, exc, ["losetup", "-d", cow_loop])
                raise
        except BaseException as exc:
            self._undo_release(plan, exc, record.template_path)
            raise

        return RootfsAttachment(
            template_loop=template_loop, cow_loop=cow_loop, dm_name=plan.dm_name
        )

    def _detach_dm(self, plan: RootfsPlan, record: _CowRecord) -> None:
        """dm device, CoW loop, then the template loop if nobody uses it.

        Runs under the lock.
        """
        if plan.dm_name in self._dm_names():
            self.runner(["dmsetup", "remove", "--retry", plan.dm_name])

        for loop in list_loop_devices(self.runner):
            if loop.back_file == record.cow_real and not loop.autoclear:
                self.runner(["losetup", "-d", loop.name])

        self._release_template_loop(record.template_path)
        still = [
            loop.name
            for loop in list_loop_devices(self.runner)
            if loop.back_file == record.cow_real and not loop.autoclear
        ]
        if still:
            raise HostError(
                f"sandbox {plan.sandbox_id}: loop device {still[0]} on "
                f"{plan.cow_path} is still attached after `losetup -d`; find "
                "what holds it open (`lsof`, `dmsetup ls --tree`)."
            )

    def _acquire_template_loop(self, template: str, loops: list[LoopDevice]) -> str:
        """The shared read-only loop device of ``template``, set up if none."""
        for loop in loops:
            if loop.back_file == template and loop.read_only and not loop.autoclear:
                return loop.name

        path = self._template_record_path(template)
        try:
            _write_json(path, {"template_path": template})
        except OSError as exc:
            raise HostError(
                f"cannot write rootfs record {path} for template {template}: "
                f"{exc.strerror or exc}; check the work_dir's filesystem."
            ) from exc
        return self.runner(["losetup", "--find", "--show", "-r", template]).strip()

    def _release_template_loop(self, template: str) -> None:
        """Detach ``template``'s loop devices if no CoW loop of ours uses it."""
        loops = list_loop_devices(self.runner)
        if self._template_users(template, loops):
            return

        for loop in loops:
            if loop.back_file == template and loop.read_only and not loop.autoclear:
                self.runner(["losetup", "-d", loop.name])
        _unlink_quietly(self._template_record_path(template))

    def _template_users(self, template: str, loops: list[LoopDevice]) -> list[str]:
        """CoW loop devices on dm-snapshot sandboxes of ``template``: the refcount."""
        cows = {
            record.cow_real
            for record in self._records()
            if record.strategy == DM_SNAPSHOT and record.template_path == template
        }
        return [
            loop.name for loop in loops if loop.back_file in cows and not loop.read_only
        ]

    def _dm_names(self) -> list[str]:
        out = self.runner(["dmsetup", "ls"])
        if out.strip() == "No devices found":
            return []
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def _undo(self, plan: RootfsPlan, exc: BaseException, argv: list[str]) -> None:
        try:
            self.runner(argv)
        except HostError as undo_exc:
            log.warning(
                "sandbox %s: undo `%s` failed: %s",
                plan.sandbox_id,
                " ".join(argv),
                undo_exc,
            )
            exc.add_note(f"undo `{' '.join(argv)}` also failed: {undo_exc}")

    def _undo_release(
        self, plan: RootfsPlan, exc: BaseException, template: str
    ) -> None:
        try:
            self._release_template_loop(template)
        except HostError as undo_exc:
            log.warning(
                "sandbox %s: releasing template loop of %s failed: %s",
                plan.sandbox_id,
                template,
                undo_exc,
            )
            exc.add_note(f"releasing the template loop also failed: {undo_exc}")

    # --- leftover removal -------------------------------------------------------------

    def _remove_dm_leftover(self, name: str) -> None:
        if not name.startswith(self.settings.dm_prefix):
            raise HostError(
                f"dm device {name} does not carry the prefix "
                f"{self.settings.dm_prefix!r}; it is not ours and is left alone."
            )
        if name in self._dm_names():
            self.runner(["dmsetup", "remove", "--retry", name])

    def _remove_loop_leftover(self, name: str) -> None:
        loops = list_loop_devices(self.runner)
        loop = next((item for item in loops if item.name == name), None)
        if loop is None:
            return

        owners = [
            record for record in self._records() if record.cow_real == loop.back_file
        ]
        if owners:
            self.runner(["losetup", "-d", name])
            self._release_template_loop(owners[0].template_path)
            return

        if loop.read_only and loop.back_file in self._templates():
            users = self._template_users(loop.back_file, loops)
            if users:
                raise ResourceBusy(
                    "loop device",
                    name,
                    f"template loop still used by {', '.join(users)}",
                )
            self._release_template_loop(loop.back_file)
            return

        raise HostError(
            f"loop device {name} on {loop.back_file} was not made by this engine "
            "(no record in the rootfs work_dir); it is left alone."
        )

    def _remove_cow_leftover(self, cow_path: str) -> None:
        record = next(
            (item for item in self._records() if item.cow_path == cow_path), None
        )
        if record is None:
            return

        loops = [
            loop.name
            for loop in list_loop_devices(self.runner)
            if loop.back_file == record.cow_real
        ]
        if loops:
            raise ResourceBusy("CoW file", cow_path, f"still attached to {loops[0]}")
        _unlink_quietly(record.cow_path)
        self._unregister(record)

    # --- bookkeeping ------------------------------------------------------------------

    def _ensure_work_dirs(self) -> None:
        for path in (self._cow_dir, self._template_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The work_dir's file lock: one holder at a time across threads and
        processes (each entry opens its own file description)."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _record_for(self, plan: RootfsPlan) -> _CowRecord:
        directory = _canonical(os.path.dirname(plan.cow_path))
        return _CowRecord(
            sandbox_id=plan.sandbox_id,
            strategy=plan.strategy,
            cow_path=plan.cow_path,
            cow_real=os.path.join(directory, os.path.basename(plan.cow_path)),
            template_path=_canonical(plan.template_path),
            dm_name=plan.dm_name,
        )

    def _record_path(self, sandbox_id: str) -> str:
        return os.path.join(self._cow_dir, f"{sandbox_id}.json")

    def _template_record_path(self, template: str) -> str:
        key = hashlib.sha256(template.encode()).hexdigest()[:20]
        return os.path.join(self._template_dir, f"{key}.json")

    def _register(self, record: _CowRecord) -> None:
        path = self._record_path(record.sandbox_id)
        try:
            _write_json(path, record.to_dict())
        except OSError as exc:
            raise HostError(
                f"sandbox {record.sandbox_id}: cannot write rootfs record {path}: "
                f"{exc.strerror or exc}; check the work_dir's filesystem."
            ) from exc

    def _unregister(self, record: _CowRecord) -> None:
        _unlink_quietly(self._record_path(record.sandbox_id))

    def _records(self) -> list[_CowRecord]:
        records = []
        for entry in sorted(os.listdir(self._cow_dir)):
            if entry.endswith(".json"):
                data = _read_json(os.path.join(self._cow_dir, entry))
                if data is not None:
                    records.append(_CowRecord.from_dict(data))
        return records

    def _templates(self) -> set[str]:
        templates = set()
        for entry in os.listdir(self._template_dir):
            if entry.endswith(".json"):
                data = _read_json(os.path.join(self._template_dir, entry))
                if data is not None:
                    templates.add(str(data.get("template_path", "")))
        return templates

    def _template_size(self, template_path: str) -> int:
        if not template_path.startswith("/"):
            raise ConfigError(
                "rootfs_path",
                f"{template_path!r} is not absolute",
                hint="give the full path of the template image",
            )
        try:
            info = os.stat(template_path)
        except OSError as exc:
            raise ConfigError(
                "rootfs_path",
                f"template {template_path} cannot be read: {exc.strerror}",
                hint="give the path of an existing template image",
            ) from exc
        if not os.path.isfile(template_path) or info.st_size < 512:
            raise ConfigError(
                "rootfs_path",
                f"{template_path} is not a disk image",
                hint="give a regular file of at least 512 bytes",
            )
        return info.st_size

    @contextlib.contextmanager
    def _translated(self, plan: RootfsPlan, action: str) -> Iterator[None]:
        """Translate OSError from file work into HostError, cause chained."""
        try:
            yield
        except FileExistsError as exc:
            raise ResourceBusy(
                "CoW file", plan.cow_path, "left by an earlier sandbox"
            ) from exc
        except OSError as exc:
            raise HostError(
                f"sandbox {plan.sandbox_id}: cannot {action} at {plan.cow_path}: "
                f"{exc.strerror or exc}; check the sandbox directory's filesystem "
                "(space, permissions)."
            ) from exc


def _default_cow_size(template_size: int) -> int:
    size = template_size + template_size // 64 + MIB
    return (size + 4095) // 4096 * 4096
