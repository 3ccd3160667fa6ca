"""The Linux network driver against the real kernel.

Every host test makes its own "host" namespace (``ip netns add``) and points
the driver at it with ``NetworkSettings.host_netns``, so nothing here touches
the machine's own links, routes, sysctls or firewall. Assertions read what the
kernel reports through iproute2 and nft (``ip -j``, ``nft -j``), not through
the code under test.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from tests.conftest import require_root, require_tool, skip_or_fail, unique
from wrenn_engine.errors import ConfigError, HostCommandError, HostError, ResourceBusy
from wrenn_engine.host import netns, nft
from wrenn_engine.host.base import NetworkDriver, NetworkPlan
from wrenn_engine.host.network import (
    GUEST_IP,
    TAP_CIDR,
    LinuxNetworkDriver,
    NetworkSettings,
)

TIMEOUT = 10

# --- helpers (read the kernel through iproute2 and nft) ------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=TIMEOUT, check=True
    )


def ip_json(namespace: str, *args: str) -> list[dict[str, Any]]:
    out = _run("ip", "-n", namespace, "-j", *args).stdout
    return json.loads(out) if out.strip() else []


def link_names(namespace: str) -> set[str]:
    return {link["ifname"] for link in ip_json(namespace, "link", "show")}


def addresses(namespace: str, ifname: str) -> set[str]:
    links = ip_json(namespace, "addr", "show", "dev", ifname)
    return {
        f"{info['local']}/{info['prefixlen']}"
        for link in links
        for info in link["addr_info"]
        if info["family"] == "inet"
    }


def named_namespaces() -> set[str]:
    out = _run("ip", "-j", "netns", "list").stdout
    return {entry["name"] for entry in json.loads(out)} if out.strip() else set()


def nft_ruleset(namespace: str) -> list[dict[str, Any]]:
    out = _run("ip", "netns", "exec", namespace, "nft", "-j", "list", "ruleset").stdout
    return list(json.loads(out)["nftables"])


def nft_tables(namespace: str) -> set[tuple[str, str]]:
    return {
        (item["table"]["family"], item["table"]["name"])
        for item in nft_ruleset(namespace)
        if "table" in item
    }


def nft_rules(namespace: str, table: str) -> dict[str, list[list[dict[str, Any]]]]:
    """chain name -> list of rule expressions, for one table."""
    rules: dict[str, list[list[dict[str, Any]]]] = {}
    for item in nft_ruleset(namespace):
        if "chain" in item and item["chain"]["table"] == table:
            rules.setdefault(item["chain"]["name"], [])
        if "rule" in item and item["rule"]["table"] == table:
            rules.setdefault(item["rule"]["chain"], []).append(item["rule"]["expr"])
    return rules


def sysctl(namespace: str, key: str) -> str:
    return _run("ip", "netns", "exec", namespace, "sysctl", "-n", key).stdout.strip()


def assert_all_gone(plan: NetworkPlan, host: str) -> None:
    assert plan.netns not in named_namespaces()
    assert not os.path.lexists(f"/run/netns/{plan.netns}")
    assert plan.host_veth not in link_names(host)
    assert plan.ns_veth not in link_names(host)
    assert ("inet", plan.nft_table) not in nft_tables(host)


# --- fixtures ------------------------------------------------------------------


@pytest.fixture
def net_host() -> Iterator[str]:
    """A namespace that plays the host for one test, deleted afterwards."""
    require_root()
    require_tool("ip", "nft", "sysctl")
    name = unique("wrennt")
    _run("ip", "netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=TIMEOUT)


@pytest.fixture
def net_driver(net_host: str) -> Iterator[LinuxNetworkDriver]:
    """A driver with a test-unique prefix acting in ``net_host``; every
    sandbox namespace with its prefix is removed afterwards (links and tables
    in the host namespace go with ``net_host``)."""
    settings = NetworkSettings(prefix=unique("w"), host_netns=net_host)
    try:
        yield LinuxNetworkDriver(settings)
    finally:
        for name in netns.names():
            if name.startswith(f"{settings.prefix}-"):
                subprocess.run(
                    ["ip", "netns", "del", name], check=False, timeout=TIMEOUT
                )


@pytest.fixture(params=["library", "command"])
def nft_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test once with rulesets loaded through libnftables in-process
    and once through the ``nft`` command."""
    wanted = request.param == "library"
    nft.use_library(wanted)
    try:
        if wanted and not nft.library_loaded():
            skip_or_fail(f"needs {nft.LIBRARY} (make system-deps installs it)")
        assert nft.library_loaded() is wanted
        yield str(request.param)
    finally:
        nft.use_library(True)


@pytest.fixture
def net_root_snapshot() -> Iterator[None]:
    """Fail the test if the machine's own namespace changed under it."""

    def snapshot() -> tuple[set[str], str, str]:
        links = {
            link["ifname"]
            for link in json.loads(_run("ip", "-j", "link", "show").stdout)
        }
        tables = _run("nft", "list", "tables").stdout
        with open("/proc/sys/net/ipv4/ip_forward") as handle:
            forward = handle.read()
        return links, tables, forward

    before = snapshot()
    yield
    assert snapshot() == before


# --- settings and plans (no kernel objects) -----------------------------------


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("veth_pool", {"veth_pool": "10.200.0.0/33"}),
        ("veth_pool", {"veth_pool": "10.200.0.1/16"}),
        ("veth_pool", {"veth_pool": "not-a-network"}),
        ("veth_pool", {"veth_pool": "10.200.0.0/31"}),
        ("veth_pool", {"veth_pool": "169.254.0.0/16"}),
        ("host_reachable_pool", {"host_reachable_pool": "10.201.0.0/40"}),
        ("host_reachable_pool", {"host_reachable_pool": "10.200.128.0/17"}),
        ("max_slots", {"max_slots": 0}),
        ("max_slots", {"max_slots": 16385}),
        ("max_slots", {"veth_pool": "10.200.0.0/24", "max_slots": 65}),
        ("prefix", {"prefix": "Wrenn"}),
        ("prefix", {"prefix": "wr-enn"}),
        ("prefix", {"prefix": ""}),
        ("prefix", {"prefix": "wrennengine"}),
        ("tap", {"tap": "a-very-long-tap-name"}),
        ("host_netns", {"host_netns": "../etc"}),
    ],
)
def test_settings_refuse_bad_values_naming_the_field(
    field: str, overrides: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as caught:
        NetworkSettings(**overrides)
    assert caught.value.field == field


def test_settings_accept_custom_pools() -> None:
    settings = NetworkSettings(
        prefix="eng2",
        veth_pool="172.30.0.0/22",
        host_reachable_pool="172.31.0.0/24",
        max_slots=254,
    )
    plan = LinuxNetworkDriver(settings).plan("sbx", 253)
    assert plan.host_veth_cidr == "172.30.3.245/30"
    assert plan.ns_veth_cidr == "172.30.3.246/30"
    assert plan.host_reachable_ip == "172.31.0.254"


def test_plan_names_fit_and_differ_for_every_slot() -> None:
    settings = NetworkSettings()
    driver = LinuxNetworkDriver(settings)
    plans = [driver.plan("sbx", slot) for slot in range(settings.max_slots)]

    names = [name for plan in plans for name in (plan.host_veth, plan.ns_veth)]
    assert len(set(names)) == len(names)
    assert max(len(name.encode()) for name in names) <= 15
    longest = plans[-1]
    assert longest.host_veth == f"wrenn-{settings.max_slots - 1}h"
    assert len({plan.nft_table for plan in plans}) == len(plans)
    assert len({plan.host_reachable_ip for plan in plans}) == len(plans)
    assert len({plan.host_veth_cidr for plan in plans}) == len(plans)
    assert longest.tap_cidr == TAP_CIDR == "169.254.0.22/30"
    assert longest.guest_ip == GUEST_IP == "169.254.0.21"


def test_longest_prefix_and_slot_fit_interface_names() -> None:
    settings = NetworkSettings(prefix="abcdefghi", max_slots=4096)
    plan = LinuxNetworkDriver(settings).plan("sbx", 4095)
    assert plan.host_veth == "abcdefghi-4095h"
    assert len(plan.host_veth.encode()) == 15
    with pytest.raises(ConfigError) as caught:
        NetworkSettings(prefix="abcdefghij", max_slots=4096)
    assert caught.value.field == "prefix"


def test_plan_keeps_long_sandbox_ids_within_netns_limit() -> None:
    driver = LinuxNetworkDriver(NetworkSettings())
    first = "a" * 62 + "1"
    second = "a" * 62 + "2"
    names = {driver.plan(sid, 0).netns for sid in (first, second)}

    assert len(names) == 2
    for name in names:
        assert len(name.encode()) <= 63
        netns.check_name(name)
        assert name.startswith("wrenn-")
    assert driver.plan("short-id", 0).netns == "wrenn-short-id"


@pytest.mark.parametrize(
    ("sandbox_id", "slot", "field"),
    [
        ("sbx", -1, "slot"),
        ("sbx", 4096, "slot"),
        ("sbx", True, "slot"),
        ("Bad/Id", 0, "sandbox_id"),
        ("", 0, "sandbox_id"),
    ],
)
def test_plan_refuses_bad_input(sandbox_id: str, slot: int, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        LinuxNetworkDriver().plan(sandbox_id, slot)
    assert caught.value.field == field


def test_driver_satisfies_the_protocol() -> None:
    assert isinstance(LinuxNetworkDriver(), NetworkDriver)


# --- prepare and teardown -----------------------------------------------------


@pytest.mark.host
def test_prepare_builds_what_the_kernel_reports(
    net_driver: LinuxNetworkDriver,
    net_host: str,
    net_root_snapshot: None,
    nft_mode: str,
) -> None:
    plan = net_driver.plan(unique("sbx"), 7)
    net_driver.prepare(plan)
    try:
        assert plan.netns in named_namespaces()

        host_links = {
            link["ifname"]: link for link in ip_json(net_host, "link", "show")
        }
        assert "UP" in host_links[plan.host_veth]["flags"]
        assert addresses(net_host, plan.host_veth) == {plan.host_veth_cidr}
        host_routes = ip_json(net_host, "route", "show")
        ns_ip = plan.ns_veth_cidr.split("/")[0]
        assert {
            "dst": plan.host_reachable_ip,
            "gateway": ns_ip,
            "dev": plan.host_veth,
        } in [
            {key: route.get(key) for key in ("dst", "gateway", "dev")}
            for route in host_routes
        ]
        assert sysctl(net_host, "net.ipv4.ip_forward") == "1"

        assert link_names(plan.netns) == {"lo", plan.ns_veth, plan.tap}
        assert addresses(plan.netns, plan.ns_veth) == {plan.ns_veth_cidr}
        assert addresses(plan.netns, plan.tap) == {"169.254.0.22/30"}
        tap = ip_json(plan.netns, "-d", "link", "show", "dev", plan.tap)[0]
        assert tap["linkinfo"]["info_kind"] == "tun"
        assert tap["linkinfo"]["info_data"]["type"] == "tap"
        assert tap["linkinfo"]["info_data"]["persist"] is True
        assert tap["linkinfo"]["info_data"]["multi_queue"] is False
        assert "UP" in tap["flags"]
        default = [
            r for r in ip_json(plan.netns, "route", "show") if r["dst"] == "default"
        ]
        assert [(r["gateway"], r["dev"]) for r in default] == [
            (plan.host_veth_cidr.split("/")[0], plan.ns_veth)
        ]
        assert sysctl(plan.netns, "net.ipv4.ip_forward") == "1"

        host_rules = nft_rules(net_host, plan.nft_table)
        assert set(host_rules) == {"forward", "postrouting"}
        assert any({"masquerade": None} in expr for expr in host_rules["postrouting"])
        assert any(
            {
                "match": {
                    "op": "==",
                    "left": {"meta": {"key": "iifname"}},
                    "right": plan.host_veth,
                }
            }
            in expr
            for expr in host_rules["forward"]
        )
        ns_rules = nft_rules(plan.netns, plan.nft_table)
        assert {"dnat": {"family": "ip", "addr": GUEST_IP}} in ns_rules["prerouting"][0]
        assert {"snat": {"family": "ip", "addr": plan.host_reachable_ip}} in (
            ns_rules["postrouting"][0]
        )
    finally:
        net_driver.teardown(plan)

    assert_all_gone(plan, net_host)


@pytest.mark.host
def test_teardown_is_idempotent(net_driver: LinuxNetworkDriver, net_host: str) -> None:
    plan = net_driver.plan(unique("sbx"), 1)
    net_driver.teardown(plan)

    net_driver.prepare(plan)
    net_driver.teardown(plan)
    net_driver.teardown(plan)

    assert_all_gone(plan, net_host)


@pytest.mark.host
def test_host_reaches_the_namespace_and_the_guest_address(
    net_driver: LinuxNetworkDriver, net_host: str
) -> None:
    """UDP from the host namespace to the namespace's veth address arrives;
    UDP to the host-reachable address is rewritten to the guest and sent out
    of the TAP, where a stand-in VMM that opened the TAP sees the ARP request
    for 169.254.0.21."""
    plan = net_driver.plan(unique("sbx"), 2)
    net_driver.prepare(plan)
    try:
        ns_ip = plan.ns_veth_cidr.split("/")[0]
        receiver = netns.run_in(plan.netns, lambda: _udp_socket((ns_ip, 0)))
        sender = netns.run_in(net_host, lambda: _udp_socket(("0.0.0.0", 0)))
        tap = netns.run_in(plan.netns, lambda: _open_tap(plan.tap))
        try:
            sender.sendto(b"hello", receiver.getsockname())
            assert receiver.recvfrom(64)[0] == b"hello"

            sender.sendto(b"to the guest", (plan.host_reachable_ip, 9))
            assert _wait_for_arp_request(tap, GUEST_IP)
        finally:
            os.close(tap)
            receiver.close()
            sender.close()
    finally:
        net_driver.teardown(plan)
    assert_all_gone(plan, net_host)


def _udp_socket(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.bind(address)
    return sock


def _open_tap(name: str) -> int:
    """Attach to the TAP as a VMM does (IFF_TAP | IFF_NO_PI)."""
    tunsetiff = 0x400454CA
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, tunsetiff, struct.pack("16sH", name.encode(), 0x0002 | 0x1000))
    except OSError:
        os.close(fd)
        raise
    return fd


def _wait_for_arp_request(fd: int, target: str, timeout: float = 5.0) -> bool:
    """Read frames from the TAP until an ARP request for ``target`` shows up."""
    wanted = socket.inet_aton(target)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        frame = os.read(fd, 2048)
        is_arp = frame[12:14] == b"\x08\x06"
        if is_arp and frame[20:22] == b"\x00\x01" and frame[38:42] == wanted:
            return True
    return False


# --- refusing and undoing -----------------------------------------------------


@pytest.mark.host
def test_prepare_twice_is_busy_and_keeps_the_first(
    net_driver: LinuxNetworkDriver, net_host: str
) -> None:
    plan = net_driver.plan(unique("sbx"), 3)
    net_driver.prepare(plan)
    try:
        with pytest.raises(ResourceBusy) as caught:
            net_driver.prepare(plan)
        assert caught.value.kind == "netns"

        other = net_driver.plan(unique("sbx"), 3)
        with pytest.raises(ResourceBusy) as caught:
            net_driver.prepare(other)
        assert (caught.value.kind, caught.value.name) == ("veth", plan.host_veth)
        assert other.netns not in named_namespaces()

        assert plan.netns in named_namespaces()
        assert plan.host_veth in link_names(net_host)
        assert ("inet", plan.nft_table) in nft_tables(net_host)
    finally:
        net_driver.teardown(plan)
    assert_all_gone(plan, net_host)


@pytest.mark.host
def test_existing_table_is_busy_and_only_what_prepare_made_is_removed(
    net_driver: LinuxNetworkDriver, net_host: str, nft_mode: str
) -> None:
    plan = net_driver.plan(unique("sbx"), 4)
    _run("ip", "netns", "exec", net_host, "nft", "add", "table", "inet", plan.nft_table)

    with pytest.raises(ResourceBusy) as caught:
        net_driver.prepare(plan)

    assert (caught.value.kind, caught.value.name) == ("nft_table", plan.nft_table)
    assert isinstance(caught.value.__cause__, HostCommandError)
    assert "File exists" in caught.value.__cause__.stderr
    assert plan.netns not in named_namespaces()
    assert plan.host_veth not in link_names(net_host)
    assert ("inet", plan.nft_table) in nft_tables(net_host)
    assert net_driver.slot_in_use(4)


@pytest.mark.host
def test_failing_nft_midway_leaves_nothing(
    net_driver: LinuxNetworkDriver,
    net_host: str,
    monkeypatch: pytest.MonkeyPatch,
    nft_mode: str,
) -> None:
    plan = net_driver.plan(unique("sbx"), 5)
    real_start = nft.start_apply

    def broken_namespace_rules(ruleset: str, namespace: str | None) -> Any:
        if "dnat" in ruleset:
            ruleset = "this is not nft syntax\n"
        return real_start(ruleset, namespace)

    monkeypatch.setattr(nft, "start_apply", broken_namespace_rules)

    with pytest.raises(HostCommandError) as caught:
        net_driver.prepare(plan)

    assert "syntax error" in caught.value.stderr
    assert caught.value.argv == (f"[netns {plan.netns}]", "nft", "-f", "-")
    assert caught.value.returncode == 1
    if nft_mode == "command":
        assert isinstance(caught.value.__cause__, subprocess.CalledProcessError)
    assert_all_gone(plan, net_host)


@pytest.mark.host
def test_failing_netlink_step_is_translated_and_leaves_nothing(
    net_driver: LinuxNetworkDriver, net_host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = net_driver.plan(unique("sbx"), 6)

    def refuse(self: LinuxNetworkDriver, plan: NetworkPlan) -> None:
        raise NetlinkError(errno.EPERM, "injected")

    monkeypatch.setattr(LinuxNetworkDriver, "_configure_host", refuse)

    with pytest.raises(HostError) as caught:
        net_driver.prepare(plan)

    assert type(caught.value) is HostError
    assert plan.sandbox_id in str(caught.value)
    assert "configure host side" in str(caught.value)
    assert isinstance(caught.value.__cause__, NetlinkError)
    assert_all_gone(plan, net_host)


@pytest.mark.host
def test_kernel_refusal_inside_the_namespace_leaves_nothing(
    net_driver: LinuxNetworkDriver, net_host: str
) -> None:
    """A plan whose TAP name is the veth's: the kernel refuses the TAP after
    the namespace and the veth pair exist."""
    plan = net_driver.plan(unique("sbx"), 14)
    clashing = dataclasses.replace(plan, tap=plan.ns_veth)

    with pytest.raises(HostError) as caught:
        net_driver.prepare(clashing)

    assert "configure namespace" in str(caught.value)
    assert isinstance(caught.value.__cause__, (OSError, NetlinkError))
    assert_all_gone(plan, net_host)


@pytest.mark.host
def test_teardown_reports_what_survives(
    net_driver: LinuxNetworkDriver, net_host: str
) -> None:
    plan = net_driver.plan(unique("sbx"), 8)
    net_driver.prepare(plan)
    # A stray link with the slot's namespace-side name in the host namespace:
    # teardown does not delete it, so its check must see it and say so.
    _run("ip", "-n", net_host, "link", "add", plan.ns_veth, "type", "bridge")

    with pytest.raises(HostError) as caught:
        net_driver.teardown(plan)

    assert f"veth:{plan.ns_veth}" in str(caught.value)
    assert plan.netns not in named_namespaces()
    assert plan.host_veth not in link_names(net_host)
    assert net_driver.slot_in_use(8)
    net_driver.remove_leftover("veth", plan.ns_veth)
    assert not net_driver.slot_in_use(8)


@pytest.mark.host
def test_teardown_tries_every_deletion_and_reports_the_first_failure(
    net_driver: LinuxNetworkDriver, net_host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = net_driver.plan(unique("sbx"), 13)
    net_driver.prepare(plan)

    def refuse(family: str, name: str, namespace: str | None = None) -> None:
        raise HostCommandError(("nft", "-f", "-"), 1, "Error: injected")

    monkeypatch.setattr(nft, "delete_table", refuse)
    with pytest.raises(HostCommandError) as caught:
        net_driver.teardown(plan)

    assert caught.value.stderr == "Error: injected"
    assert f"still present: nft_table:{plan.nft_table}" in caught.value.__notes__
    assert plan.netns not in named_namespaces()
    assert plan.host_veth not in link_names(net_host)
    assert ("inet", plan.nft_table) in nft_tables(net_host)

    monkeypatch.undo()
    net_driver.teardown(plan)
    assert_all_gone(plan, net_host)


@pytest.mark.host
def test_teardown_keeps_an_inhabited_namespace_and_says_who_is_inside(
    net_driver: LinuxNetworkDriver, net_host: str
) -> None:
    plan = net_driver.plan(unique("sbx"), 15)
    net_driver.prepare(plan)
    inside = netns.run_in(
        plan.netns, lambda: subprocess.Popen(["sleep", "60"], start_new_session=True)
    )
    try:
        with pytest.raises(HostError) as caught:
            net_driver.teardown(plan)

        assert f"netns:{plan.netns} (pids {inside.pid} still in it)" in str(
            caught.value
        )
        assert _run("ip", "netns", "pids", plan.netns).stdout.split() == [
            str(inside.pid)
        ]
        assert plan.host_veth not in link_names(net_host)
        assert ("inet", plan.nft_table) not in nft_tables(net_host)
        with pytest.raises(HostError):
            net_driver.teardown(plan)
    finally:
        inside.kill()
        inside.wait()

    net_driver.teardown(plan)
    assert_all_gone(plan, net_host)


@pytest.mark.host
def test_pids_in_finds_what_ip_netns_pids_finds(net_host: str) -> None:
    namespace = netns.identity(net_host)
    assert netns.pids_in(namespace) == []
    assert netns.identity(net_host) == namespace

    inside = netns.run_in(
        net_host, lambda: subprocess.Popen(["sleep", "60"], start_new_session=True)
    )
    try:
        assert netns.pids_in(namespace) == [inside.pid]
        assert _run("ip", "netns", "pids", net_host).stdout.split() == [str(inside.pid)]
        assert os.getpid() not in netns.pids_in(namespace)
    finally:
        inside.kill()
        inside.wait()
    assert netns.pids_in(namespace) == []
    with pytest.raises(FileNotFoundError):
        netns.identity(unique("nonexistent"))


def test_a_detached_task_reports_a_late_or_early_failure() -> None:
    release = threading.Event()
    seen: list[BaseException] = []

    def fail_later() -> None:
        release.wait(5)
        raise OSError(errno.EIO, "late")

    late = netns.start_in(None, fail_later)
    late.detach(seen.append)
    assert seen == []
    release.set()
    assert isinstance(late.wait(), OSError)
    assert [str(exc) for exc in seen] == ["[Errno 5] late"]

    def fail_now() -> None:
        raise OSError(errno.EIO, "early")

    early = netns.start_in(None, fail_now)
    early.wait()
    early.detach(seen.append)
    assert [str(exc) for exc in seen] == ["[Errno 5] late", "[Errno 5] early"]

    fine = netns.start_in(None, lambda: None)
    fine.detach(seen.append)
    fine.wait()
    assert len(seen) == 2


# --- slots and reconcile ------------------------------------------------------


@pytest.mark.host
def test_slot_in_use_follows_the_kernel(
    net_driver: LinuxNetworkDriver, net_host: str
) -> None:
    plan = net_driver.plan(unique("sbx"), 9)
    assert not net_driver.slot_in_use(9)

    net_driver.prepare(plan)
    assert net_driver.slot_in_use(9)
    assert not net_driver.slot_in_use(10)

    net_driver.teardown(plan)
    assert not net_driver.slot_in_use(9)

    _run("ip", "-n", net_host, "link", "add", plan.host_veth, "type", "bridge")
    assert net_driver.slot_in_use(9)


@pytest.mark.host
def test_leftovers_of_a_crash_are_found_and_removed(
    net_driver: LinuxNetworkDriver, net_host: str
) -> None:
    live = net_driver.plan(unique("sbx"), 11)
    crashed = net_driver.plan(unique("sbx"), 12)
    net_driver.prepare(live)
    net_driver.prepare(crashed)
    known = {f"{item['kind']}:{item['name']}" for item in live.resources()}

    found = net_driver.leftovers(known)

    assert found == sorted(
        [
            ("netns", crashed.netns),
            ("nft_table", crashed.nft_table),
            ("veth", crashed.host_veth),
        ]
    )
    for kind, name in found:
        net_driver.remove_leftover(kind, name)
        net_driver.remove_leftover(kind, name)
    net_driver.remove_leftover("slot", "12")

    assert net_driver.leftovers(known) == []
    assert_all_gone(crashed, net_host)
    assert not net_driver.slot_in_use(12)
    assert live.netns in named_namespaces()
    assert live.host_veth in link_names(net_host)
    net_driver.teardown(live)


@pytest.mark.host
def test_remove_leftover_refuses_what_is_not_its_own(
    net_driver: LinuxNetworkDriver,
) -> None:
    with pytest.raises(ConfigError) as caught:
        net_driver.remove_leftover("veth", "eth0")
    assert caught.value.field == "name"
    with pytest.raises(ConfigError) as caught:
        net_driver.remove_leftover("netns", "someone-else")
    assert caught.value.field == "name"
    with pytest.raises(ConfigError) as caught:
        net_driver.remove_leftover("route", f"{net_driver.settings.prefix}-1")
    assert caught.value.field == "kind"


@pytest.mark.host
def test_two_slots_in_parallel(net_driver: LinuxNetworkDriver, net_host: str) -> None:
    last = net_driver.settings.max_slots - 1
    plans = [net_driver.plan(unique("sbx"), slot) for slot in (0, last)]
    errors: list[BaseException] = []

    def run(action: Any, plan: NetworkPlan) -> None:
        try:
            action(plan)
        except BaseException as exc:
            errors.append(exc)

    for action in (net_driver.prepare, None, net_driver.teardown):
        if action is None:
            assert errors == []
            hosts = link_names(net_host)
            assert {plan.host_veth for plan in plans} <= hosts
            assert len({plan.host_veth for plan in plans}) == 2
            assert len({plan.netns for plan in plans}) == 2
            assert all(len(plan.host_veth.encode()) <= 15 for plan in plans)
            assert addresses(plans[1].netns, plans[1].ns_veth) == {
                plans[1].ns_veth_cidr
            }
            continue
        threads = [threading.Thread(target=run, args=(action, plan)) for plan in plans]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    assert errors == []
    for plan in plans:
        assert_all_gone(plan, net_host)


# --- the nft wrapper ----------------------------------------------------------


@pytest.mark.host
def test_nft_wrapper_in_a_namespace(net_host: str, nft_mode: str) -> None:
    table = unique("t")
    nft.apply(f"table inet {table} {{\n}}\n", net_host)
    assert ("inet", table) in nft.list_tables(net_host)
    assert ("inet", table) in nft_tables(net_host)

    nft.delete_table("inet", table, net_host)
    nft.delete_table("inet", table, net_host)
    assert ("inet", table) not in nft_tables(net_host)

    with pytest.raises(HostCommandError) as caught:
        nft.apply("table inet {\n", net_host)
    assert caught.value.argv == (f"[netns {net_host}]", "nft", "-f", "-")
    assert caught.value.returncode == 1
    assert "syntax error" in caught.value.stderr

    with pytest.raises(HostError) as missing:
        nft.list_tables(unique("nonexistent"))
    assert isinstance(missing.value.__cause__, FileNotFoundError)

    with pytest.raises(ConfigError):
        nft.delete_table("inet", "x; flush ruleset", net_host)
    with pytest.raises(HostError) as missing:
        nft.delete_table("inet", table, unique("nonexistent"))
    assert isinstance(missing.value.__cause__, FileNotFoundError)


@pytest.mark.host
def test_nft_lists_every_family_as_nft_does(net_host: str) -> None:
    tables = {
        ("inet", unique("t")),
        ("ip", unique("t")),
        ("ip6", unique("t")),
        ("arp", unique("t")),
        ("bridge", unique("t")),
        ("netdev", unique("t")),
    }
    nft.apply("".join(f"table {f} {n} {{\n}}\n" for f, n in sorted(tables)), net_host)

    assert set(nft.list_tables(net_host)) == tables == nft_tables(net_host)

    for family, name in tables:
        nft.delete_table(family, name, net_host)
    assert nft.list_tables(net_host) == []
    assert nft_tables(net_host) == set()


def test_a_host_namespace_named_like_a_sandbox_is_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        NetworkSettings(prefix="wrenn", host_netns="wrenn-host").validate()
    assert raised.value.field == "host_netns"
