"""Facts about processes from /proc: enough to tell a live process from a
recycled pid."""

from __future__ import annotations

import os
import secrets


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses; split after it.
    fields = raw[raw.rfind(b")") + 2 :].split()
    return int(fields[19])


def is_same_process(pid: int, started: int) -> bool:
    return start_time(pid) == started


def instance_id(host_id: str) -> str:
    """One engine object: ``host:pid:start_time:token``.

    The token tells apart two engines in one process; the pid and its start
    time tell whether the process is still alive (and not a recycled pid).
    """
    pid = os.getpid()
    return f"{host_id}:{pid}:{start_time(pid)}:{secrets.token_hex(4)}"


def instance_alive(instance: str, host_id: str) -> bool | None:
    """True/False for an instance on this host, None when it is another host's."""
    parts = instance.rsplit(":", 3)
    if len(parts) != 4:
        return False
    host, pid, started, _token = parts
    if host != host_id:
        return None
    try:
        return is_same_process(int(pid), int(started))
    except ValueError:
        return False
