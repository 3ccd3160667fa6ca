"""nftables inside a chosen network namespace, without a process where possible.

Writes: ``apply`` loads a ruleset in nft's syntax, which the kernel commits
as one transaction (all of it or none of it). It calls libnftables (the
library behind the ``nft`` command) in this process when the library can be
loaded, and runs ``nft -f -`` otherwise; both parse the same text and send
the same batch, so the result is the same, but the library call takes about
1 ms where a process takes 6 to 10. ``delete_table`` and ``list_tables``
speak nfnetlink themselves: one small message each, no parsing of rules.

How the work gets into a namespace: it runs in a thread that has entered the
namespace (``netns.run_in``). A netlink socket belongs to the namespace of
the thread that opens it, and a process started from that thread is born
there, so no ``ip netns exec`` or ``nsenter`` is needed.

libnftables keeps some state in globals (its interface cache, a one-time
initialisation), so calls into it are serialized by a lock; each holds it
for about a millisecond. The library ends the whole process (``exit``) if it
cannot open its netlink socket; a probe opens the same kind of socket first,
in the same thread, and turns that case into a ``HostError`` instead. The
probe cannot rule out every way of losing the race (another thread taking
the last free file descriptor in between); the ``nft`` command has no such
risk, and ``use_library(False)`` selects it.

Closing an nfnetlink socket makes the kernel first finish any pending
nftables deletion on the host, which waits for an RCU grace period (10-20 ms
after a table delete); the sockets this module opens itself are therefore
closed by a background thread. libnftables closes its own, under its lock.

A failing ruleset is a ``HostCommandError`` keeping the status and the error
text, whichever way it was loaded; its argv is the command it stands for
(``nft -f -``), starting with ``[netns NAME]`` when it ran inside a
namespace. A failing netlink call or a missing namespace is a ``HostError``.
Each is chained to its cause.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from wrenn_engine.errors import ConfigError, HostCommandError, HostError
from wrenn_engine.host import netns

NFT = "nft"
LIBRARY = "libnftables.so.1"
TIMEOUT = 10.0
APPLY_ARGV = (NFT, "-f", "-")
TABLE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")

#: nfgen_family numbers of the nftables families, as ``nft`` names them.
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
_FAMILY_NUMBERS = {name: number for number, name in FAMILIES.items()}

_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFNL_MSG_BATCH_BEGIN = 0x10
_NFNL_MSG_BATCH_END = 0x11
_NFT_MSG_NEWTABLE = 0
_NFT_MSG_GETTABLE = 1
_NFT_MSG_DELTABLE = 2
_NFTA_TABLE_NAME = 1
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_DUMP_INTR = 0x10
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_HEADER = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_ATTR = struct.Struct("=HH")
_DUMP_RETRIES = 5

T = TypeVar("T")


def apply(ruleset: str, namespace: str | None = None) -> None:
    """Load ``ruleset`` in ``namespace`` (None: here), like ``nft -f -``.

    The ruleset is committed atomically: if any line fails, nothing changes.
    """
    if namespace is None:
        _load(None, ruleset)
        return
    task = start_apply(ruleset, namespace)
    try:
        task.join()
    except OSError as exc:
        raise _namespace_error(namespace, APPLY_ARGV, exc) from exc


def start_apply(ruleset: str, namespace: str | None) -> netns.Task[None]:
    """Start ``apply`` in the background; ``join`` the task on every path to
    learn how it ended (it raises what ``apply`` would)."""
    try:
        return netns.start_in(namespace, lambda: _load(namespace, ruleset))
    except OSError as exc:
        raise _namespace_error(namespace, APPLY_ARGV, exc) from exc


def delete_table(family: str, name: str, namespace: str | None = None) -> None:
    """Delete the table ``family name`` and everything in it. Idempotent.

    One nfnetlink transaction, answered as soon as it is committed; a table
    that does not exist counts as deleted.
    """
    if family not in _FAMILY_NUMBERS or not TABLE_NAME_RE.fullmatch(name):
        raise ConfigError(
            "table",
            f"{family} {name!r} is not an nftables table",
            limit=f"family one of {', '.join(FAMILIES.values())}; a name of "
            "letters, digits, '.', '-', '_', starting with a letter",
        )
    argv = (NFT, "delete", "table", family, name)
    _in(namespace, argv, lambda: _delete_table(namespace, family, name))


def list_tables(namespace: str | None = None) -> list[tuple[str, str]]:
    """(family, name) of every nftables table in ``namespace`` (None: here)."""
    argv = (NFT, "list", "tables")
    return _in(namespace, argv, lambda: _dump_tables(namespace))


def use_library(enabled: bool) -> None:
    """Load rulesets through libnftables (True, the default, when it loads)
    or always through the ``nft`` command (False)."""
    _choice.wanted = enabled


def library_loaded() -> bool:
    """True if ``apply`` calls libnftables rather than starting ``nft``."""
    return _library() is not None


# --- libnftables -----------------------------------------------------------------


class _Libnftables:
    """The few calls of libnftables' C API that ``apply`` needs."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.ctx_new = lib.nft_ctx_new
        self.ctx_new.restype = ctypes.c_void_p
        self.ctx_new.argtypes = [ctypes.c_uint32]
        self.ctx_free = lib.nft_ctx_free
        self.ctx_free.restype = None
        self.ctx_free.argtypes = [ctypes.c_void_p]
        self.buffer_output = lib.nft_ctx_buffer_output
        self.buffer_output.restype = ctypes.c_int
        self.buffer_output.argtypes = [ctypes.c_void_p]
        self.buffer_error = lib.nft_ctx_buffer_error
        self.buffer_error.restype = ctypes.c_int
        self.buffer_error.argtypes = [ctypes.c_void_p]
        self.error_buffer = lib.nft_ctx_get_error_buffer
        self.error_buffer.restype = ctypes.c_char_p
        self.error_buffer.argtypes = [ctypes.c_void_p]
        self.run = lib.nft_run_cmd_from_buffer
        self.run.restype = ctypes.c_int
        self.run.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lock = threading.Lock()

    def load(self, ruleset: str) -> tuple[int, str]:
        """(status, error text) of loading ``ruleset`` in this thread's
        namespace; status 0 is success."""
        with self.lock:
            _probe_netlink()
            ctx = self.ctx_new(0)
            if not ctx:
                raise OSError(errno.ENOMEM, "nft_ctx_new failed")
            try:
                if self.buffer_output(ctx) != 0 or self.buffer_error(ctx) != 0:
                    raise OSError(errno.ENOMEM, "cannot buffer libnftables output")
                status = self.run(ctx, ruleset.encode())
                message = self.error_buffer(ctx) or b""
            finally:
                self.ctx_free(ctx)
        return status, message.decode("utf-8", "replace")


class _Choice:
    """Whether to use libnftables, and the library once loaded."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wanted = True
        self.tried = False
        self.library: _Libnftables | None = None


_choice = _Choice()


def _library() -> _Libnftables | None:
    """libnftables, loaded once; None when it is missing or not wanted."""
    if not _choice.wanted:
        return None
    with _choice.lock:
        if not _choice.tried:
            _choice.tried = True
            try:
                _choice.library = _Libnftables(ctypes.CDLL(LIBRARY))
            except (OSError, AttributeError):
                _choice.library = None
        return _choice.library


def _probe_netlink() -> None:
    """Open an nfnetlink socket, as libnftables is about to (it exits the
    process when that fails), and let it go."""
    _close_soon(
        socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER
        )
    )


# --- internals ----------------------------------------------------------------


def _in(namespace: str | None, argv: Sequence[str], func: Callable[[], T]) -> T:
    try:
        return netns.run_in(namespace, func)
    except OSError as exc:
        raise _namespace_error(namespace, argv, exc) from exc


def _namespace_error(
    namespace: str | None, argv: Sequence[str], exc: OSError
) -> HostError:
    return HostError(
        f"cannot run `{' '.join(argv)}` in network namespace {namespace}: "
        f"{exc.strerror or exc}; check that the namespace exists "
        "(`ip netns list`)."
    )


def _shown(namespace: str | None, argv: Sequence[str]) -> tuple[str, ...]:
    if namespace is None:
        return tuple(argv)
    return (f"[netns {namespace}]", *argv)


def _load(namespace: str | None, ruleset: str) -> None:
    """Load ``ruleset`` in the current thread's namespace, by the library or
    by ``nft -f -``."""
    library = _library()
    if library is None:
        _run(namespace, APPLY_ARGV, ruleset)
        return

    shown = _shown(namespace, APPLY_ARGV)
    try:
        status, message = library.load(ruleset)
    except OSError as exc:
        raise HostError(
            f"libnftables cannot reach nf_tables in "
            f"{'network namespace ' + namespace if namespace else 'this namespace'}: "
            f"{exc.strerror or exc}; check that the nf_tables kernel module is "
            "loaded (`nft list tables`)."
        ) from exc
    if status != 0:
        # What `nft -f -` would report for the same text: status 1, this text.
        raise HostCommandError(shown, 1, message)


def _run(namespace: str | None, argv: Sequence[str], stdin: str) -> None:
    shown = _shown(namespace, argv)
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except FileNotFoundError as exc:
        raise HostCommandError(
            shown, 127, f"{NFT} is not on PATH; install nftables"
        ) from exc
    except OSError as exc:
        raise HostCommandError(shown, 126, f"cannot start {NFT}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise HostCommandError(shown, -1, f"no answer within {TIMEOUT:g}s") from exc

    if done.returncode != 0:
        cause = subprocess.CalledProcessError(
            done.returncode, list(argv), done.stdout, done.stderr
        )
        raise HostCommandError(shown, done.returncode, done.stderr) from cause


def _delete_table(namespace: str | None, family: str, name: str) -> None:
    try:
        with _session() as session:
            session.delete_table(_FAMILY_NUMBERS[family], name)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise _netlink_error(f"deleting table {family} {name}", namespace, exc) from exc


def _dump_tables(namespace: str | None) -> list[tuple[str, str]]:
    try:
        with _session() as session:
            found = session.tables()
    except OSError as exc:
        raise _netlink_error("listing nftables tables", namespace, exc) from exc
    return [(FAMILIES.get(number, str(number)), name) for number, name in found]


# --- nfnetlink ------------------------------------------------------------------


class _Session:
    """An nfnetlink socket in the namespace of the thread that opened it,
    speaking just enough of nf_tables to delete and list tables. Failures
    are ``OSError`` with the kernel's errno."""

    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER
        )
        try:
            self.sock.settimeout(TIMEOUT)
            self.sock.bind((0, 0))
        except BaseException:
            self.sock.close()
            raise
        self.seq = 0

    def delete_table(self, family: int, name: str) -> None:
        """Delete table ``name`` of ``family`` in one transaction; ENOENT if
        there is none."""
        first = self.seq + 1
        self.seq += 3
        batch = (
            _message(
                _NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, first, 0, _NFNL_SUBSYS_NFTABLES
            )
            + _message(
                _nft_type(_NFT_MSG_DELTABLE),
                _NLM_F_REQUEST | _NLM_F_ACK,
                first + 1,
                family,
                0,
                _attribute(_NFTA_TABLE_NAME, name.encode() + b"\0"),
            )
            + _message(
                _NFNL_MSG_BATCH_END, _NLM_F_REQUEST, first + 2, 0, _NFNL_SUBSYS_NFTABLES
            )
        )
        self.sock.send(batch)
        for kind, _flags, seq, payload in self._replies():
            if kind != _NLMSG_ERROR or seq not in (first, first + 1):
                continue
            code = -struct.unpack_from("=i", payload)[0]
            if code:
                raise OSError(code, os.strerror(code))
            if seq == first + 1:
                return

    def tables(self) -> list[tuple[int, str]]:
        """(family number, name) of every table, from one consistent dump."""
        for _attempt in range(_DUMP_RETRIES):
            self.seq += 1
            self.sock.send(
                _message(
                    _nft_type(_NFT_MSG_GETTABLE),
                    _NLM_F_REQUEST | _NLM_F_DUMP,
                    self.seq,
                    0,
                    0,
                )
            )
            found: list[tuple[int, str]] = []
            interrupted = False
            for kind, flags, seq, payload in self._replies():
                if seq != self.seq:
                    continue
                if kind == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    raise OSError(code, os.strerror(code))
                interrupted = interrupted or bool(flags & _NLM_F_DUMP_INTR)
                if kind == _NLMSG_DONE:
                    break
                if kind == _nft_type(_NFT_MSG_NEWTABLE):
                    family = payload[0]
                    name = dict(_attributes(payload[_NFGEN.size :])).get(
                        _NFTA_TABLE_NAME
                    )
                    if name is not None:
                        found.append((family, name.rstrip(b"\0").decode()))
            if not interrupted:
                return found
        raise OSError(errno.EINTR, "the table dump kept changing under it")

    def _replies(self) -> Iterator[tuple[int, int, int, bytes]]:
        """(type, flags, sequence number, payload) of each message received,
        until the caller stops."""
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, flags, seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise OSError(errno.EBADMSG, "malformed netlink message")
                yield kind, flags, seq, data[offset + _HEADER.size : offset + length]
                offset += (length + 3) & ~3


@contextmanager
def _session() -> Iterator[_Session]:
    session = _Session()
    try:
        yield session
    finally:
        _close_soon(session.sock)


def _nft_type(message: int) -> int:
    return (_NFNL_SUBSYS_NFTABLES << 8) | message


def _message(
    kind: int, flags: int, seq: int, family: int, res_id: int, body: bytes = b""
) -> bytes:
    payload = _NFGEN.pack(family, 0, socket.htons(res_id)) + body
    return _HEADER.pack(_HEADER.size + len(payload), kind, flags, seq, 0) + payload


def _attribute(kind: int, value: bytes) -> bytes:
    length = _ATTR.size + len(value)
    return _ATTR.pack(length, kind) + value + b"\0" * (-length % 4)


def _attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            return
        yield kind & 0x3FFF, data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3


def _close_soon(sock: socket.socket) -> None:
    """Close ``sock`` in a short-lived thread of its own: closing may wait
    for the kernel's pending deletions (see the module's docstring). The
    thread is not kept: it would pin the network namespace it was born in."""
    threading.Thread(target=sock.close, name="nft-close", daemon=True).start()


def _netlink_error(action: str, namespace: str | None, exc: Exception) -> HostError:
    where = f" in network namespace {namespace}" if namespace else ""
    return HostError(
        f"{action}{where} over nfnetlink failed: {exc}; check that the "
        "nf_tables kernel module is loaded (`nft list tables`)."
    )
