"""``wrenn-engine demo``: one sandbox through its whole life, then nothing left.

Everything it makes lives under one temporary directory (the database
unless ``--db`` is given, the template image, the sandbox directories, the
rootfs bookkeeping) and, as root, one network namespace of its own that
plays the host's part (``NetworkSettings.host_netns``), so the machine's own
routes and firewall are never touched. It removes all of it on every path,
Ctrl-C and SIGTERM included.

What it uses, and says so:

- a real ext4 template built with ``mkfs.ext4`` on a sparse file;
- the newest readable ``/boot/vmlinux-*`` or ``/boot/vmlinuz-*``, else a
  stand-in kernel file (the simulator does not boot it);
- cloud-hypervisor when installed, else the bundled simulator;
- as root, the real rootfs, network and VMM drivers; otherwise (or with
  ``--fake``) the in-memory stand-ins of ``wrenn_engine.host.fake``.

With ``--db``, the demo's events stay in that database, under the host id
``<host id>-demo`` so no engine of this host ever takes its sandbox for its
own. Names are this run's own: the network prefix ``wd<4 hex>``, the VMM owner
mark (the temporary directory), the rootfs bookkeeping directory. So the
final leftover scan, which removes whatever the drivers still find, can
only ever see what this run made, even when two demos run at once.

A known limit: with a real cloud-hypervisor and a real kernel, the template
holds no init, so the guest panics soon after boot; with no worker watching
in the demo, a pause that races the panic fails and the demo cleans up.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from wrenn_engine import settings as env
from wrenn_engine.cli import render
from wrenn_engine.cli.common import CliError, emit, note, table, utc_text
from wrenn_engine.domain.events import RecordedEvent
from wrenn_engine.domain.state import State, explain
from wrenn_engine.engine import Engine, EngineSettings
from wrenn_engine.engine.core import real_drivers, simulator_path
from wrenn_engine.errors import WrennError
from wrenn_engine.host.base import HostDrivers
from wrenn_engine.lifecycle.settings import LifecycleSettings

#: Size of the template image; sparse, so it costs a few MiB on disk.
TEMPLATE_BYTES = 64 * 1024 * 1024


@dataclass
class Choices:
    """What the demo found on this machine and will use."""

    kernel: str = ""
    vmm: str = "simulator"
    real_drivers: bool = False
    notes: list[str] = field(default_factory=list)


class Demo:
    """One run of the demo; ``cleanup`` undoes everything ``run`` made."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tag = uuid.uuid4().hex[:6]
        self.sandbox_id = f"demo-{self.tag}"
        self.tmp = ""
        self.host_netns = ""
        self.engine: Engine | None = None
        self.fake_host: Any = None
        self.choices = Choices()
        self.started = time.monotonic()

    # --- the run ----------------------------------------------------------------------

    def run(self) -> int:
        self.tmp = tempfile.mkdtemp(prefix="wrenn-demo-")
        emit(
            f"wrenn-engine demo: everything goes under {self.tmp} and is removed "
            "at the end."
        )
        self._choose()
        template = self._template()
        for line in self.choices.notes:
            emit(f"  - {line}")
        emit("")

        self.engine = self._engine()
        engine = self.engine
        self._command(
            "create",
            lambda: engine.create(
                kernel_path=self.choices.kernel,
                rootfs_path=template,
                sandbox_id=self.sandbox_id,
                vcpus=1,
                memory_mb=128,
                actor="demo",
                labels={"purpose": "demo"},
            ),
        )
        self._command("pause", lambda: engine.pause(self.sandbox_id, actor="demo"))
        self._command("resume", lambda: engine.resume(self.sandbox_id, actor="demo"))
        self._command("destroy", lambda: engine.destroy(self.sandbox_id, actor="demo"))

        history = self._history()
        self._timeline(history)
        self._replay(history)
        left = self._leftovers()
        emit("")
        if left:
            raise CliError(
                "destroy left " + ", ".join(f"{k}:{n}" for k, n in left) + " on the "
                "host (the demo removed them); that is a bug in a driver's teardown, "
                "please report it with this output"
            )
        emit(
            "left on the host after destroy: nothing (checked with the drivers' "
            "own leftover scan)."
        )
        return 0

    def _command(self, name: str, call: Callable[[], Any]) -> None:
        assert self.engine is not None
        before = self._version()
        began = time.monotonic()
        sandbox = call()
        took = time.monotonic() - began
        steps = [
            e.data["step"]
            for e in self._history()
            if e.version > before and e.type == "step.completed"
        ]
        emit(
            f"{name:<8} -> {sandbox.state:<9} {len(steps):>2} steps in {took:.2f}s: "
            + ", ".join(steps)
        )

    def _history(self) -> list[RecordedEvent]:
        assert self.engine is not None
        return self.engine.store.read_stream(self.sandbox_id)

    def _version(self) -> int:
        assert self.engine is not None
        found = self.engine.store.get_sandbox(self.sandbox_id)
        return found.version if found is not None else 0

    # --- what to use ------------------------------------------------------------------

    def _choose(self) -> None:
        c = self.choices
        kernel = find_kernel()
        if kernel:
            c.kernel = kernel
            c.notes.append(f"kernel: {kernel}")
        else:
            c.kernel = os.path.join(self.tmp, "vmlinux-standin")
            with open(c.kernel, "wb") as f:
                f.write(b"\x7fELF stand-in kernel for the wrenn-engine demo\n")
            c.notes.append(
                "kernel: no readable /boot/vmlinux-* or /boot/vmlinuz-*; "
                "using a stand-in file (the simulator does not boot it)"
            )

        if self.args.vmm:
            c.vmm = self.args.vmm
            c.notes.append(f"VMM: {c.vmm} (--vmm)")
        else:
            found = cloud_hypervisor()
            if found:
                c.vmm = found
                c.notes.append(f"VMM: cloud-hypervisor at {found}")
            else:
                c.vmm = "simulator"
                c.notes.append(
                    "VMM: cloud-hypervisor is not installed; using the "
                    "bundled simulator (same API, no guest runs)"
                )

        missing = [t for t in ("nft",) if shutil.which(t) is None]
        if self.args.fake:
            c.notes.append(
                "drivers: in-memory stand-ins (--fake); no namespace, "
                "link, disk or VMM process is made"
            )
        elif not is_root():
            c.notes.append(
                "drivers: in-memory stand-ins, because the real rootfs, "
                "network and VMM drivers need root; skipped: the CoW "
                "disk, the network namespace, veth, TAP and nftables, "
                "and the VMM process (run `sudo wrenn-engine demo` for "
                "them)"
            )
        elif missing:
            c.notes.append(
                f"drivers: in-memory stand-ins, because {', '.join(missing)}"
                " is not installed (`make system-deps` installs it)"
            )
        else:
            c.real_drivers = True
            self.host_netns = f"wrenn-demo-{self.tag}"
            c.notes.append(
                f"drivers: real rootfs, network and VMM drivers; the "
                f"host side of the network is the namespace "
                f"{self.host_netns}, made for the demo"
            )

    def _template(self) -> str:
        path = os.path.join(self.tmp, "template.ext4")
        with open(path, "wb") as f:
            f.truncate(TEMPLATE_BYTES)
        mkfs = shutil.which("mkfs.ext4")
        if mkfs is None:
            self.choices.notes.append(
                "template: mkfs.ext4 is not installed; using "
                "an empty 64 MiB image (`make system-deps`)"
            )
            return path
        done = subprocess.run(
            [mkfs, "-q", "-F", "-L", "wrenn-demo", "-E", "lazy_itable_init=1", path],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise CliError(
                f"mkfs.ext4 failed on {path}: {done.stderr.strip() or done.returncode}"
            )
        self.choices.notes.append(
            "template: a 64 MiB ext4 image (sparse) made with mkfs.ext4"
        )
        return path

    def _engine(self) -> Engine:
        from wrenn_engine.store import open_store

        given = getattr(self.args, "db", None)
        if given:
            store = open_store(given)
            note(f"demo: recording in {given} (the demo's events stay there)")
        else:
            store = open_store(
                f"sqlite:///{os.path.join(self.tmp, 'demo.db')}", auto_upgrade=True
            )
        run_dir = os.path.join(self.tmp, "run")
        os.mkdir(run_dir, 0o700)

        vmm = self.choices.vmm
        drivers: HostDrivers
        try:
            if self.choices.real_drivers:
                settings = self._real_settings(run_dir, vmm)
                from wrenn_engine.host import netns

                netns.create(self.host_netns)
                drivers = real_drivers(settings)
            else:
                from wrenn_engine.host.fake import FakeHost

                if vmm == "simulator":
                    vmm = simulator_path()
                settings = self._settings(run_dir, vmm)
                self.fake_host = FakeHost()
                drivers = self.fake_host.drivers()
        except BaseException:
            store.close()
            raise
        return Engine(store, drivers, settings)

    def _settings(self, run_dir: str, vmm: str, **extra: Any) -> EngineSettings:
        return EngineSettings(
            host_id=f"{env.host_id()}-demo",
            vmm=vmm,
            run_dir=run_dir,
            workers=False,
            reconcile_on_open=False,
            lifecycle=LifecycleSettings(
                launch_timeout_s=10.0, shutdown_timeout_s=3.0, max_slots=16
            ),
            **extra,
        )

    def _real_settings(self, run_dir: str, vmm: str) -> EngineSettings:
        from wrenn_engine.host.network import NetworkSettings
        from wrenn_engine.host.rootfs import RootfsSettings
        from wrenn_engine.host.vmm.driver import VmmSettings

        return self._settings(
            run_dir,
            vmm,
            network=NetworkSettings(
                prefix=f"wd{self.tag[:4]}", host_netns=self.host_netns, max_slots=17
            ),
            rootfs=RootfsSettings(
                work_dir=os.path.join(self.tmp, "rootfs"),
                min_free_bytes=16 * 1024 * 1024,
            ),
            vmm_driver=VmmSettings(owner=self.tmp),
        )

    # --- what happened ----------------------------------------------------------------

    def _timeline(self, history: list[RecordedEvent]) -> None:
        emit("")
        emit(
            f"Timeline of {self.sandbox_id} ({len(history)} events; every command "
            "as the log recorded it):"
        )
        first = history[0].recorded_at
        rows = []
        for event in history:
            if event.type.startswith(("sandbox.", "transition.")):
                offset = (event.recorded_at - first).total_seconds()
                rows.append(
                    [
                        f"+{offset:.3f}s",
                        f"v{event.version}",
                        event.type,
                        event.metadata.actor,
                        render.summary(event),
                    ]
                )
        for line in table(("AT", "VER", "EVENT", "ACTOR", "WHAT"), rows):
            emit(f"  {line}")
        emit(
            f"  (first event at {utc_text(first)}; `wrenn-engine events --sandbox "
            f"{self.sandbox_id}` lists all of them)"
        )

    def _replay(self, history: list[RecordedEvent]) -> None:
        emit("")
        emit("Replay --explain (the state folded from the log alone, event by event):")
        for line in render.explain_lines(explain(history)):
            emit(f"  {line}")

    def _leftovers(self) -> list[tuple[str, str]]:
        """Every object the drivers' own scan still finds; removed if any."""
        assert self.engine is not None
        drivers = self.engine.drivers
        found: list[tuple[str, str]] = []
        for driver in (drivers.vmm, drivers.network, drivers.rootfs):
            for kind, name in driver.leftovers(set()):
                found.append((kind, name))
                with contextlib.suppress(WrennError, OSError):
                    driver.remove_leftover(kind, name)
        return found

    # --- cleaning up ------------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove everything, whatever state the run stopped in."""
        with _signals_ignored():
            failures: list[str] = []
            if self.engine is not None:
                _attempt(failures, "destroy the sandbox", self._destroy_if_needed)
                # Whatever a driver may have missed: its own scan finds it, and
                # the names, marks and directories are this run's alone.
                _attempt(failures, "remove leftovers", self._leftovers)
                _attempt(failures, "close the engine", self.engine.close)
            if self.host_netns:
                from wrenn_engine.host import netns

                _attempt(
                    failures,
                    f"remove namespace {self.host_netns}",
                    lambda: netns.remove(self.host_netns),
                )
            if self.tmp:
                _attempt(
                    failures, f"remove {self.tmp}", lambda: shutil.rmtree(self.tmp)
                )
            for failure in failures:
                note(f"demo: could not {failure}")

    def _destroy_if_needed(self) -> None:
        assert self.engine is not None
        sandbox = self.engine.store.get_sandbox(self.sandbox_id)
        if sandbox is None or sandbox.state == State.DESTROYED:
            return
        note(f"demo: destroying {self.sandbox_id} ({sandbox.state}) before leaving")
        try:
            self.engine.destroy(self.sandbox_id, actor="demo")
            return
        except WrennError as exc:
            note(f"demo: destroy failed ({exc}); removing what the log says it holds")
        # A command cut off by Ctrl-C leaves the sandbox in a transient state
        # that only a later reconcile may take over; the demo removes what
        # the log records directly instead.
        sandbox = self.engine.store.get_sandbox(self.sandbox_id)
        for resource in sandbox.resources.values() if sandbox else ():
            with contextlib.suppress(WrennError, OSError):
                self.engine.remove_resource(resource["kind"], resource["name"])


def _attempt(failures: list[str], what: str, action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception as exc:
        failures.append(f"{what}: {exc}")


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Cleanup must finish: a second Ctrl-C (or SIGTERM) waits for it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {
        s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def is_root() -> bool:
    """Whether the real drivers can run (a seam for tests of the other path)."""
    return os.geteuid() == 0


def find_kernel() -> str | None:
    """The newest readable kernel image in /boot (vmlinux preferred)."""
    for pattern in ("/boot/vmlinux-*", "/boot/vmlinuz-*"):
        found = sorted(
            (
                p
                for p in glob.glob(pattern)
                if os.path.isfile(p) and os.access(p, os.R_OK)
            ),
            key=_version_key,
        )
        if found:
            return found[-1]
    return None


def _version_key(path: str) -> list[Any]:
    parts: list[Any] = []
    for piece in os.path.basename(path).replace("-", ".").split("."):
        parts.append((0, int(piece), "") if piece.isdigit() else (1, 0, piece))
    return parts


def cloud_hypervisor() -> str | None:
    from wrenn_engine.domain.config import DEFAULT_VMM_BIN

    if os.path.isfile(DEFAULT_VMM_BIN) and os.access(DEFAULT_VMM_BIN, os.X_OK):
        return DEFAULT_VMM_BIN
    return shutil.which("cloud-hypervisor")


def run_demo(args: argparse.Namespace) -> int:
    """The ``demo`` command."""
    demo = Demo(args)
    try:
        status = demo.run()
    finally:
        demo.cleanup()
    if status == 0:
        emit(
            f"demo finished in {time.monotonic() - demo.started:.1f}s; removed "
            f"{demo.tmp}"
            + (f" and namespace {demo.host_netns}" if demo.host_netns else "")
            + "."
        )
    return status
