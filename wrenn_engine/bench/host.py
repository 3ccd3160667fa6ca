"""Section 5: real host steps (root only).

- network: ``LinuxNetworkDriver.prepare`` + ``teardown`` of one sandbox
  (namespace, veth pair, TAP, addresses, routes, two nftables tables), in a
  namespace the bench creates to play the host, so the machine's own
  namespace is never touched. Baseline: ``ip netns add`` + ``ip netns del``
  of a bare namespace, via subprocess.
- rootfs: ``LinuxRootfsDriver.prepare`` + ``remove`` for every strategy this
  host can run, over a small template the bench builds. Baseline: the bare
  tool the strategy uses, via subprocess (``cp --sparse=always`` for copy
  and dm-snapshot, ``qemu-img create`` for qcow2), then an unlink.
- create to running: ``Engine.create(start=True)`` with the real drivers
  and the simulator, timed until it returns running. Baseline: starting the
  bare simulator process and polling its API until ``vmm.ping`` answers.

Every namespace, file and process is registered for removal the moment it
exists, and removed at the end even after a failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from wrenn_engine.bench.common import (
    Scratch,
    SectionSkipped,
    percentile,
    settle,
    sqlite_url,
)
from wrenn_engine.bench.report import Figure, Report, value_goal

SECTION = "host"
TIMEOUT_S = 30.0
TEMPLATE_BYTES = 64 * 1024 * 1024
TEMPLATE_DATA_BYTES = 8 * 1024 * 1024


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=TIMEOUT_S)


def _need_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise SectionSkipped(f"needs {', '.join(missing)} on PATH "
                             "(make system-deps installs them)")


def _host_namespace(scratch: Scratch, tag: str) -> str:
    """A namespace that plays the host, deleted at the end."""
    name = f"wbh{tag}"

    def remove() -> None:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True,
                       timeout=TIMEOUT_S)

    scratch.on_close(f"namespace {name}", remove)
    _run("ip", "netns", "add", name)
    return name


def _remove_prefixed_namespaces(prefix: str) -> None:
    from wrenn_engine.host import netns

    for name in netns.names():
        if name.startswith(f"{prefix}-"):
            subprocess.run(["ip", "netns", "del", name], check=False,
                           capture_output=True, timeout=TIMEOUT_S)


def _pair(report: Report, name: str, ours: list[float], base: list[float],
          baseline: str, goal_ms: float | None, note: str) -> None:
    report.add(Figure(
        SECTION, f"{name} p50", percentile(ours, 50) * 1e3, "ms", baseline,
        percentile(base, 50) * 1e3,
        goal=value_goal("<", goal_ms, "ms") if goal_ms else None, note=note,
    ))
    report.add(Figure(
        SECTION, f"{name} p95", percentile(ours, 95) * 1e3, "ms", baseline,
        percentile(base, 95) * 1e3,
    ))


# --- network ------------------------------------------------------------------------


def network(report: Report, scratch: Scratch, iterations: int) -> None:
    _need_tools("ip", "nft")
    try:
        from wrenn_engine.host.network import LinuxNetworkDriver, NetworkSettings
    except ImportError as exc:
        raise SectionSkipped(f"the network driver is not importable: {exc}") from exc

    tag = uuid.uuid4().hex[:4]
    prefix = f"wb{tag}"
    host_ns = _host_namespace(scratch, tag)
    scratch.on_close(f"namespaces {prefix}-*",
                     lambda: _remove_prefixed_namespaces(prefix))
    driver = LinuxNetworkDriver(NetworkSettings(prefix=prefix, host_netns=host_ns))

    bare_prefix = f"wbb{tag}"
    scratch.on_close(f"namespaces {bare_prefix}-*",
                     lambda: _remove_prefixed_namespaces(bare_prefix))

    def ours(i: int) -> tuple[float, float]:
        plan = driver.plan(f"sb-{tag}{i:06d}", 1 + i % 64)
        start = time.perf_counter()
        driver.prepare(plan)
        prepared = time.perf_counter()
        driver.teardown(plan)
        return prepared - start, time.perf_counter() - prepared

    def bare(i: int) -> tuple[float, float]:
        name = f"{bare_prefix}-{i:06d}"
        start = time.perf_counter()
        _run("ip", "netns", "add", name)
        added = time.perf_counter()
        _run("ip", "netns", "del", name)
        return added - start, time.perf_counter() - added

    ours(iterations + 1)  # warm-up: imports, first nft run, sysctls
    bare(iterations + 1)
    mine: list[tuple[float, float]] = []
    base: list[tuple[float, float]] = []
    settle()
    for i in range(iterations):
        mine.append(ours(i))
        base.append(bare(i))
    _pair(report, "network prepare + teardown", [a + b for a, b in mine],
          [a + b for a, b in base], "ip netns add + del (bare namespace, subprocess)",
          30.0, f"{iterations} sandboxes, in a namespace playing the host")
    for part, index, tool in (("prepare", 0, "add"), ("teardown", 1, "del")):
        report.add(Figure(
            SECTION, f"network {part} p50",
            percentile([m[index] for m in mine], 50) * 1e3, "ms",
            f"ip netns {tool} (subprocess)",
            percentile([b[index] for b in base], 50) * 1e3,
        ))


# --- rootfs -------------------------------------------------------------------------


def _template(scratch: Scratch) -> str:
    """A sparse raw image with some data in it (a stand-in for an ext4 image)."""
    path = scratch.path("template.img")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.truncate(TEMPLATE_BYTES)
            chunk = os.urandom(1024 * 1024)
            for offset in range(0, TEMPLATE_DATA_BYTES, 4 * 1024 * 1024):
                f.seek(offset)
                f.write(chunk)
    return path


def rootfs(report: Report, scratch: Scratch, iterations: int) -> None:
    try:
        from wrenn_engine.host.rootfs import (
            STRATEGIES,
            LinuxRootfsDriver,
            RootfsSettings,
            strategy_unavailable,
        )
    except ImportError as exc:
        raise SectionSkipped(f"the rootfs driver is not importable: {exc}") from exc

    template = _template(scratch)
    tag = uuid.uuid4().hex[:4]
    for strategy in STRATEGIES:
        problem = strategy_unavailable(strategy)
        if problem:
            report.skip(f"{SECTION} rootfs {strategy}", problem)
            continue
        work = scratch.mkdir(f"rootfs-{strategy}")
        driver = LinuxRootfsDriver(RootfsSettings(
            strategy=strategy, work_dir=os.path.join(work, "state"), min_free_bytes=0,
            dm_prefix=f"wb{tag}-"))
        scratch.on_close(f"rootfs {strategy} leftovers",
                         functools.partial(_remove_rootfs_leftovers, driver))

        def ours(i: int, d: Any = driver, w: str = work) -> float:
            sandbox_dir = os.path.join(w, f"sb{i}")
            os.makedirs(sandbox_dir, exist_ok=True)
            plan = d.plan(f"sb-{tag}{i:06d}", template, sandbox_dir)
            start = time.perf_counter()
            attachment = d.prepare(plan)
            d.remove(plan, attachment)
            return time.perf_counter() - start

        bare_tool = _bare_rootfs(strategy, template, work)
        ours(iterations + 1)
        bare_tool[1](iterations + 1)
        mine: list[float] = []
        base: list[float] = []
        settle()
        for i in range(iterations):
            mine.append(ours(i))
            base.append(bare_tool[1](i))
        _pair(report, f"rootfs {strategy} prepare + remove", mine, base, bare_tool[0],
              None, f"{TEMPLATE_BYTES >> 20} MiB template with "
                    f"{TEMPLATE_DATA_BYTES >> 20} MiB of data")


def _bare_rootfs(strategy: str, template: str, work: str
                 ) -> tuple[str, Callable[[int], float]]:
    def copy(i: int) -> float:
        target = os.path.join(work, f"bare{i}.img")
        start = time.perf_counter()
        _run("cp", "--sparse=always", template, target)
        os.unlink(target)
        return time.perf_counter() - start

    def qcow2(i: int) -> float:
        target = os.path.join(work, f"bare{i}.qcow2")
        start = time.perf_counter()
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", template, "-F", "raw",
             target)
        os.unlink(target)
        return time.perf_counter() - start

    if strategy == "qcow2":
        return "qemu-img create overlay + unlink (subprocess)", qcow2
    return "cp --sparse=always + unlink (subprocess)", copy


def _remove_rootfs_leftovers(driver: Any) -> None:
    for kind, name in driver.leftovers(set()):
        driver.remove_leftover(kind, name)


# --- create to running --------------------------------------------------------------


def create_to_running(report: Report, scratch: Scratch, iterations: int) -> None:
    _need_tools("ip", "nft")
    try:
        from wrenn_engine.engine import Engine, EngineSettings
        from wrenn_engine.host.base import HostDrivers
        from wrenn_engine.host.network import LinuxNetworkDriver, NetworkSettings
        from wrenn_engine.host.rootfs import LinuxRootfsDriver, RootfsSettings
        from wrenn_engine.host.vmm import launcher
        from wrenn_engine.host.vmm.client import VmmClient
        from wrenn_engine.host.vmm.driver import CloudHypervisorDriver, VmmSettings
        from wrenn_engine.lifecycle.settings import LifecycleSettings
    except ImportError as exc:
        raise SectionSkipped(f"a real driver is not importable: {exc}") from exc

    tag = uuid.uuid4().hex[:4]
    prefix = f"wc{tag}"
    owner = f"wrenn-bench-{tag}"
    host_ns = _host_namespace(scratch, f"c{tag}")
    scratch.on_close(f"namespaces {prefix}-*",
                     lambda: _remove_prefixed_namespaces(prefix))
    scratch.on_close(f"VMM processes of {owner}", lambda: _kill_marked(owner))
    base_dir = scratch.mkdir("create")
    kernel = os.path.join(base_dir, "vmlinux")
    with open(kernel, "wb") as f:
        f.write(b"\x7fELF bench kernel" + b"\0" * 4096)
    template = _template(scratch)

    rootfs_driver = LinuxRootfsDriver(RootfsSettings(
        work_dir=os.path.join(base_dir, "rootfs"), min_free_bytes=0,
        dm_prefix=f"wc{tag}-"))
    scratch.on_close("rootfs leftovers of create",
                     lambda: _remove_rootfs_leftovers(rootfs_driver))
    drivers = HostDrivers(
        rootfs=rootfs_driver,
        network=LinuxNetworkDriver(NetworkSettings(prefix=prefix, host_netns=host_ns)),
        vmm=CloudHypervisorDriver(VmmSettings(owner=owner, term_grace_s=1.0)),
    )
    settings = EngineSettings(
        host_id="bench-host", vmm="simulator", run_dir=scratch.mkdir("create", "run"),
        workers=False, lifecycle=LifecycleSettings(launch_timeout_s=10,
                                                   shutdown_timeout_s=5),
    )
    engine = Engine.open(sqlite_url(os.path.join(base_dir, "engine.db")),
                         drivers=drivers, settings=settings, auto_upgrade=True)
    alive: list[str] = []
    created_ids: list[str] = []

    def ours() -> tuple[float, float]:
        start = time.perf_counter()
        sandbox = engine.create(kernel_path=kernel, rootfs_path=template, start=True)
        created = time.perf_counter() - start
        alive.append(sandbox.id)
        created_ids.append(sandbox.id)
        if sandbox.state != "running":
            raise RuntimeError(f"sandbox {sandbox.id} is {sandbox.state}, not running")
        start = time.perf_counter()
        engine.destroy(sandbox.id)
        destroyed = time.perf_counter() - start
        alive.remove(sandbox.id)
        return created, destroyed

    def bare(i: int) -> tuple[float, float]:
        """Seconds until the bare simulator answers, and to kill and reap it."""
        sock = os.path.join(base_dir, f"bare{i}.sock")
        argv = [sys.executable, "-I", "-S", launcher.SIMULATOR_PATH,
                "--api-socket", f"path={sock}",
                "--event-monitor", f"path={os.path.join(base_dir, f'bare{i}.ev')}",
                "--log-file", os.path.join(base_dir, f"bare{i}.log")]
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        try:
            deadline = start + TIMEOUT_S
            while True:
                if os.path.exists(sock):
                    try:
                        VmmClient(sock, 1.0).ping()
                        break
                    except Exception:  # not answering yet: poll again
                        pass
                if child.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError("the bare simulator did not answer its ping")
                time.sleep(0.001)
            answered = time.perf_counter() - start
            start = time.perf_counter()
            child.kill()
            child.wait(timeout=TIMEOUT_S)
            for suffix in ("", ".lock"):
                if os.path.lexists(sock + suffix):
                    os.unlink(sock + suffix)
            return answered, time.perf_counter() - start
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=TIMEOUT_S)

    try:
        ours()  # warm-up: imports, first nft, first qemu-img
        bare(iterations + 1)
        created: list[float] = []
        destroyed: list[float] = []
        base: list[float] = []
        killed: list[float] = []
        settle()
        for i in range(iterations):
            c, d = ours()
            created.append(c)
            destroyed.append(d)
            b, k = bare(i)
            base.append(b)
            killed.append(k)
        _pair(report, "create to running (simulator)", created, base,
              "bare simulator process start until vmm.ping answers", 150.0,
              f"{iterations} sandboxes; rootfs strategy "
              f"{rootfs_driver.strategy()}, network in a namespace playing the host")
        report.add(Figure(
            SECTION, "destroy from running p50", percentile(destroyed, 50) * 1e3, "ms",
            "SIGKILL and reap of the bare simulator", percentile(killed, 50) * 1e3,
        ))
        report.findings.append(step_breakdown(
            "create to running", [engine.store.read_stream(s) for s in created_ids[1:]],
            until="transition.completed"))
    finally:
        for sandbox_id in list(alive):
            # The scratch cleanup removes whatever this leaves.
            with contextlib.suppress(Exception):
                engine.destroy(sandbox_id)
        engine.close()


def step_breakdown(title: str, histories: list[list[Any]], until: str) -> str:
    """Where the time of a command went, from the log's own clocks: per step,
    the median milliseconds from its ``step.started`` to its ``step.completed``
    (the effect plus the append of the result), and the rest (appends of
    intents and transitions, planning, the state machine)."""
    steps: dict[str, list[float]] = {}
    totals: list[float] = []
    for history in histories:
        started: dict[str, Any] = {}
        first = history[0].recorded_at
        for event in history:
            step = event.data.get("step")
            if event.type == "step.started":
                started[step] = event.recorded_at
            elif event.type == "step.completed" and step in started:
                seconds = (event.recorded_at - started.pop(step)).total_seconds()
                steps.setdefault(step, []).append(seconds * 1e3)
            if event.type == until:
                totals.append((event.recorded_at - first).total_seconds() * 1e3)
                break
    if not totals:
        return f"{title}: no complete history to break down"
    lines = [f"{title}: median {percentile(totals, 50):.1f} ms from the first to the "
             f"last event, of which (median per step, started to completed):"]
    accounted = 0.0
    for step, samples in steps.items():
        median = percentile(samples, 50)
        accounted += median
        lines.append(f"  {step:24s} {median:7.1f} ms")
    lines.append(f"  {'(appends, planning, rest)':24s} "
                 f"{percentile(totals, 50) - accounted:7.1f} ms")
    return "\n".join(lines)


def _kill_marked(owner: str) -> None:
    from wrenn_engine.host.base import VmmProcess
    from wrenn_engine.host.vmm import launcher

    for pid, _sandbox in launcher.find_marked(owner):
        info = launcher.read_stat(pid)
        argv = launcher.read_cmdline(pid)
        if info is not None and argv is not None:
            launcher.terminate(VmmProcess(pid, info[1], argv), grace=0, kill_wait=5)


def run(report: Report, ctx: Any) -> None:
    if os.geteuid() != 0:
        raise SectionSkipped("not root: real namespaces, links and loop devices need "
                             "root (run the bench as root to measure the host steps)")
    iterations = ctx.sizes.host_iterations
    for part, fn in (("network", network), ("rootfs", rootfs),
                     ("create to running", create_to_running)):
        try:
            fn(report, ctx.scratch, iterations)
        except SectionSkipped as exc:
            report.skip(f"{SECTION} {part}", str(exc))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one part failing must not hide the others
            report.skip(f"{SECTION} {part}", f"failed: {type(exc).__name__}: {exc}")
