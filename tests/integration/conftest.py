"""An engine on the real host drivers, fenced into objects the test made.

Each test gets its own "host" network namespace (the driver's host side lives
there, never in the machine's own namespace), its own name prefix for
namespaces, links and nft tables, its own owner mark for VMM processes, its
own rootfs work directory and its own run directory. Teardown removes all of
it on every path, and then checks the kernel holds nothing with the prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root, require_tool, unique
from wrenn_engine.engine import Engine, EngineSettings
from wrenn_engine.host import netns, nft
from wrenn_engine.host.network import NetworkSettings
from wrenn_engine.host.rootfs import RootfsSettings, list_loop_devices
from wrenn_engine.host.vmm.driver import VmmSettings
from wrenn_engine.host.vmm.launcher import find_marked
from wrenn_engine.lifecycle.failpoints import Failpoints
from wrenn_engine.lifecycle.settings import LifecycleSettings


@dataclass
class RealHost:
    """Everything one test's engine may touch, and how to check it."""

    prefix: str
    host_netns: str
    owner: str
    work_dir: str
    run_dir: str
    kernel: str
    image: str
    url: str
    engines: list[Engine] = field(default_factory=list)

    def settings(self, **overrides: Any) -> EngineSettings:
        base: dict[str, Any] = {
            "host_id": "host-real",
            "vmm": "simulator",
            "run_dir": self.run_dir,
            "workers": False,
            "lifecycle": LifecycleSettings(launch_timeout_s=10, shutdown_timeout_s=3),
            "network": NetworkSettings(
                prefix=self.prefix, host_netns=self.host_netns, max_slots=64
            ),
            "rootfs": RootfsSettings(strategy="auto", work_dir=self.work_dir),
            "vmm_driver": VmmSettings(owner=self.owner),
        }
        base.update(overrides)
        return EngineSettings(**base)

    def open(
        self, failpoints: dict[str, str] | None = None, **overrides: Any
    ) -> Engine:
        engine = Engine.open(
            self.url,
            settings=self.settings(**overrides),
            failpoints=Failpoints(failpoints or {}),
            auto_upgrade=True,
        )
        self.engines.append(engine)
        return engine

    # --- what the kernel reports ------------------------------------------------------

    def namespaces(self) -> set[str]:
        return {n for n in netns.names() if n.startswith(f"{self.prefix}-")}

    def host_links(self) -> set[str]:
        return {
            link["ifname"]
            for link in ip_json(self.host_netns, "link", "show")
            if link["ifname"].startswith(self.prefix)
        }

    def nft_tables(self) -> set[str]:
        return {
            name
            for _, name in nft.list_tables(self.host_netns)
            if name.startswith(self.prefix)
        }

    def vmm_pids(self) -> set[int]:
        return {pid for pid, _ in find_marked(self.owner)}

    def loops(self) -> set[str]:
        roots = (self.work_dir, self.run_dir, os.path.dirname(self.image))
        return {d.name for d in list_loop_devices() if d.back_file.startswith(roots)}

    def leftovers(self) -> dict[str, Any]:
        found = {
            "namespaces": self.namespaces(),
            "links": self.host_links(),
            "nft": self.nft_tables(),
            "vmm": self.vmm_pids(),
            "loops": self.loops(),
            "run_dir": sorted(os.listdir(self.run_dir)),
        }
        return {k: v for k, v in found.items() if v}


def ip_json(namespace: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-n", namespace, "-j", *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return json.loads(out) if out.strip() else []


def make_template(path: Path, size_mb: int = 16) -> None:
    with open(path, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(path)],
        check=True,
        timeout=60,
        capture_output=True,
    )


@pytest.fixture
def real_host(tmp_path: Path, sqlite_url: str) -> Iterator[RealHost]:
    require_root()
    require_tool("nft", "ip", "losetup", "mkfs.ext4", "qemu-img")
    prefix = unique("wi")
    host_ns = unique("wrennt-host-")
    work = tmp_path / "rootfs-work"
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"stand-in kernel: the simulator does not boot it")
    image = tmp_path / "template.ext4"
    make_template(image)

    netns.create(host_ns)
    host = RealHost(
        prefix,
        host_ns,
        f"wrenn-test-{prefix}",
        str(work),
        str(run),
        str(kernel),
        str(image),
        sqlite_url,
    )
    try:
        yield host
    finally:
        _clean(host)


def _clean(host: RealHost) -> None:
    """Destroy what the engines left, then remove any kernel object by name."""
    for engine in host.engines:
        try:
            for sandbox in engine.list():
                if sandbox.state != "destroyed" and not sandbox.is_transient:
                    engine.destroy(sandbox.id)
        except Exception:  # cleanup goes on; the leftover check below reports
            pass
        engine.close()
    for pid in host.vmm_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    for name in host.namespaces():
        netns.remove(name)
    for loop in host.loops():
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=10)
    netns.remove(host.host_netns)


RealHostFactory = Callable[..., Engine]
