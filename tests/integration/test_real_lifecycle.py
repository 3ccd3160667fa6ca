"""The whole lifecycle on real kernel objects, with the simulator as the VMM.

At each stable state the test reads what the kernel reports (namespaces,
links and addresses, nft tables, the TAP held open by the VMM process, loop
devices, files and their modes) and after destroy checks nothing remains.
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.integration.conftest import RealHost, ip_json
from wrenn_engine.errors import CommandFailed
from wrenn_engine.lifecycle.pipelines import default_pipelines

pytestmark = [pytest.mark.host]


def _addresses(namespace: str, ifname: str) -> set[str]:
    out = set()
    for link in ip_json(namespace, "-4", "addr", "show", "dev", ifname):
        for info in link.get("addr_info", []):
            out.add(f"{info['local']}/{info['prefixlen']}")
    return out


def _fds(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return out


def _tap_attached(pid: int) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                if "iff:\ttap0" in f.read():
                    return True
        except FileNotFoundError:
            continue
    return False


def _assert_running(host: RealHost, sandbox) -> None:  # type: ignore[no-untyped-def]
    network = sandbox.facts["network"]
    pid = sandbox.facts["vmm"]["pid"]
    assert host.namespaces() == {network["netns"]}
    assert network["host_veth"] in host.host_links()
    assert _addresses(host.host_netns, network["host_veth"]) == {
        network["host_veth_cidr"]
    }
    assert _addresses(network["netns"], "tap0") == {"169.254.0.22/30"}
    assert _addresses(network["netns"], network["ns_veth"]) == {network["ns_veth_cidr"]}
    assert network["nft_table"] in host.nft_tables()
    assert host.vmm_pids() == {pid}
    assert "/dev/net/tun" in _fds(pid) and _tap_attached(pid)
    assert (
        os.stat(f"/proc/{pid}/ns/net").st_ino
        == os.stat(f"/run/netns/{network['netns']}").st_ino
    )
    disk = sandbox.facts["rootfs"]["disk_path"]
    assert disk in _fds(pid)
    directory = sandbox.config["sandbox_dir"]
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(sandbox.config["socket_path"]).st_mode)


def test_full_lifecycle_on_the_kernel(real_host: RealHost):
    engine = real_host.open()

    sandbox = engine.create(
        kernel_path=real_host.kernel, rootfs_path=real_host.image, sandbox_id="sb-real"
    )
    assert sandbox.state == "running"
    _assert_running(real_host, sandbox)
    cow = sandbox.facts["rootfs"]["cow_path"]
    assert os.stat(cow).st_blocks * 512 < 2 * 1024 * 1024  # sparse / thin

    paused = engine.pause("sb-real")
    assert paused.state == "paused"
    assert real_host.namespaces() == set()
    assert real_host.host_links() == set() and real_host.nft_tables() == set()
    assert real_host.vmm_pids() == set()
    assert not os.path.exists(sandbox.config["socket_path"])
    assert os.path.exists(cow)
    assert sorted(os.listdir(paused.facts["snapshot"])) == [
        "config.json",
        "memory-ranges",
        "state.json",
    ]

    resumed = engine.resume("sb-real")
    assert resumed.state == "running"
    _assert_running(real_host, resumed)
    assert not os.path.exists(paused.facts["snapshot"])

    stopped = engine.stop("sb-real")
    assert stopped.state == "stopped"
    assert real_host.vmm_pids() == set() and real_host.namespaces() == set()
    assert os.path.exists(cow)

    assert engine.start("sb-real").state == "running"
    assert engine.destroy("sb-real").state == "destroyed"
    assert real_host.leftovers() == {}
    assert engine.store.verify_projections() == []

    observed = [
        e.data["event"]
        for e in engine.history("sb-real")
        if e.type == "vmm.event_observed"
    ]
    assert "booted" in observed and "paused" in observed and "restored" in observed


START = default_pipelines()["start"].names()


@pytest.mark.parametrize("point", [p for s in START for p in (s, f"{s}.done")])
def test_a_failure_at_each_host_step_leaves_nothing(real_host: RealHost, point):
    engine = real_host.open(failpoints={point: "error"})

    with pytest.raises(CommandFailed):
        engine.create(
            kernel_path=real_host.kernel,
            rootfs_path=real_host.image,
            sandbox_id="sb-fails",
        )

    assert engine.get("sb-fails").state == "pending"
    assert real_host.leftovers() == {}
    assert engine.store.verify_projections() == []


def test_a_guest_poweroff_and_a_panic_reach_the_lifecycle(real_host: RealHost):
    engine = real_host.open(workers=True, watch_interval_s=0.05)
    first = engine.create(kernel_path=real_host.kernel, rootfs_path=real_host.image)
    second = engine.create(kernel_path=real_host.kernel, rootfs_path=real_host.image)

    os.kill(first.facts["vmm"]["pid"], 10)  # SIGUSR1: the guest powers off
    os.kill(second.facts["vmm"]["pid"], 12)  # SIGUSR2: the guest panics

    assert (
        engine.wait(first.id, "stopped", timeout=15).facts["exit_reason"]
        == "guest-shutdown"
    )
    crashed = engine.wait(second.id, "error", timeout=15)
    assert "guest-panic" in crashed.last_error
    assert real_host.namespaces() == set() and real_host.vmm_pids() == set()
    engine.destroy(first.id)
    engine.destroy(second.id)
    assert real_host.leftovers() == {}
