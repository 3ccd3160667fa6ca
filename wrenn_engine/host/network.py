"""The Linux network driver: a namespace, a veth pair, a TAP and NAT per sandbox.

What ``prepare`` builds for a sandbox on slot N (default pools, N = 12)::

    host namespace                           sandbox namespace <prefix>-<sandbox id>
    <prefix>-12h 10.200.0.49/30 <== veth ==> <prefix>-12p 10.200.0.50/30
    route 10.201.0.13/32 via 10.200.0.50     default via 10.200.0.49
                                             tap0 169.254.0.22/30, guest 169.254.0.21
    table inet <prefix>-12                   table inet <prefix>-12
      forward: accept to and from the veth     dnat 10.201.0.13 -> 169.254.0.21
      masquerade 10.200.0.48/30 and            snat 169.254.0.21 -> 10.201.0.13
      10.201.0.13 going anywhere else        net.ipv4.ip_forward = 1

The host reaches the guest at its host-reachable address (10.201.0.13 here);
the guest reaches the world through the TAP, the namespace's SNAT and the
host's masquerade. Everything the host namespace holds for the sandbox is the
veth (its route goes with it) and one nftables table, so tearing down the
host side is one link delete and one atomic table delete; the rest dies with
the namespace.

Links, addresses and routes are made over rtnetlink (pyroute2); links are
looked up with the SIOCGIFINDEX ioctl; rules are loaded in nft's syntax by
``wrenn_engine.host.nft`` (libnftables in this process, ``nft -f -`` where
the library is missing). Work inside a namespace runs in a short-lived thread
that entered it (``wrenn_engine.host.netns``); the two namespaces' halves of
a prepare run side by side. Nothing forks unless the ``nft`` command stands
in for libnftables.

The "host namespace" is the calling thread's namespace unless
``NetworkSettings.host_netns`` names another one; tests use that to keep every
object they make inside a namespace of their own.

What the operator must do in production (``host_netns`` None): the driver
never changes the root namespace's sysctls. Enable ``net.ipv4.ip_forward=1``
(the driver logs a warning once when it is off), and if another firewall
table's forward chain drops by default, allow the ``<prefix>-*h`` interfaces
there: an accept in this engine's table cannot override a drop elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from wrenn_engine.domain.config import (
    IFNAME_MAX,
    IFNAME_RE,
    SANDBOX_ID_MAX,
    SANDBOX_ID_RE,
)
from wrenn_engine.errors import (
    ConfigError,
    HostCommandError,
    HostError,
    ResourceBusy,
    WrennError,
)
from wrenn_engine.host import netns, nft
from wrenn_engine.host.base import NetworkPlan

log = logging.getLogger(__name__)

GUEST_IP = "169.254.0.21"
GUEST_NETMASK = "255.255.255.252"
TAP_IP = "169.254.0.22"
TAP_PREFIXLEN = 30
TAP_CIDR = f"{TAP_IP}/{TAP_PREFIXLEN}"
GUEST_NETWORK = IPv4Network("169.254.0.20/30")

#: The nftables family of every table this driver makes.
NFT_FAMILY = "inet"
#: Resource kinds ``leftovers`` reports and ``remove_leftover`` accepts.
KINDS = ("slot", "netns", "veth", "nft_table")

PREFIX_RE = re.compile(r"^[a-z][a-z0-9]*$")
FORWARD_SYSCTL = "/proc/sys/net/ipv4/ip_forward"
VETH_PREFIXLEN = 30

#: Seconds a deleted link may stay listed before the delete is waited for.
UNLIST_TIMEOUT_S = 1.0
_POLL_FIRST_S = 0.0005
_POLL_MAX_S = 0.002
_SIOCGIFINDEX = 0x8933

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    """Names and address pools of one engine's sandbox networks.

    ``prefix`` starts every name the driver makes (namespaces
    ``<prefix>-<sandbox id>``, links ``<prefix>-<slot>h`` and
    ``<prefix>-<slot>p``, tables ``<prefix>-<slot>``); two engines on one host
    need different prefixes. ``host_netns`` None means the calling thread's
    namespace (the root namespace in production); a name means "act as if
    this namespace were the host". Slot N uses the N-th /30 of ``veth_pool``
    and the (N+1)-th address of ``host_reachable_pool``; slots run from 0 to
    ``max_slots - 1``. Every value is checked on construction (ConfigError
    naming the field).
    """

    prefix: str = "wrenn"
    host_netns: str | None = None
    veth_pool: str = "10.200.0.0/16"
    host_reachable_pool: str = "10.201.0.0/16"
    max_slots: int = 4096
    tap: str = "tap0"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for the first value out of its limits."""
        if self.host_netns and self.host_netns.startswith(f"{self.prefix}-"):
            raise ConfigError(
                "host_netns",
                f"{self.host_netns!r} starts with the prefix {self.prefix!r} and a "
                "dash, like the sandbox namespaces this engine makes and removes",
                hint="name the host namespace differently or choose another prefix",
            )
        veth = _parse_pool("veth_pool", self.veth_pool)
        reachable = _parse_pool("host_reachable_pool", self.host_reachable_pool)
        for field, pool in (("veth_pool", veth), ("host_reachable_pool", reachable)):
            if pool.overlaps(GUEST_NETWORK):
                raise ConfigError(
                    field,
                    f"{pool} overlaps the guest network {GUEST_NETWORK}",
                    hint="choose a private range such as 10.200.0.0/16",
                )
        if veth.overlaps(reachable):
            raise ConfigError(
                "host_reachable_pool",
                f"{reachable} overlaps veth_pool {veth}",
                hint="give the two pools separate ranges",
            )

        capacity = min(_veth_capacity(veth), _reachable_capacity(reachable))
        if (
            isinstance(self.max_slots, bool)
            or not isinstance(self.max_slots, int)
            or not 1 <= self.max_slots <= capacity
        ):
            raise ConfigError(
                "max_slots",
                f"{self.max_slots!r} does not fit the address pools",
                limit=f"1 to {capacity} (the pools hold that many slots)",
                hint="lower max_slots or widen veth_pool and host_reachable_pool",
            )

        longest = len(str(self.max_slots - 1))
        room = IFNAME_MAX - longest - 2
        if not PREFIX_RE.fullmatch(self.prefix) or len(self.prefix) > room:
            raise ConfigError(
                "prefix",
                f"{self.prefix!r} cannot start this engine's names",
                limit=f"1 to {room} characters of a-z and 0-9, starting with a "
                f"letter (interface names are at most {IFNAME_MAX} bytes and "
                f"slot numbers reach {self.max_slots - 1})",
                hint="use a shorter prefix such as 'wrenn'",
            )

        if not IFNAME_RE.fullmatch(self.tap) or len(self.tap.encode()) > IFNAME_MAX:
            raise ConfigError(
                "tap",
                f"{self.tap!r} is not a valid interface name",
                limit=f"1 to {IFNAME_MAX} bytes of letters, digits, '.', '-', '_'",
            )

        if self.host_netns is not None:
            try:
                netns.check_name(self.host_netns)
            except ValueError as exc:
                raise ConfigError(
                    "host_netns", str(exc), hint="name an existing namespace or None"
                ) from exc


class LinuxNetworkDriver:
    """The ``NetworkDriver`` of ``wrenn_engine.host.base`` on a Linux host.

    Thread-safe: every call opens its own netlink sockets (pyroute2 sockets
    are not shared between threads), so the engine may prepare and tear down
    different sandboxes from several threads at once.
    """

    def __init__(self, settings: NetworkSettings | None = None) -> None:
        self.settings = settings or NetworkSettings()
        self._veth_pool = IPv4Network(self.settings.veth_pool)
        self._reachable_pool = IPv4Network(self.settings.host_reachable_pool)
        prefix = re.escape(self.settings.prefix)
        self._link_re = re.compile(rf"^{prefix}-(\d+)[hp]$")
        self._table_re = re.compile(rf"^{prefix}-(\d+)$")
        self._forwarding_checked = False

    # --- plan -------------------------------------------------------------------

    def plan(self, sandbox_id: str, slot: int) -> NetworkPlan:
        """Every name and address of ``sandbox_id`` on ``slot``; touches nothing."""
        _check_sandbox_id(sandbox_id)
        self._check_slot(slot)

        prefix = self.settings.prefix
        subnet = self._veth_subnet(slot)
        host_ip = subnet.network_address + 1
        ns_ip = subnet.network_address + 2
        reachable = self._reachable_pool.network_address + 1 + slot
        return NetworkPlan(
            sandbox_id=sandbox_id,
            slot=slot,
            netns=self._netns_name(sandbox_id),
            host_veth=f"{prefix}-{slot}h",
            ns_veth=f"{prefix}-{slot}p",
            tap=self.settings.tap,
            tap_cidr=TAP_CIDR,
            guest_ip=GUEST_IP,
            host_veth_cidr=f"{host_ip}/{VETH_PREFIXLEN}",
            ns_veth_cidr=f"{ns_ip}/{VETH_PREFIXLEN}",
            host_reachable_ip=str(reachable),
            nft_table=f"{prefix}-{slot}",
        )

    # --- slots ------------------------------------------------------------------

    def slot_in_use(self, slot: int) -> bool:
        """True if a link or the nft table of ``slot`` exists in the host namespace."""
        self._check_slot(slot)
        prefix = self.settings.prefix
        links = (f"{prefix}-{slot}h", f"{prefix}-{slot}p")
        table = f"{prefix}-{slot}"

        def look() -> bool:
            if any(_link_index(name) is not None for name in links):
                return True
            return (NFT_FAMILY, table) in nft.list_tables()

        return self._in_host(None, f"check slot {slot}", look)

    # --- prepare ----------------------------------------------------------------

    def prepare(self, plan: NetworkPlan) -> None:
        """Create the namespace, veth pair, TAP, addresses, routes and rules.

        Raises ResourceBusy (keeping what was there) if the namespace, the
        host veth or the table already exists; any other failure is a
        HostError chained to its cause. Either way what this call created is
        removed before it raises.
        """
        _check_plan(plan)
        started = time.perf_counter()
        undo: list[tuple[str, Callable[[], None]]] = []
        host_rules: netns.Task[None] | None = None
        sandbox_rules: netns.Task[None] | None = None
        sandbox_side: netns.Task[None] | None = None

        def delete_table() -> None:
            self._in_host(
                plan,
                "delete table",
                lambda: nft.delete_table(NFT_FAMILY, plan.nft_table),
            )

        try:
            self._create_namespace(plan)
            undo.append(("remove namespace", lambda: self._remove_namespace(plan)))

            # Rules name interfaces only by name, so both rulesets load in
            # the background while the links are made.
            with _translated(plan, "install host rules"):
                host_rules = netns.start_in(
                    self.settings.host_netns, lambda: self._install_host_rules(plan)
                )
            with _translated(plan, "install namespace rules"):
                sandbox_rules = nft.start_apply(_sandbox_ruleset(plan), plan.netns)

            self._in_host(plan, "create veth", lambda: self._create_veth(plan))
            undo.append(
                (
                    "delete veth",
                    lambda: self._in_host(
                        plan, "delete veth", lambda: _remove_link(plan.host_veth)
                    ),
                )
            )

            # Each side of the pair is configured in its own namespace, at
            # the same time: neither needs the other's addresses or routes.
            with _translated(plan, "configure namespace"):
                sandbox_side = netns.start_in(
                    plan.netns, lambda: self._configure_sandbox(plan)
                )
            self._in_host(
                plan, "configure host side", lambda: self._configure_host(plan)
            )
            configuring, sandbox_side = sandbox_side, None
            with _translated(plan, "configure namespace"):
                configuring.join()

            with _translated(plan, "install namespace rules"):
                sandbox_rules.join()
            with _translated(plan, "install host rules"):
                host_rules.join()
            host_rules = None
            undo.append(("delete table", delete_table))
        except BaseException as exc:
            if sandbox_side is not None and (failure := sandbox_side.wait()):
                exc.add_note(
                    "configure namespace also failed: "
                    f"{_as_host_error(plan, 'configure namespace', failure)}"
                )
            if sandbox_rules is not None:
                sandbox_rules.wait()
            if host_rules is not None and host_rules.wait() is None:
                undo.append(("delete table", delete_table))
            self._undo(plan, undo, exc)
            raise

        self._check_host_forwarding(plan)
        log.info(
            "sandbox %s: network prepared on slot %d (netns %s) in %.1f ms",
            plan.sandbox_id,
            plan.slot,
            plan.netns,
            (time.perf_counter() - started) * 1000,
        )

    # --- teardown ---------------------------------------------------------------

    def teardown(self, plan: NetworkPlan) -> None:
        """Remove the namespace, delete the host veth and the table; check
        with the kernel that they are gone.

        The namespace's name goes first, unless processes still run inside
        it: then the name stays and teardown fails naming their pids. Then
        the table and the host veth are deleted side by side, neither waiting
        for the kernel's cleanup: the table delete is one nfnetlink
        transaction, answered once committed; the veth is deleted with
        RTM_DELLINK from a thread of its own, and teardown goes on as soon as
        the kernel no longer lists it (its peer goes with it), not when the
        request returns after an RCU grace period. That cleanup, and freeing
        the namespace with its TAP, go on in the kernel after teardown
        returns; the next namespace made on the host may wait for it.

        Idempotent: what is already gone is skipped. Every deletion is tried
        even if an earlier one failed; then the kernel is asked what is left.
        Raises the first failure (the others as notes), or a HostError naming
        whatever the kernel still reports.

        Not detected: a namespace kept alive only by an open file (a socket,
        a ``/proc/<pid>/ns/net`` handle) or by a thread whose process's main
        thread is elsewhere. Its name is removed and the host side cleaned,
        but the namespace and its TAP live on until the holder lets go.
        Looking for processes reads ``/proc/<pid>/ns/net`` of every process
        (under 1 ms with 100 processes, growing with their number).
        """
        _check_plan(plan)
        started = time.perf_counter()
        failures: list[WrennError] = []

        holders: list[int] = []
        try:
            with _translated(plan, "remove namespace"):
                holders = self._remove_namespace_unless_inhabited(plan)
        except WrennError as exc:
            failures.append(exc)

        survivors: list[str] = []
        try:
            survivors = self._in_host(
                plan, "tear down host side", lambda: self._tear_down(plan, failures)
            )
        except WrennError as exc:
            failures.append(exc)
        if netns.exists(plan.netns):
            inside = ", ".join(str(pid) for pid in holders)
            survivors.append(
                f"netns:{plan.netns} (pids {inside} still in it)"
                if holders
                else f"netns:{plan.netns}"
            )

        if failures:
            for other in failures[1:]:
                failures[0].add_note(f"also failed: {other}")
            if survivors:
                failures[0].add_note(f"still present: {', '.join(survivors)}")
            raise failures[0]
        if survivors:
            raise HostError(
                f"sandbox {plan.sandbox_id}: network teardown left "
                f"{', '.join(survivors)} behind; find what still holds them "
                "(`ip netns pids`, `ip link`, `nft list tables`), stop it and "
                "tear down again, or run `wrenn-engine reconcile`."
            )
        log.info(
            "sandbox %s: network torn down on slot %d in %.1f ms",
            plan.sandbox_id,
            plan.slot,
            (time.perf_counter() - started) * 1000,
        )

    # --- reconcile --------------------------------------------------------------

    def leftovers(self, known: set[str]) -> list[tuple[str, str]]:
        """(kind, name) of namespaces, host veths and tables with this engine's
        prefix whose ``"kind:name"`` is not in ``known``."""
        found = [("netns", name) for name in netns.names() if self._owns_netns(name)]

        def look() -> list[tuple[str, str]]:
            with IPRoute() as ipr:
                links = [link.get("ifname") for link in ipr.link("dump")]
            tables = nft.list_tables()
            return [
                ("veth", name) for name in links if self._link_re.fullmatch(name)
            ] + [
                ("nft_table", name)
                for family, name in tables
                if family == NFT_FAMILY and self._table_re.fullmatch(name)
            ]

        found += self._in_host(None, "list leftovers", look)
        return sorted(item for item in found if f"{item[0]}:{item[1]}" not in known)

    def remove_leftover(self, kind: str, name: str) -> None:
        """Remove one object ``leftovers`` reported and check it is gone.

        Idempotent. Refuses (ConfigError) a kind it does not know or a name
        this engine's prefix did not make.
        """
        if kind not in KINDS:
            raise ConfigError(
                "kind",
                f"{kind!r} is not a network resource kind",
                limit=", ".join(KINDS),
            )
        if kind == "slot":
            return

        if not self._owns(kind, name):
            raise ConfigError(
                "name",
                f"{kind} {name!r} was not made by this engine",
                limit=f"names starting with {self.settings.prefix!r}-",
                hint="remove it by hand if it is really stale",
            )

        if kind == "netns":
            self._remove_leftover_netns(name)
        elif kind == "veth":
            self._in_host(
                None, f"remove veth {name}", lambda: self._remove_leftover_link(name)
            )
        else:
            self._in_host(
                None, f"remove table {name}", lambda: self._remove_leftover_table(name)
            )
        log.info("network leftover %s %s removed", kind, name)

    # --- steps ------------------------------------------------------------------

    def _create_namespace(self, plan: NetworkPlan) -> None:
        with _translated(plan, "create namespace", busy=("netns", plan.netns)):
            netns.create(plan.netns)

    def _remove_namespace(self, plan: NetworkPlan) -> None:
        with _translated(plan, "remove namespace"):
            netns.remove(plan.netns)

    def _tear_down(self, plan: NetworkPlan, failures: list[WrennError]) -> list[str]:
        """In the host namespace: delete the table and the host veth side by
        side, then return what the kernel still reports; failures go to
        ``failures``."""
        table = netns.start_in(
            None, lambda: nft.delete_table(NFT_FAMILY, plan.nft_table)
        )
        try:
            with _translated(plan, "delete veth"):
                _remove_link(plan.host_veth)
        except WrennError as exc:
            failures.append(exc)
        finally:
            failure = table.wait()
        if failure is not None:
            failures.append(_as_host_error(plan, "delete table", failure))

        with _translated(plan, "check host side"):
            return self._host_survivors(plan)

    def _remove_namespace_unless_inhabited(self, plan: NetworkPlan) -> list[int]:
        """Remove the namespace's name, unless processes run inside it: then
        the name stays (for ``ip netns pids`` and a later retry) and their
        pids are returned."""
        try:
            namespace = netns.identity(plan.netns)
        except FileNotFoundError:
            return []
        holders = netns.pids_in(namespace)
        if holders:
            log.warning(
                "sandbox %s: pids %s still run in network namespace %s; its "
                "name is kept",
                plan.sandbox_id,
                holders,
                plan.netns,
            )
            return holders
        netns.remove(plan.netns)
        return []

    def _create_veth(self, plan: NetworkPlan) -> None:
        """In the host namespace: the veth pair, its host side up and its peer
        made straight inside the sandbox namespace. Nothing else, so that the
        undo registered after it succeeds never has to guess whether the link
        is this call's."""
        ns_fd = netns.open_fd(plan.netns)
        try:
            with (
                IPRoute() as ipr,
                _translated(plan, "create veth", busy=("veth", plan.host_veth)),
            ):
                ipr.link(
                    "add",
                    ifname=plan.host_veth,
                    kind="veth",
                    state="up",
                    peer={"ifname": plan.ns_veth, "net_ns_fd": ns_fd},
                )
        finally:
            os.close(ns_fd)

    def _configure_sandbox(self, plan: NetworkPlan) -> None:
        """In the sandbox namespace: forwarding, loopback, the veth's address
        and default route, the TAP and its address."""
        ns_ip, ns_prefixlen = _split_cidr(plan.ns_veth_cidr)
        host_ip, _ = _split_cidr(plan.host_veth_cidr)
        tap_ip, tap_prefixlen = _split_cidr(plan.tap_cidr)

        _write_sysctl(FORWARD_SYSCTL, "1")
        with IPRoute() as ipr:
            ipr.link("set", index=_require_link("lo"), state="up")

            veth = _require_link(plan.ns_veth)
            ipr.addr("add", index=veth, address=ns_ip, prefixlen=ns_prefixlen)
            ipr.link("set", index=veth, state="up")

            # A persistent single-queue TAP with the flags cloud-hypervisor
            # asks for; a VMM running as root in the namespace attaches to it.
            ipr.link(
                "add",
                ifname=plan.tap,
                kind="tuntap",
                mode="tap",
                ifr={"no_pi": 1, "vnet_hdr": 1},
            )
            tap = _require_link(plan.tap)
            ipr.addr("add", index=tap, address=tap_ip, prefixlen=tap_prefixlen)
            ipr.link("set", index=tap, state="up")

            ipr.route("add", dst="0.0.0.0/0", gateway=host_ip, oif=veth)

    def _configure_host(self, plan: NetworkPlan) -> None:
        """In the host namespace: the host veth's address, the route to the
        host-reachable address, and forwarding (only in a test's host
        namespace, never the real host's)."""
        host_ip, prefixlen = _split_cidr(plan.host_veth_cidr)
        ns_ip, _ = _split_cidr(plan.ns_veth_cidr)

        with IPRoute() as ipr:
            index = _require_link(plan.host_veth)
            ipr.addr("add", index=index, address=host_ip, prefixlen=prefixlen)
            ipr.route(
                "add", dst=f"{plan.host_reachable_ip}/32", gateway=ns_ip, oif=index
            )

        if self.settings.host_netns is not None:
            _write_sysctl(FORWARD_SYSCTL, "1")

    def _install_host_rules(self, plan: NetworkPlan) -> None:
        """In the host namespace: the sandbox's table, refused if it exists."""
        try:
            nft.apply(_host_ruleset(plan))
        except HostCommandError as exc:
            if "File exists" in exc.stderr:
                raise ResourceBusy(
                    "nft_table",
                    plan.nft_table,
                    f"slot {plan.slot}, sandbox {plan.sandbox_id}",
                ) from exc
            raise

    def _host_survivors(self, plan: NetworkPlan) -> list[str]:
        """``kind:name`` of the sandbox's host-side objects the kernel still
        reports (links by ioctl, the table over nfnetlink)."""
        survivors = []
        with _link_probe() as probe:
            for name in (plan.host_veth, plan.ns_veth):
                if _ifindex(probe, name) is not None:
                    survivors.append(f"veth:{name}")
        if (NFT_FAMILY, plan.nft_table) in nft.list_tables():
            survivors.append(f"nft_table:{plan.nft_table}")
        return survivors

    def _remove_leftover_netns(self, name: str) -> None:
        try:
            netns.remove(name)
        except OSError as exc:
            raise _failure(None, f"remove namespace {name}", exc) from exc
        if netns.exists(name):
            raise HostError(
                f"network namespace {name} is still there after its "
                "removal; check `ip netns list` and `mount`."
            )

    def _remove_leftover_link(self, name: str) -> None:
        _remove_link(name)
        if _link_index(name) is not None:
            raise HostError(
                f"link {name} is still there after its deletion; check `ip link show`."
            )

    def _remove_leftover_table(self, name: str) -> None:
        nft.delete_table(NFT_FAMILY, name)
        if (NFT_FAMILY, name) in nft.list_tables():
            raise HostError(
                f"nftables table {NFT_FAMILY} {name} is still there "
                "after its deletion; check `nft list tables`."
            )

    # --- helpers ----------------------------------------------------------------

    def _in_host(self, plan: NetworkPlan | None, step: str, func: Callable[[], T]) -> T:
        return _run_in(self.settings.host_netns, plan, step, func)

    def _undo(
        self,
        plan: NetworkPlan,
        undo: list[tuple[str, Callable[[], None]]],
        exc: BaseException,
    ) -> None:
        for name, action in reversed(undo):
            try:
                action()
            except Exception as undo_exc:
                log.warning(
                    "sandbox %s: network undo %r failed: %s",
                    plan.sandbox_id,
                    name,
                    undo_exc,
                )
                exc.add_note(f"undo {name!r} also failed: {undo_exc}")

    def _check_slot(self, slot: int) -> None:
        if (
            isinstance(slot, bool)
            or not isinstance(slot, int)
            or not (0 <= slot < self.settings.max_slots)
        ):
            raise ConfigError(
                "slot",
                f"{slot!r} is not a network slot of this engine",
                limit=f"0 to {self.settings.max_slots - 1}",
            )

    def _veth_subnet(self, slot: int) -> IPv4Network:
        base = int(self._veth_pool.network_address) + slot * 4
        return IPv4Network((base, VETH_PREFIXLEN))

    def _netns_name(self, sandbox_id: str) -> str:
        """``<prefix>-<sandbox id>``, or, when that passes 63 bytes, the id cut
        short and followed by ten hex digits of its hash (still unique)."""
        name = f"{self.settings.prefix}-{sandbox_id}"
        if len(name) <= netns.NETNS_NAME_MAX:
            return name
        digest = hashlib.sha256(sandbox_id.encode()).hexdigest()[:10]
        keep = netns.NETNS_NAME_MAX - len(self.settings.prefix) - len(digest) - 2
        return f"{self.settings.prefix}-{sandbox_id[:keep]}-{digest}"

    def _owns_netns(self, name: str) -> bool:
        # The namespace playing the host is never one of ours to remove,
        # whatever its name.
        return name.startswith(f"{self.settings.prefix}-") and (
            name != self.settings.host_netns
        )

    def _owns(self, kind: str, name: str) -> bool:
        if kind == "netns":
            return self._owns_netns(name)
        if kind == "veth":
            return bool(self._link_re.fullmatch(name))
        return bool(self._table_re.fullmatch(name))

    def _check_host_forwarding(self, plan: NetworkPlan) -> None:
        """Warn once if the real host does not forward (the guest is cut off)."""
        if self.settings.host_netns is not None or self._forwarding_checked:
            return
        self._forwarding_checked = True
        try:
            with open(FORWARD_SYSCTL) as handle:
                enabled = handle.read().strip() == "1"
        except OSError:
            return
        if not enabled:
            log.warning(
                "sandbox %s: net.ipv4.ip_forward is 0 in the host namespace, so "
                "guests cannot reach beyond the host; enable it (sysctl -w "
                "net.ipv4.ip_forward=1)",
                plan.sandbox_id,
            )


# --- rulesets -----------------------------------------------------------------


def _host_ruleset(plan: NetworkPlan) -> str:
    """The sandbox's table in the host namespace; ``create`` refuses a table
    that already exists, so a busy name is never silently merged into."""
    subnet = IPv4Network(plan.host_veth_cidr, strict=False)
    table = f"{NFT_FAMILY} {plan.nft_table}"
    veth = f'"{plan.host_veth}"'
    return (
        f"create table {table}\n"
        f"table {table} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f"    iifname {veth} accept\n"
        f"    oifname {veth} accept\n"
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    oifname != {veth} ip saddr {{ {subnet}, {plan.host_reachable_ip} }} "
        "masquerade\n"
        "  }\n"
        "}\n"
    )


def _sandbox_ruleset(plan: NetworkPlan) -> str:
    """NAT between the host-reachable address and the guest, in the sandbox
    namespace (it goes away with the namespace)."""
    table = f"{NFT_FAMILY} {plan.nft_table}"
    veth = f'"{plan.ns_veth}"'
    return (
        f"table {table} {{\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        f"    iifname {veth} ip daddr {plan.host_reachable_ip} "
        f"dnat ip to {plan.guest_ip}\n"
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    oifname {veth} ip saddr {plan.guest_ip} "
        f"snat ip to {plan.host_reachable_ip}\n"
        "  }\n"
        "}\n"
    )


# --- module helpers -----------------------------------------------------------


def _run_in(
    namespace: str | None, plan: NetworkPlan | None, step: str, func: Callable[[], T]
) -> T:
    with _translated(plan, step):
        return netns.run_in(namespace, func)


@contextmanager
def _translated(
    plan: NetworkPlan | None, step: str, busy: tuple[str, str] | None = None
) -> Iterator[None]:
    """Turn netlink and OS errors into the engine's, chained to the cause.

    ``busy`` names the object whose "already exists" means ResourceBusy.
    """
    try:
        yield
    except WrennError:
        raise
    except (NetlinkError, OSError) as exc:
        if busy is not None and _errno_of(exc) == errno.EEXIST:
            detail = f"slot {plan.slot}, sandbox {plan.sandbox_id}" if plan else ""
            raise ResourceBusy(busy[0], busy[1], detail) from exc
        raise _failure(plan, step, exc) from exc


def _as_host_error(plan: NetworkPlan, step: str, exc: BaseException) -> WrennError:
    """``exc`` (raised in another thread) as the engine's error, chained."""
    if isinstance(exc, WrennError):
        return exc
    error = _failure(plan, step, exc)
    error.__cause__ = exc
    return error


def _failure(plan: NetworkPlan | None, step: str, exc: BaseException) -> HostError:
    who = f"sandbox {plan.sandbox_id}: " if plan is not None else ""
    return HostError(
        f"{who}network step {step!r} failed: {_describe(exc)}; the cause is "
        "chained below. Fix it and retry; `wrenn-engine reconcile` removes "
        "anything left behind."
    )


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, NetlinkError):
        return int(exc.code) if isinstance(exc.code, int) else None
    if isinstance(exc, OSError):
        return exc.errno
    return None


def _describe(exc: BaseException) -> str:
    code = _errno_of(exc)
    if isinstance(exc, NetlinkError) and code is not None:
        return f"netlink error {errno.errorcode.get(code, code)} ({os.strerror(code)})"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc} ({exc.filename})"
    return str(exc)


def _link_index(name: str) -> int | None:
    """The index of link ``name`` in the current thread's namespace, None if
    absent."""
    with _link_probe() as probe:
        return _ifindex(probe, name)


def _require_link(name: str) -> int:
    index = _link_index(name)
    if index is None:
        raise NetlinkError(errno.ENODEV, f"link {name} does not exist")
    return index


def _delete_link(index: int) -> None:
    """Delete link ``index`` in the current namespace; absent is success."""
    with IPRoute() as ipr:
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise


def _remove_link(name: str) -> None:
    """Delete link ``name`` in the current namespace and return once the
    kernel no longer lists it; absent is success.

    RTM_DELLINK unlists the link within a millisecond or two but answers
    only after the kernel has also waited for an RCU grace period (about
    25 ms here). Only the first matters to a caller, so the request runs in
    a thread of its own while this one watches the link go; that thread is
    left to finish alone (a late failure is logged), or joined if the link
    outlives ``UNLIST_TIMEOUT_S``.
    """
    with _link_probe() as probe:
        index = _ifindex(probe, name)
        if index is None:
            return
        task = netns.start_in(None, lambda: _delete_link(index))
        if _await_link_gone(probe, name, index, UNLIST_TIMEOUT_S):
            task.detach(lambda exc: _log_late_failure(name, exc))
            return
    task.join()


def _log_late_failure(name: str, exc: BaseException) -> None:
    log.warning("deleting link %s failed after it was unlisted: %s", name, exc)


def _link_probe() -> socket.socket:
    """A socket to ask link indexes of; it belongs to the namespace of the
    thread that opens it."""
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)


def _ifindex(probe: socket.socket, name: str) -> int | None:
    """The index of link ``name`` in ``probe``'s namespace (SIOCGIFINDEX),
    None if there is none."""
    request = struct.pack("16s24x", name.encode())
    try:
        answer = fcntl.ioctl(probe.fileno(), _SIOCGIFINDEX, request)
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise
    return int(struct.unpack_from("i", answer, 16)[0])


def _await_link_gone(
    probe: socket.socket, name: str, index: int, timeout: float
) -> bool:
    """Wait up to ``timeout`` seconds for link ``index`` named ``name`` to
    disappear; True once it has."""
    deadline = time.monotonic() + timeout
    delay = _POLL_FIRST_S
    while _ifindex(probe, name) == index:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _POLL_MAX_S)
    return True


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _split_cidr(cidr: str) -> tuple[str, int]:
    interface = ipaddress.IPv4Interface(cidr)
    return str(interface.ip), interface.network.prefixlen


def _parse_pool(field: str, value: str) -> IPv4Network:
    try:
        pool = IPv4Network(value, strict=True)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            field,
            f"{value!r} is not an IPv4 network",
            limit="a CIDR with no host bits set, e.g. 10.200.0.0/16",
        ) from exc
    if pool.prefixlen > VETH_PREFIXLEN:
        raise ConfigError(
            field,
            f"{pool} is too small",
            limit=f"a prefix length of at most /{VETH_PREFIXLEN}",
        )
    return pool


def _veth_capacity(pool: IPv4Network) -> int:
    return int(2 ** (VETH_PREFIXLEN - pool.prefixlen))


def _reachable_capacity(pool: IPv4Network) -> int:
    return int(pool.num_addresses - 2)


def _check_sandbox_id(sandbox_id: str) -> None:
    if len(sandbox_id) > SANDBOX_ID_MAX or not SANDBOX_ID_RE.fullmatch(sandbox_id):
        raise ConfigError(
            "sandbox_id",
            f"{sandbox_id!r} is not a valid sandbox id",
            limit=f"1 to {SANDBOX_ID_MAX} characters of a-z, 0-9, '-' and '_'",
        )


def _check_plan(plan: NetworkPlan) -> None:
    """Refuse a plan whose names or addresses the kernel (or the nft syntax)
    would not take, before anything is touched."""
    try:
        netns.check_name(plan.netns)
    except ValueError as exc:
        raise ConfigError("netns", str(exc)) from exc
    for field in ("host_veth", "ns_veth", "tap"):
        value = getattr(plan, field)
        if not IFNAME_RE.fullmatch(value) or len(value.encode()) > IFNAME_MAX:
            raise ConfigError(
                field,
                f"{value!r} is not a valid interface name",
                limit=f"at most {IFNAME_MAX} bytes",
            )
    if not nft.TABLE_NAME_RE.fullmatch(plan.nft_table):
        raise ConfigError(
            "nft_table",
            f"{plan.nft_table!r} is not a table name",
            limit="letters, digits, '.', '-', '_', starting with a letter",
        )
    for field in ("tap_cidr", "host_veth_cidr", "ns_veth_cidr"):
        try:
            ipaddress.IPv4Interface(getattr(plan, field))
        except ValueError as exc:
            raise ConfigError(
                field,
                f"{getattr(plan, field)!r} is not an IPv4 address with a prefix length",
            ) from exc
    for field in ("guest_ip", "host_reachable_ip"):
        try:
            IPv4Address(getattr(plan, field))
        except ValueError as exc:
            raise ConfigError(
                field, f"{getattr(plan, field)!r} is not an IPv4 address"
            ) from exc
