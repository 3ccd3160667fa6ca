"""Run a command inside a named network namespace, keeping the pid.

Usage::

    python -I -S nsexec.py <netns> -- <argv...>
    python -m wrenn_engine.host.vmm.nsexec <netns> -- <argv...>

Joins the network namespace bound at ``/run/netns/<netns>`` (where
``ip netns add`` and pyroute2 put them) with ``setns(CLONE_NEWNET)`` and then
``execv``\\ s the command, so the process the launcher started *is* the VMM:
its pid, start time and ``/proc/<pid>/cmdline`` are what the engine records.

Unlike ``ip netns exec`` it does not make a mount namespace or remount
``/sys``; the VMM only needs the network namespace for its TAP device.

The launcher runs this file by path with ``-I -S`` (no ``site``, no package
import) because it sits on the create path: that start costs about a third
of ``-m``. It therefore imports nothing but the standard library.

Exit codes when the command never starts: 125 (bad usage or namespace),
126 (not executable), 127 (not found). The reason goes to stderr, which the
launcher points at the sandbox's VMM log.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"


def _fail(code: int, message: str) -> int:
    sys.stderr.write(f"nsexec: {message}\n")
    sys.stderr.flush()
    return code


def enter_netns(name: str) -> None:
    """Move the calling process into the network namespace ``name``."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a network namespace name")

    fd = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--":
        return _fail(125, "usage: nsexec <netns> -- <command> [args...]")
    netns, command = args[0], args[2:]

    try:
        enter_netns(netns)
    except (OSError, ValueError) as exc:
        return _fail(125, f"cannot enter network namespace {netns!r}: {exc}")

    try:
        os.execv(command[0], command)
    except OSError as exc:
        code = 127 if exc.errno == errno.ENOENT else 126
        return _fail(code, f"cannot execute {command[0]!r}: {exc.strerror}")
    return 0  # not reached: execv replaced the process


if __name__ == "__main__":
    sys.exit(main())
