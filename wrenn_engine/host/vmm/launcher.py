"""Starting, recognising and stopping VMM processes.

A VMM starts inside the sandbox's network namespace: it is forked from a
short-lived thread that has entered the namespace, so the process the
engine starts *is* the VMM (no trampoline) and was born there. Its standard
output and error go to the VMM log in the sandbox's directory, never to the
engine's terminal, and it runs in its own session so a Ctrl-C at the
engine's terminal does not reach it. Two environment markers
(:data:`OWNER_ENV`, :data:`SANDBOX_ENV`) let a restarted engine find the
VMMs it started (``/proc/<pid>/environ``).

A :class:`~wrenn_engine.host.base.VmmProcess` is recognised by pid *and* its
start time (``/proc/<pid>/stat`` field 22) *and* its command line, so a
recycled pid is never taken for the VMM. Signals go through a pidfd opened
before that check, so they cannot reach a process that took the pid since.
The engine reaps the VMMs it launched itself (it is their parent); after a
restart it is not, and the exit status of such a VMM cannot be known
(:data:`EXIT_UNKNOWN`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wrenn_engine.domain.config import NETNS_NAME_MAX, NETNS_RE, UNIX_SOCKET_PATH_MAX
from wrenn_engine.errors import ConfigError, ResourceBusy, VmmError
from wrenn_engine.host import netns
from wrenn_engine.host.base import VmmProcess, VmmSpec
from wrenn_engine.host.vmm.client import VmmClient

logger = logging.getLogger(__name__)

#: Environment marker: which engine (its state directory) started the VMM.
OWNER_ENV = "WRENN_ENGINE_OWNER"
#: Environment marker: the sandbox the VMM belongs to.
SANDBOX_ENV = "WRENN_ENGINE_SANDBOX"

SIMULATOR_PATH = str(Path(__file__).with_name("simulator.py"))
#: What ``python -c`` runs to start the simulator from :data:`SIMULATOR_PATH`
#: (its first argument): importing the file lets Python use its cached
#: bytecode, where a file run as a script is compiled on every start (about
#: 8 ms of CPU for the simulator). The directory goes at the end of
#: ``sys.path``, so no standard module is shadowed.
SIMULATOR_BOOT = (
    "import sys;sys.path.append(sys.argv.pop(1).rpartition('/')[0]);"
    "import simulator;sys.exit(simulator.main())"
)

#: ``wait_exit`` of a VMM this process did not start: it exited, status unknown.
EXIT_UNKNOWN = -1

_POLL_FIRST_S = 0.001
_POLL_MAX_S = 0.002
_PING_TIMEOUT_S = 1.0
_LOG_TAIL_BYTES = 4096
_LOG_TAIL_LINES = 20
_MAX_REMEMBERED = 1024

# Children this process launched, by (pid, start time): the Popen objects that
# reap them and keep their exit status.
_children: dict[tuple[int, int], subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()


# --- checks on the way in ---------------------------------------------------------


def check_spec(spec: VmmSpec) -> None:
    """Refuse a spec whose paths or names the VMM's options cannot carry."""
    paths = {
        "socket_path": spec.socket_path,
        "sandbox_dir": spec.sandbox_dir,
        "log_path": spec.log_path,
        "event_monitor_path": spec.event_monitor_path,
    }
    if spec.restore_from:
        paths["restore_from"] = spec.restore_from
    for name, value in paths.items():
        if not value.startswith("/") or "\x00" in value:
            raise ConfigError(
                name,
                f"{value!r} is not an absolute path",
                hint="give the full path, starting with '/'",
            )
        if "," in value or any(part == ".." for part in value.split("/")):
            raise ConfigError(
                name,
                f"{value!r} contains ',' or '..'",
                limit="no ',' (the VMM's option syntax) and no '..'",
            )

    size = len(spec.socket_path.encode())
    if size > UNIX_SOCKET_PATH_MAX:
        raise ConfigError(
            "socket_path",
            f"{spec.socket_path!r} is {size} bytes long",
            limit=f"{UNIX_SOCKET_PATH_MAX} bytes for a unix socket path",
            hint="use a shorter directory or sandbox id",
        )
    if spec.netns and (
        len(spec.netns) > NETNS_NAME_MAX or not NETNS_RE.fullmatch(spec.netns)
    ):
        raise ConfigError(
            "netns",
            f"{spec.netns!r} is not a network namespace name",
            limit=f"letters, digits, '.', '-', '_'; at most {NETNS_NAME_MAX} bytes",
        )


def ensure_sandbox_dir(path: str) -> None:
    """Create the sandbox's directory (0700) or accept it if it is safely ours.

    A symbolic link, a non-directory or a directory owned by another user is
    refused; an own directory with looser permissions is tightened to 0700.
    """
    parent = os.path.dirname(path.rstrip("/"))
    if parent:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)

    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(
            "sandbox_dir",
            f"{path} exists and is not a directory (a symbolic link is never followed)",
            hint="remove it, or choose another sandbox_dir",
        )
    if info.st_uid != os.geteuid():
        raise ConfigError(
            "sandbox_dir",
            f"{path} is owned by uid {info.st_uid}, not "
            f"by this engine (uid {os.geteuid()})",
            hint="remove it, or choose another sandbox_dir",
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


# --- the API socket ---------------------------------------------------------------


def socket_state(path: str) -> str:
    """``absent``, ``stale`` (nothing answers), ``live`` or ``not-socket``."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISSOCK(info.st_mode):
        return "not-socket"

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return "stale"
    except FileNotFoundError:
        return "absent"
    except OSError as exc:
        # EAGAIN: the listener's backlog is full, so something does listen.
        return "live" if exc.errno in (errno.EAGAIN, errno.ETIMEDOUT) else "stale"
    finally:
        probe.close()
    return "live"


def clear_stale_socket(path: str, sandbox_id: str = "") -> None:
    """Remove ``path`` if it is a socket nobody answers on; refuse otherwise."""
    state = socket_state(path)
    if state == "live":
        raise ResourceBusy("API socket", path, "a process answers on it")
    if state == "not-socket":
        raise ResourceBusy("API socket path", path, "it is not a socket")
    if state == "stale":
        _unlink(path)
        logger.info("sandbox %s: removed stale API socket %s", sandbox_id, path)


def remove_socket_files(path: str) -> bool:
    """Remove the socket and upstream's ``<socket>.lock`` if nobody uses them.

    Returns False (and removes nothing) when a process still answers.
    """
    state = socket_state(path)
    if state == "live":
        return False
    if state == "stale":
        _unlink(path)
    _remove_free_lock(path + ".lock")
    return True


def _remove_free_lock(path: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # a VMM holds it
    else:
        _unlink(path)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --- starting ---------------------------------------------------------------------


def simulator_program() -> list[str]:
    """The interpreter and arguments that run the simulator (``python -I -S``:
    no ``site``, no environment, no package import)."""
    return [sys.executable, "-I", "-S", "-c", SIMULATOR_BOOT, SIMULATOR_PATH]


def vmm_argv(
    spec: VmmSpec,
    program: Sequence[str],
    *,
    verbose: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """cloud-hypervisor's command line for ``spec`` (the simulator takes the same).

    ``program`` is the binary, or the interpreter and script of the simulator.
    """
    argv = [
        *program,
        "--api-socket",
        f"path={spec.socket_path}",
        "--event-monitor",
        f"path={spec.event_monitor_path}",
        "--log-file",
        spec.log_path,
    ]
    if verbose:
        argv.append("-v")
    if spec.restore_from:
        argv += ["--restore", f"source_url=file://{spec.restore_from}"]
    return argv + list(extra)


def launch(
    spec: VmmSpec,
    argv: Sequence[str],
    timeout: float,
    *,
    environment: Mapping[str, str],
) -> VmmProcess:
    """Start ``argv`` in ``spec.netns`` and wait until its API answers a ping.

    ``environment`` is added to the engine's environment (the markers). On
    any failure the process is killed and reaped, the socket removed, and
    :class:`VmmError` carries the tail of the VMM log.
    """
    check_spec(spec)
    try:
        ensure_sandbox_dir(spec.sandbox_dir)
        clear_stale_socket(spec.socket_path, spec.sandbox_id)
        log_fd = os.open(
            spec.log_path,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
    except OSError as exc:
        raise VmmError(
            "vmm.launch",
            None,
            f"cannot prepare {exc.filename or spec.sandbox_dir}: {exc.strerror}",
        ) from exc

    try:
        child = _spawn(spec, list(argv), {**os.environ, **environment}, log_fd)
    finally:
        os.close(log_fd)

    started = time.monotonic()
    try:
        ping = _wait_for_api(child, spec, timeout)
        process = _identify(child, ping, spec)
    except BaseException:
        _kill_child(child)
        remove_socket_files(spec.socket_path)
        raise

    _remember(process, child)
    logger.info(
        "sandbox %s: VMM pid %d answers on %s after %.0f ms",
        spec.sandbox_id,
        process.pid,
        spec.socket_path,
        (time.monotonic() - started) * 1000,
    )
    return process


def _spawn(
    spec: VmmSpec, argv: list[str], env: dict[str, str], log_fd: int
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output on ``log_fd``, inside ``spec.netns``
    when it names one.

    A network namespace belongs to a thread, and a child is born in the
    namespace of the thread that forks it. So the child is started from a
    short-lived thread that has entered the namespace (``netns.start_in``):
    no trampoline process, and no ``preexec_fn`` (not safe in a threaded
    program). The engine's own threads never change namespace.
    """

    def start() -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                env=env,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            raise VmmError(
                "vmm.launch", None, f"cannot start {argv[0]}: {exc.strerror}"
            ) from exc

    if not spec.netns:
        return start()
    try:
        task = netns.start_in(spec.netns, start)
    except OSError as exc:
        raise _netns_error(spec.netns, exc) from exc
    try:
        return task.join()
    except BaseException as exc:
        # Interrupted while the thread may still start the child: wait for
        # it, and end a child that nobody is going to watch.
        if task.wait() is None:
            _kill_child(task.join())
        if isinstance(exc, OSError):
            raise _netns_error(spec.netns, exc) from exc
        raise


def _netns_error(name: str, exc: OSError) -> VmmError:
    return VmmError(
        "vmm.launch",
        None,
        f"cannot enter network namespace {name!r}: {exc.strerror or exc}; "
        "check that it exists (`ip netns list`)",
    )


def _wait_for_api(
    child: subprocess.Popen[bytes], spec: VmmSpec, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    delay = _POLL_FIRST_S
    last = "the socket was never created"
    while True:
        code = child.poll()
        if code is not None:
            raise VmmError(
                "vmm.launch",
                None,
                f"the VMM exited with status {code} before its API "
                f"answered; {spec.log_path} ends with: "
                f"{log_tail(spec.log_path)}",
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise VmmError(
                "vmm.launch",
                None,
                f"the API on {spec.socket_path} did not answer within "
                f"{timeout:g}s ({last}); {spec.log_path} ends with: "
                f"{log_tail(spec.log_path)}",
            )

        if os.path.exists(spec.socket_path):
            client = VmmClient(spec.socket_path, min(remaining, _PING_TIMEOUT_S))
            try:
                return client.ping()
            except VmmError as exc:
                last = exc.detail
        time.sleep(min(delay, max(remaining, 0)))
        delay = min(delay * 2, _POLL_MAX_S)


def _identify(
    child: subprocess.Popen[bytes], ping: dict[str, Any], spec: VmmSpec
) -> VmmProcess:
    answering = ping.get("pid")
    if isinstance(answering, int) and answering != child.pid:
        raise ResourceBusy(
            "API socket",
            spec.socket_path,
            f"pid {answering} answers on it, not the VMM just "
            f"started (pid {child.pid})",
        )
    # The command line as the kernel reports it: a script's interpreter shows
    # up in front of the argv the engine passed.
    info = read_stat(child.pid)
    cmdline = read_cmdline(child.pid)
    if info is None or cmdline is None:
        raise VmmError(
            "vmm.launch",
            None,
            f"pid {child.pid} vanished after "
            f"answering; {spec.log_path} ends with: "
            f"{log_tail(spec.log_path)}",
        )
    return VmmProcess(pid=child.pid, start_time=info[1], argv=cmdline)


def _kill_child(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()


def _remember(process: VmmProcess, child: subprocess.Popen[bytes]) -> None:
    with _children_lock:
        if len(_children) >= _MAX_REMEMBERED:
            for key in [k for k, c in _children.items() if c.returncode is not None]:
                del _children[key]
        _children[(process.pid, process.start_time)] = child


def _child(process: VmmProcess) -> subprocess.Popen[bytes] | None:
    with _children_lock:
        return _children.get((process.pid, process.start_time))


def reap_children() -> int:
    """Reap every launched VMM that has exited (no zombies); how many are there.

    Their exit statuses stay available to :func:`wait_exit` until
    :func:`forget`.
    """
    with _children_lock:
        children = list(_children.values())
    return sum(1 for child in children if child.poll() is not None)


def forget(process: VmmProcess) -> None:
    """Drop a reaped child from the table of children."""
    with _children_lock:
        child = _children.get((process.pid, process.start_time))
        if child is not None and child.poll() is not None:
            del _children[(process.pid, process.start_time)]


# --- looking at processes -------------------------------------------------------------


def read_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def read_cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            data = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return tuple(os.fsdecode(part) for part in data.split(b"\0")[:-1])


def read_environ(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    env: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[os.fsdecode(key)] = os.fsdecode(value)
    return env


def is_running(process: VmmProcess) -> bool:
    """True if ``process`` is alive and still the same program (no pid reuse)."""
    info = read_stat(process.pid)
    if info is None or info[1] != process.start_time:
        _reap(process)
        return False
    if info[0] in ("Z", "X"):
        _reap(process)
        return False
    return not process.argv or read_cmdline(process.pid) == tuple(process.argv)


def _reap(process: VmmProcess) -> int | None:
    child = _child(process)
    return None if child is None else child.poll()


def wait_exit(process: VmmProcess, timeout: float) -> int | None:
    """The exit status once ``process`` has exited (within ``timeout``), or None.

    :data:`EXIT_UNKNOWN` for a VMM this process did not start.
    """
    child = _child(process)
    if child is not None:
        try:
            return child.wait(timeout=max(timeout, 0))
        except subprocess.TimeoutExpired:
            return None

    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return EXIT_UNKNOWN
    try:
        info = read_stat(process.pid)
        if info is None or info[1] != process.start_time:
            return EXIT_UNKNOWN  # gone, and the pid may be another's now
        # The pidfd turns readable only once the process has exited, after
        # it closed its files (and so released the socket's lock). Its command
        # line empties earlier, while it still exits: not a sign to trust.
        return EXIT_UNKNOWN if _wait_readable(pidfd, timeout) else None
    finally:
        os.close(pidfd)


def _wait_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def terminate(
    process: VmmProcess, *, grace: float, kill_wait: float, sandbox_id: str = ""
) -> bool:
    """SIGTERM, then SIGKILL after ``grace``; True once the process is gone.

    Signals go through a pidfd, and only after the pid is checked to still be
    ``process``; a pid that now belongs to another program is left alone.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        _reap(process)
        return True
    try:
        if not is_running(process):
            return True
        for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
            logger.warning(
                "sandbox %s: sending %s to VMM pid %d",
                sandbox_id,
                signal.Signals(signum).name,
                process.pid,
            )
            try:
                signal.pidfd_send_signal(pidfd, signum)
            except ProcessLookupError:
                break
            if _wait_readable(pidfd, wait):
                break
        else:
            return False
    finally:
        os.close(pidfd)
    child = _child(process)
    if child is not None:
        child.wait(timeout=kill_wait)
    return True


def find_marked(owner: str) -> list[tuple[int, str]]:
    """(pid, sandbox id) of live processes carrying this engine's markers."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        env = read_environ(int(entry))
        if not env or env.get(OWNER_ENV) != owner or SANDBOX_ENV not in env:
            continue
        info = read_stat(int(entry))
        if info is not None and info[0] not in ("Z", "X"):
            found.append((int(entry), env[SANDBOX_ENV]))
    return sorted(found)


def api_socket_of(argv: Sequence[str]) -> str | None:
    """The ``--api-socket path=...`` a VMM command line names, if any."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "--api-socket":
            value = argv[i + 1]
            return value[len("path=") :] if value.startswith("path=") else value
    return None


def log_tail(path: str) -> str:
    """The last lines of a log file, on one line, for an error message."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - _LOG_TAIL_BYTES))
            data = handle.read()
    except OSError as exc:
        return f"(log unreadable: {exc.strerror})"
    lines = data.decode("utf-8", "replace").strip().splitlines()[-_LOG_TAIL_LINES:]
    return " | ".join(line.strip() for line in lines) or "(log is empty)"
