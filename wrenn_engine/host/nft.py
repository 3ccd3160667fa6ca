"""A small wrapper around ``nft``, run inside a chosen network namespace.

Writes go through the ``nft`` command: ``apply`` feeds a ruleset to
``nft -f -``, which the kernel commits as one transaction (all of it or none
of it). Reads (``list_tables``) ask the kernel directly over nfnetlink, which
answers the same question as ``nft list tables`` without starting a process.

How ``nft`` gets into a namespace: it is started from a thread that has
entered the namespace (``netns.run_in``), so the child process is born there.
This costs one process per call instead of three for ``ip netns exec``.

A failing ``nft`` is a ``HostCommandError`` keeping its exit status and
stderr; a failing read or a missing namespace is a ``HostError``; each is
chained to its cause. The argv in the error starts with ``[netns NAME]`` when
the command ran inside a namespace, so the message says where it ran.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Sequence
from typing import TypeVar

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.nftables.main import NFTables

from wrenn_engine.errors import ConfigError, HostCommandError, HostError
from wrenn_engine.host import netns

NFT = "nft"
TIMEOUT = 10.0
APPLY_ARGV = (NFT, "-f", "-")
TABLE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")

#: nfgen_family numbers of the nftables families, as ``nft`` names them.
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}

T = TypeVar("T")


def apply(ruleset: str, namespace: str | None = None) -> None:
    """Load ``ruleset`` with ``nft -f -`` in ``namespace`` (None: here).

    The ruleset is committed atomically: if any line fails, nothing changes.
    """
    if namespace is None:
        _run(None, APPLY_ARGV, ruleset)
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
        return netns.start_in(namespace, lambda: _run(namespace, APPLY_ARGV, ruleset))
    except OSError as exc:
        raise _namespace_error(namespace, APPLY_ARGV, exc) from exc


def delete_table(family: str, name: str, namespace: str | None = None) -> None:
    """Delete the table ``family name`` and everything in it. Idempotent.

    Declaring the table before deleting it, in the same transaction, makes
    the delete succeed whether or not the table existed.
    """
    if family not in FAMILIES.values() or not TABLE_NAME_RE.match(name):
        raise ConfigError(
            "table",
            f"{family} {name!r} is not an nftables table",
            limit=f"family one of {', '.join(FAMILIES.values())}; a name of "
            "letters, digits, '.', '-', '_', starting with a letter",
        )
    table = f"{family} {name}"
    apply(f"add table {table}\ndelete table {table}\n", namespace)


def list_tables(namespace: str | None = None) -> list[tuple[str, str]]:
    """(family, name) of every nftables table in ``namespace`` (None: here)."""
    argv = (NFT, "list", "tables")
    return _in(namespace, argv, lambda: _dump_tables(namespace))


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


def _dump_tables(namespace: str | None) -> list[tuple[str, str]]:
    try:
        sock = NFTables(nfgen_family=0)
        try:
            messages = sock.get_tables()
        finally:
            sock.close()
    except (NetlinkError, OSError) as exc:
        where = f" in network namespace {namespace}" if namespace else ""
        raise HostError(
            f"listing nftables tables{where} over nfnetlink failed: {exc}; check "
            "that the nf_tables kernel module is loaded (`nft list tables`)."
        ) from exc

    tables = []
    for message in messages:
        number = message["nfgen_family"]
        family = FAMILIES.get(number, str(number))
        tables.append((family, message.get_attr("NFTA_TABLE_NAME")))
    return tables
