"""Named network namespaces, made and entered without forking.

A named namespace is what ``ip netns add`` makes: a network namespace kept
alive by a bind mount on ``/run/netns/<name>``. This module makes one the same
way, but from a short-lived thread instead of a child process, because a
network namespace belongs to a thread, not to the whole process:

- ``create`` starts a thread that calls ``unshare(CLONE_NEWNET)`` (only that
  thread moves into the new namespace) and bind-mounts
  ``/proc/thread-self/ns/net`` on the name; the thread then ends.
- ``run_in`` starts a thread that calls ``setns`` into a named namespace and
  runs a function there. Netlink sockets the function opens, devices it opens
  (``/dev/net/tun``), ``/proc/sys/net`` files it writes and child processes
  it starts all belong to that namespace. The ``nft`` wrapper (libnftables'
  socket) and the VMM launcher (the VMM process) rely on it: a process
  started from such a thread is born inside the namespace, so no ``ip netns
  exec``, ``nsenter`` or other trampoline is spawned.
- ``start_in`` does the same without waiting; the returned ``Task`` is joined
  later, which lets the driver overlap work in two namespaces.

The calling thread never changes namespace, so a failure can never leave one
of the engine's own threads in the wrong namespace. A thread started from
inside a namespace starts there too and keeps the namespace alive while it
runs, so only short-lived work is started from such threads.

``identity`` and ``pids_in`` tell which processes live in a namespace (what
``ip netns pids`` shows), so that its name is not removed from under them.

``/run/netns`` is made a shared mount the first time, as iproute2 does, so
that removing a name also unmounts it in mount namespaces copied from this
one (``ip netns exec`` makes such copies).

Functions here raise ``OSError`` (with ``errno`` and the path); the network
driver translates them into the engine's errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

NETNS_RUN_DIR = "/run/netns"
NETNS_NAME_MAX = 63
NETNS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]

_rundir_lock = threading.Lock()
_rundir_ready = False

T = TypeVar("T")


def check_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a safe namespace name."""
    if len(name.encode()) > NETNS_NAME_MAX or not NETNS_NAME_RE.fullmatch(name):
        raise ValueError(
            f"network namespace name {name!r} must be 1 to {NETNS_NAME_MAX} bytes "
            "of letters, digits, '.', '-' and '_', starting with a letter or digit"
        )


def path(name: str) -> str:
    """The bind-mount path that keeps the namespace ``name`` alive."""
    check_name(name)
    return f"{NETNS_RUN_DIR}/{name}"


def exists(name: str) -> bool:
    return os.path.lexists(path(name))


def names() -> list[str]:
    """Every named namespace on this host, as ``ip netns list`` reads them."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def create(name: str) -> None:
    """Create the named namespace ``name``.

    Raises ``FileExistsError`` if the name is taken (nothing is touched then).
    On any other failure the mount point file is removed again.
    """
    target = path(name)
    _prepare_rundir()

    fd = os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
    os.close(fd)

    try:
        _in_thread(f"netns-new-{name}", lambda: _unshare_and_bind(target))
    except BaseException:
        _unlink_quietly(target)
        raise


def remove(name: str) -> bool:
    """Unmount and unlink the name; True if it existed. Idempotent.

    The kernel frees the namespace once no process, socket or open file
    refers to it any more; its links go with it.
    """
    target = path(name)
    if not os.path.lexists(target):
        return False

    if _libc.umount2(target.encode(), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):
            raise OSError(code, os.strerror(code), target)

    _unlink_quietly(target)
    return True


def run_in(name: str | None, func: Callable[[], T]) -> T:
    """Run ``func`` in the namespace ``name`` and return what it returns.

    ``None`` runs it right here, in the calling thread's namespace. Otherwise
    ``func`` runs in a new thread that has entered the namespace; its
    exception, if any, is raised here. Raises ``FileNotFoundError`` if the
    namespace does not exist.
    """
    if name is None:
        return func()
    return start_in(name, func).join()


def start_in(name: str | None, func: Callable[[], T]) -> Task[T]:
    """Start ``func`` in a new thread in namespace ``name`` and return at once.

    ``None`` keeps the calling thread's namespace (a new thread starts in
    the namespace of the thread that creates it). The caller must ``join``
    or ``detach`` the task on every path. Raises ``FileNotFoundError`` if the
    namespace does not exist.
    """
    if name is None:
        return Task(f"netns-task-{threading.get_ident()}", func)

    fd = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)

    def entered() -> T:
        try:
            return _enter_and_call(fd, func)
        finally:
            os.close(fd)

    try:
        return Task(f"netns-{name}", entered)
    except BaseException:
        os.close(fd)
        raise


class Task(Generic[T]):
    """A function running in its own thread; ``join`` hands back its result
    or raises its exception, ``detach`` leaves it to finish alone."""

    def __init__(self, thread_name: str, func: Callable[[], T]) -> None:
        self._func = func
        self._result: list[T] = []
        self._failure: list[BaseException] = []
        self._lock = threading.Lock()
        self._done = False
        self._on_failure: Callable[[BaseException], None] | None = None
        self._thread = threading.Thread(
            target=self._body, name=thread_name, daemon=True
        )
        self._thread.start()

    def join(self) -> T:
        """Wait for the function; return its result or raise its exception."""
        self._thread.join()
        if self._failure:
            raise self._failure[0]
        return self._result[0]

    def wait(self) -> BaseException | None:
        """Wait for the function; return its exception instead of raising."""
        self._thread.join()
        return self._failure[0] if self._failure else None

    def detach(self, on_failure: Callable[[BaseException], None]) -> None:
        """Let the function finish on its own instead of joining it; if it
        fails, ``on_failure`` gets the exception (in the task's thread, or
        here if it has already failed)."""
        with self._lock:
            if not self._done:
                self._on_failure = on_failure
                return
        if self._failure:
            on_failure(self._failure[0])

    def _body(self) -> None:
        try:
            self._result.append(self._func())
        except BaseException as exc:
            self._failure.append(exc)
        with self._lock:
            self._done = True
            report = self._on_failure
        if report is not None and self._failure:
            report(self._failure[0])


def identity(name: str) -> tuple[int, int]:
    """(device, inode) of the namespace bound at ``name``: equal for every
    handle on the same namespace, different for any other. Raises
    ``FileNotFoundError`` if the name does not exist."""
    info = os.stat(path(name))
    return info.st_dev, info.st_ino


def pids_in(namespace: tuple[int, int]) -> list[int]:
    """Pids of the processes whose network namespace is ``namespace`` (an
    ``identity``), as ``ip netns pids`` finds them: by each process's main
    thread. Reads ``/proc/<pid>/ns/net`` of every process, so its cost grows
    with the number of processes on the host."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            info = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if (info.st_dev, info.st_ino) == namespace:
            found.append(int(entry))
    return sorted(found)


def open_fd(name: str) -> int:
    """An open file descriptor of the namespace (for IFLA_NET_NS_FD).

    The caller closes it.
    """
    return os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)


# --- internals ----------------------------------------------------------------


def _enter_and_call(fd: int, func: Callable[[], T]) -> T:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")
    return func()


def _unshare_and_bind(target: str) -> None:
    if _libc.unshare(_CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare(CLONE_NEWNET): {os.strerror(code)}")

    source = b"/proc/thread-self/ns/net"
    if _libc.mount(source, target.encode(), b"none", _MS_BIND, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"bind mount of the namespace: {os.strerror(code)}", target)


def _prepare_rundir() -> None:
    """Make ``/run/netns`` exist and be a shared mount, once per process."""
    global _rundir_ready
    with _rundir_lock:
        if _rundir_ready:
            return
        os.makedirs(NETNS_RUN_DIR, mode=0o755, exist_ok=True)
        rundir = NETNS_RUN_DIR.encode()

        # Not yet a mount point (EINVAL): bind it onto itself, then share it.
        if _libc.mount(b"", rundir, b"none", _MS_SHARED | _MS_REC, None) != 0:
            code = ctypes.get_errno()
            if code != errno.EINVAL:
                raise OSError(code, os.strerror(code), NETNS_RUN_DIR)
            if _libc.mount(rundir, rundir, b"none", _MS_BIND | _MS_REC, None) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code), NETNS_RUN_DIR)
            if _libc.mount(b"", rundir, b"none", _MS_SHARED | _MS_REC, None) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code), NETNS_RUN_DIR)
        _rundir_ready = True


def _in_thread(thread_name: str, func: Callable[[], T]) -> T:
    """Run ``func`` in a fresh thread and hand back its result or exception."""
    return Task(thread_name, func).join()


def _unlink_quietly(target: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
