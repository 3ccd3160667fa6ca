"""The Engine: the facade a control plane embeds.

Commands (create, start, pause, resume, stop, destroy) run a pipeline on one
sandbox through the state machine; queries read the projections and the
log; ``wait`` blocks until a sandbox reaches a state; ``reconcile`` brings
host and log into agreement after a crash. Thread-safe: commands on
different sandboxes run in parallel, two commands on one sandbox never do.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from wrenn_engine.domain import events as ev
from wrenn_engine.domain.config import VMConfig, check_text, validate_sandbox_id
from wrenn_engine.domain.events import Metadata, RecordedEvent, is_sandbox_stream
from wrenn_engine.domain.state import SandboxState, State, state_at
from wrenn_engine.engine.settings import EngineSettings
from wrenn_engine.engine.workers import MonitorLog
from wrenn_engine.errors import (
    CommandFailed,
    ConcurrencyError,
    ConfigError,
    IdempotencyError,
    InvalidTransition,
    NotOwner,
    SandboxBusy,
    SandboxNotFound,
    WaitTimeout,
    WrennError,
)
from wrenn_engine.host import paths
from wrenn_engine.host.base import HostDrivers
from wrenn_engine.host.procinfo import instance_id
from wrenn_engine.lifecycle.failpoints import Failpoints
from wrenn_engine.lifecycle.failpoints import names as failpoint_names
from wrenn_engine.lifecycle.machine import COMMANDS, allowed_sources
from wrenn_engine.lifecycle.pipelines import default_pipelines
from wrenn_engine.lifecycle.runner import AlreadyApplied, CommandRun, describe
from wrenn_engine.lifecycle.steps import Pipelines, StepContext
from wrenn_engine.store import open_store
from wrenn_engine.store.base import EventQuery, EventStore

log = logging.getLogger(__name__)

ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def new_sandbox_id() -> str:
    return "sb-" + "".join(secrets.choice(ID_ALPHABET) for _ in range(10))


class Engine:
    """One host's sandboxes, driven through their event-sourced lifecycle."""

    def __init__(
        self,
        store: EventStore,
        drivers: HostDrivers,
        settings: EngineSettings | None = None,
        failpoints: Failpoints | None = None,
        pipelines: Pipelines | None = None,
    ):
        self.store = store
        self.drivers = drivers
        self.settings = settings or EngineSettings()
        self.host_id = self.settings.host_id
        self.failpoints = (
            failpoints if failpoints is not None else Failpoints.from_env()
        )
        self.pipelines = pipelines or default_pipelines()
        self.instance = instance_id(self.host_id)
        self._check_failpoints()

        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._holders: dict[str, str] = {}
        self._changed = threading.Condition()
        self._idle = threading.Condition()
        self._active = 0
        self._closed = False
        self._workers: list[Any] = []
        self.monitor = MonitorLog(self)
        for sandbox in store.list_sandboxes(
            states=[State.RUNNING], host_id=self.host_id
        ):
            self.monitor.resume_from_log(sandbox.id)

    # --- opening and closing ----------------------------------------------------------

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        drivers: HostDrivers | None = None,
        settings: EngineSettings | None = None,
        failpoints: Failpoints | None = None,
        auto_upgrade: bool | None = None,
    ) -> Engine:
        """Open the store at ``url`` (default: the embedded SQLite file),
        reconcile this host with the log, and start the background workers.

        The embedded default upgrades its schema itself; a database given by
        URL must be upgraded with ``wrenn-engine db upgrade`` unless
        ``auto_upgrade=True``.
        """
        settings = settings or EngineSettings()
        store = open_store(url, auto_upgrade=auto_upgrade)
        try:
            engine = cls(store, drivers or real_drivers(settings), settings, failpoints)
            if settings.reconcile_on_open:
                engine.reconcile()
            if settings.workers:
                engine.start_workers()
        except BaseException:
            store.close()
            raise
        return engine

    def start_workers(self) -> None:
        from wrenn_engine.engine.workers import InactivityWorker, VmmWatcher

        self._workers = [VmmWatcher(self), InactivityWorker(self)]
        for worker in self._workers:
            worker.start()

    def close(self, timeout: float = 60.0) -> None:
        """Refuse new commands, let the running ones finish (up to
        ``timeout`` seconds), stop the workers and close the store.

        Sandboxes keep running; the next engine adopts them. A command still
        running after ``timeout`` is cut off like a crash, and reconcile
        finishes or undoes it when an engine opens next.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._active and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
            if self._active:
                log.warning(
                    "closing with %d command(s) still running: %s",
                    self._active,
                    ", ".join(sorted(self._holders)),
                )
        for worker in self._workers:
            worker.stop()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- commands ---------------------------------------------------------------------

    def create(
        self,
        *,
        kernel_path: str,
        rootfs_path: str,
        vcpus: int = 0,
        memory_mb: int = 0,
        sandbox_id: str | None = None,
        template_id: str = "",
        start: bool = True,
        inactivity_timeout_s: float | None = None,
        labels: dict[str, str] | None = None,
        actor: str = "api",
        command_id: str | None = None,
        config: VMConfig | None = None,
    ) -> SandboxState:
        """Create a sandbox and, unless ``start=False``, start it.

        The config is completed with defaults and validated before anything
        is written: bad input raises ConfigError and leaves no trace. Pass
        ``config`` to set any VMConfig field by hand; the keyword arguments
        fill the fields it leaves empty.
        """
        _check_actor(actor, command_id)
        _check_labels(labels)
        given = sandbox_id or (config.sandbox_id if config else "")
        request = _fingerprint(
            config,
            kernel_path,
            rootfs_path,
            vcpus,
            memory_mb,
            template_id,
            inactivity_timeout_s,
            labels,
        )
        if command_id:
            # A retried create names the same command id, perhaps without an
            # id: the sandbox it made the first time is the answer.
            record = self.store.command(command_id)
            if (
                record is not None
                and record.command.startswith("create")
                and (not given)
            ):
                given = record.stream_id
        sandbox_id = given or new_sandbox_id()
        validate_sandbox_id(sandbox_id)
        if command_id:
            replayed = self._replayed(command_id, sandbox_id, request)
            if replayed is not None:
                return replayed
        draft = self._draft_config(
            config or VMConfig(),
            sandbox_id,
            kernel_path,
            rootfs_path,
            vcpus,
            memory_mb,
            template_id,
        )
        _check_timeout(inactivity_timeout_s)

        filled = draft.defaults_to_apply()
        effective = draft.with_defaults()
        self.failpoints.hit("config.apply_defaults", sandbox_id)
        effective.validate()
        self.failpoints.hit("config.validate", sandbox_id)
        self._preflight(effective)

        events = [
            ev.SandboxCreated(
                draft.to_dict(), self.host_id, inactivity_timeout_s, dict(labels or {})
            ),
            ev.ConfigDefaultsApplied(filled),
            ev.ConfigValidated(effective.to_dict()),
        ]
        metadata = self._metadata(actor, command_id)
        try:
            result = self.store.append(
                sandbox_id,
                [e.to_new() for e in events],
                expected_version=0,
                metadata=metadata,
                command_id=command_id,
                command=request,
            )
        except ConcurrencyError as exc:
            raise ConfigError(
                "sandbox_id",
                f"{sandbox_id!r} already exists",
                hint="choose another id, or omit it to have one generated",
            ) from exc
        log.info(
            "sandbox %s: created (vcpus=%s, memory_mb=%s)",
            sandbox_id,
            effective.vcpus,
            effective.memory_mb,
        )
        self._notify()
        if result.replayed:
            return self.get(sandbox_id)
        if start:
            start_id = f"{command_id}/start" if command_id else None
            return self.start(sandbox_id, actor=actor, command_id=start_id)
        return self.get(sandbox_id)

    def start(
        self,
        sandbox_id: str,
        *,
        actor: str = "api",
        command_id: str | None = None,
        wait: bool = False,
    ) -> SandboxState:
        """pending or stopped -> running."""
        return self._command("start", sandbox_id, actor, command_id, wait)

    def pause(
        self,
        sandbox_id: str,
        *,
        actor: str = "api",
        command_id: str | None = None,
        wait: bool = False,
    ) -> SandboxState:
        """running -> paused: snapshot, then release VMM, network, loop devices."""
        return self._command("pause", sandbox_id, actor, command_id, wait)

    def resume(
        self,
        sandbox_id: str,
        *,
        actor: str = "api",
        command_id: str | None = None,
        wait: bool = False,
    ) -> SandboxState:
        """paused -> running: a new VMM restored from the snapshot."""
        return self._command("resume", sandbox_id, actor, command_id, wait)

    def stop(
        self,
        sandbox_id: str,
        *,
        actor: str = "api",
        command_id: str | None = None,
        wait: bool = False,
    ) -> SandboxState:
        """running or paused -> stopped; the disk is kept."""
        return self._command("stop", sandbox_id, actor, command_id, wait)

    def destroy(
        self,
        sandbox_id: str,
        *,
        actor: str = "api",
        command_id: str | None = None,
        wait: bool = False,
    ) -> SandboxState:
        """Any non-terminal state -> destroyed. A second destroy adds nothing."""
        return self._command("destroy", sandbox_id, actor, command_id, wait)

    def halt(
        self,
        sandbox_id: str,
        reason: str,
        *,
        causation_id: str | None = None,
        wait: bool = True,
    ) -> SandboxState:
        """The VMM exited on its own: release what it held (actor ``system``).

        A guest shutdown lands in ``stopped``; a panic or a VMM crash in
        ``error`` with the reason.
        """
        options: dict[str, Any] = {}
        if reason != "guest-shutdown":
            options["land_in_error"] = f"{reason}: the VMM exited on its own"
        return self._command(
            "halt", sandbox_id, "system", None, wait, options, causation_id=causation_id
        )

    def touch(self, sandbox_id: str, detail: str = "", *, actor: str = "api") -> None:
        """Record that the sandbox was used: its inactivity timer starts again."""
        with self.hold(sandbox_id, "touch", wait=True):
            sandbox = self.get(sandbox_id)
            self.store.append(
                sandbox_id,
                [ev.ActivityRecorded(detail).to_new()],
                expected_version=sandbox.version,
                metadata=self._metadata(actor, None),
            )

    # --- queries ----------------------------------------------------------------------

    def get(self, sandbox_id: str) -> SandboxState:
        self._check_sandbox_stream(sandbox_id)
        sandbox = self.store.get_sandbox(sandbox_id)
        if sandbox is None:
            raise SandboxNotFound(sandbox_id)
        return sandbox

    def list(
        self, *, states: Sequence[str] = (), host_id: str | None = None
    ) -> builtins.list[SandboxState]:
        return self.store.list_sandboxes(states=states, host_id=host_id)

    def history(self, sandbox_id: str) -> builtins.list[RecordedEvent]:
        self._check_sandbox_stream(sandbox_id)
        events = self.store.read_stream(sandbox_id)
        if not events:
            raise SandboxNotFound(sandbox_id)
        return events

    def events(self, query: EventQuery) -> builtins.list[RecordedEvent]:
        return self.store.query(query)

    def replay(
        self, sandbox_id: str, to_version: int | None = None, at: datetime | None = None
    ) -> SandboxState:
        """The state after the chosen event, folded from the log alone."""
        self._check_sandbox_stream(sandbox_id)
        events = self.store.read_stream(sandbox_id, to_version=to_version, at=at)
        state = state_at(events)
        if state is None:
            raise SandboxNotFound(sandbox_id)
        return state

    @staticmethod
    def _check_sandbox_stream(sandbox_id: str) -> None:
        """A host's own stream (reconcile's record) is not a sandbox."""
        if not is_sandbox_stream(sandbox_id):
            raise SandboxNotFound(sandbox_id)

    def wait(
        self, sandbox_id: str, state: str | Sequence[str], timeout: float = 30.0
    ) -> SandboxState:
        """Block until the sandbox is in ``state`` (or one of several)."""
        wanted = (state,) if isinstance(state, str) else tuple(state)
        deadline = time.monotonic() + timeout
        while True:
            current = self.get(sandbox_id)
            if current.state in wanted:
                return current
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(sandbox_id, wanted, current.state, timeout)
            if current.is_terminal:
                raise InvalidTransition(
                    sandbox_id, f"reach {'/'.join(wanted)}", current.state
                )
            with self._changed:
                self._changed.wait(min(remaining, 0.2))

    def reconcile(self) -> builtins.list[str]:
        """Bring host and log into agreement; return what was done."""
        from wrenn_engine.engine.reconcile import Reconciler

        return Reconciler(self).run()

    def step_names(self) -> builtins.list[str]:
        return [
            "config.apply_defaults",
            "config.validate",
            *self.pipelines.step_names(),
        ]

    # --- running commands -------------------------------------------------------------

    def _command(
        self,
        command: str,
        sandbox_id: str,
        actor: str,
        command_id: str | None,
        wait: bool,
        options: dict[str, Any] | None = None,
        causation_id: str | None = None,
    ) -> SandboxState:
        if self._closed:
            raise WrennError("the engine is closed; open a new one with Engine.open()")
        _check_actor(actor, command_id)
        if command_id:
            replayed = self._replayed(command_id, sandbox_id, command)
            if replayed is not None:
                return replayed

        with self.hold(sandbox_id, command, wait):
            if command_id:  # the first call may have finished while we waited
                replayed = self._replayed(command_id, sandbox_id, command, held=True)
                if replayed is not None:
                    return replayed
            sandbox = self.get(sandbox_id)
            if command == "destroy" and sandbox.state == State.DESTROYED:
                return sandbox
            self._check_allowed(sandbox, command)

            run = self._new_run(
                sandbox, command, actor, command_id, options or {}, causation_id
            )
            try:
                outcome = run.execute()
            except AlreadyApplied:
                return self.get(sandbox_id)
            except ConcurrencyError as exc:
                if run.sandbox.version == sandbox.version:
                    raise SandboxBusy(
                        sandbox_id, command, "a command of another engine"
                    ) from exc
                self._recover_after_failure(sandbox_id, command)
                raise
            except Exception:
                # Not a step failure (those are handled in the run): the store
                # or the machine itself failed half-way. Finish or undo now,
                # as reconcile would after a crash, so the sandbox does not
                # stay in a transient state that nothing will ever end.
                self._recover_after_failure(sandbox_id, command)
                raise
            finally:
                self._after_run(run.sandbox)

        if outcome.error is not None:
            raise CommandFailed(
                sandbox_id,
                outcome.failed_step or "?",
                outcome.state,
                outcome.error_text or describe(outcome.error),
                rolled_back=outcome.state == sandbox.state,
            ) from outcome.error
        return copy.deepcopy(run.sandbox)

    def _new_run(
        self,
        sandbox: SandboxState,
        command: str,
        actor: str,
        command_id: str | None,
        options: dict[str, Any],
        causation_id: str | None = None,
    ) -> CommandRun:
        spec = COMMANDS[command]
        ctx = StepContext(
            sandbox=sandbox,
            drivers=self.drivers,
            settings=self.settings.lifecycle,
            command=command,
            actor=actor,
            log=logging.LoggerAdapter(log, {"sandbox_id": sandbox.id}),
            options=options,
        )
        ctx.free_slot = lambda: self._free_slot(ctx.refused_slots)
        ctx.remove_resource = self.remove_resource
        return CommandRun(
            store=self.store,
            sandbox=sandbox,
            spec=spec,
            pipeline=self.pipelines[command],
            metadata=self._metadata(actor, command_id, causation_id),
            ctx=ctx,
            failpoints=self.failpoints,
            engine_instance=self.instance,
            command_id=command_id,
            on_append=lambda s: self._notify(),
        )

    def _check_failpoints(self) -> None:
        """An armed failpoint no step has is a typo that would make a drill
        pass without testing anything: refuse it."""
        known = set(failpoint_names(self.step_names()))
        unknown = sorted(set(self.failpoints.armed()) - known)
        if unknown:
            raise ConfigError(
                "WRENN_ENGINE_FAILPOINTS",
                f"{unknown[0]!r} names no step",
                hint="`wrenn-engine debug failpoints` lists every name",
            )

    def _recover_after_failure(self, sandbox_id: str, command: str) -> None:
        """With the sandbox held: end a transition this engine left half-way."""
        from wrenn_engine.engine.reconcile import Reconciler

        try:
            sandbox = self.get(sandbox_id)
            if sandbox.is_transient:
                Reconciler(self).interrupted(sandbox)
        except Exception as exc:  # reconcile at the next open will try again
            log.warning(
                "sandbox %s: %s failed half-way and could not be ended now (%s); "
                "`wrenn-engine reconcile` ends it",
                sandbox_id,
                command,
                describe(exc),
            )

    def _check_allowed(self, sandbox: SandboxState, command: str) -> None:
        if sandbox.host_id != self.host_id:
            raise NotOwner(sandbox.id, sandbox.host_id, self.host_id)
        if sandbox.is_transient and sandbox.transition is not None:
            raise SandboxBusy(
                sandbox.id, command, f"{sandbox.transition.name} ({sandbox.state})"
            )
        if sandbox.state not in COMMANDS[command].sources:
            raise InvalidTransition(
                sandbox.id, command, sandbox.state, allowed_sources(command)
            )

    def _after_run(self, sandbox: SandboxState) -> None:
        """With the sandbox still held: record the VMM's monitor events and
        tell the workers what changed."""
        try:
            self.monitor.drain(sandbox, classify=False)
        except WrennError as exc:
            log.warning(
                "sandbox %s: could not record VMM events: %s", sandbox.id, describe(exc)
            )
        for worker in self._workers:
            after = getattr(worker, "after_command", None)
            if after is not None:
                after(sandbox)
        if sandbox.state == State.DESTROYED:
            self.monitor.forget(sandbox.id)

    @contextlib.contextmanager
    def hold(self, sandbox_id: str, command: str, wait: bool) -> Iterator[None]:
        """Hold the sandbox for one command; SandboxBusy if another holds it."""
        with self._guard:
            lock = self._locks.setdefault(sandbox_id, threading.Lock())
        if not lock.acquire(blocking=wait):
            holder = self._holders.get(sandbox_id, "another command")
            raise SandboxBusy(sandbox_id, command, holder)
        self._holders[sandbox_id] = command
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            self._holders.pop(sandbox_id, None)
            lock.release()
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def try_hold(
        self, sandbox_id: str, what: str
    ) -> contextlib.AbstractContextManager[None]:
        return self.hold(sandbox_id, what, wait=False)

    def _replayed(
        self, command_id: str, sandbox_id: str, command: str, held: bool = False
    ) -> SandboxState | None:
        record = self.store.command(command_id)
        if record is None:
            return None
        if record.stream_id != sandbox_id or record.command != command:
            raise IdempotencyError(
                command_id,
                f"{_readable(record.command)} on sandbox {record.stream_id}",
                f"{_readable(command)} on sandbox {sandbox_id}",
            )
        log.info(
            "sandbox %s: command id %s was applied already; not acting twice",
            sandbox_id,
            command_id,
        )
        if held:
            return self.get(sandbox_id)
        # The first call may still be running in this process: answer with
        # where it ends, not with a transient state.
        with self.hold(sandbox_id, "a repeated command", wait=True):
            return self.get(sandbox_id)

    def _metadata(
        self, actor: str, command_id: str | None, causation_id: str | None = None
    ) -> Metadata:
        return Metadata(
            actor=actor,
            correlation_id=secrets.token_hex(8),
            causation_id=causation_id,
            command_id=command_id,
            host_id=self.host_id,
        )

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # --- slots and resources ----------------------------------------------------------

    def _free_slot(self, refused: set[int]) -> int:
        held = self.store.network_slots(self.host_id)
        for slot in range(self.settings.lifecycle.max_slots):
            if slot in held or slot in refused:
                continue
            if self.drivers.network.slot_in_use(slot):
                log.warning(
                    "slot %d is free in the log but its links exist; "
                    "skipping it until reconcile removes them",
                    slot,
                )
                refused.add(slot)
                continue
            return slot
        raise ConfigError(
            "max_slots",
            f"all {self.settings.lifecycle.max_slots} network slots are in use",
            hint="destroy sandboxes or raise LifecycleSettings.max_slots",
        )

    def remove_resource(self, kind: str, name: str) -> None:
        """Remove one host resource by kind and name (idempotent)."""
        if kind in ("netns", "veth", "nft_table"):
            self.drivers.network.remove_leftover(kind, name)
        elif kind in ("cow", "loop", "dm"):
            self.drivers.rootfs.remove_leftover(kind, name)
        elif kind == "vmm":
            self.drivers.vmm.remove_leftover(kind, name)
        elif kind == "socket":
            # The driver removes it only when nothing answers on it.
            self.drivers.vmm.remove_leftover(kind, name)
        elif kind == "snapshot":
            shutil.rmtree(name, ignore_errors=True)
        elif kind == "dir":
            paths.remove_sandbox_dir(name)

    # --- config -----------------------------------------------------------------------

    def _draft_config(
        self,
        base: VMConfig,
        sandbox_id: str,
        kernel_path: str,
        rootfs_path: str,
        vcpus: int,
        memory_mb: int,
        template_id: str,
    ) -> VMConfig:
        """The config as requested: the caller's fields plus the engine's layout."""
        fields: dict[str, Any] = {
            "sandbox_id": sandbox_id,
            "kernel_path": base.kernel_path or kernel_path,
            "rootfs_path": base.rootfs_path or rootfs_path,
            "vcpus": base.vcpus or vcpus,
            "memory_mb": base.memory_mb or memory_mb,
            "template_id": base.template_id or template_id,
            "guest_ip": base.guest_ip or self.settings.guest_ip,
            "gateway_ip": base.gateway_ip or self.settings.gateway_ip,
            "netmask": base.netmask or self.settings.netmask,
            "vmm_bin": base.vmm_bin or self._vmm_bin(),
        }
        if not base.network_namespace:
            fields["network_namespace"] = self.drivers.network.plan(sandbox_id, 1).netns
        if self.settings.run_dir:
            run_dir = self.settings.run_dir
            fields["sandbox_dir"] = base.sandbox_dir or os.path.join(
                run_dir, sandbox_id
            )
            fields["socket_path"] = base.socket_path or os.path.join(
                run_dir, f"{sandbox_id}.sock"
            )
        return dataclasses.replace(base, **fields)

    def _vmm_bin(self) -> str:
        choice = self.settings.vmm
        if choice == "simulator":
            return simulator_path()
        if choice == "cloud-hypervisor":
            return ""  # VMConfig's default path, checked by preflight
        return choice

    def _preflight(self, config: VMConfig) -> None:
        """Check the files the VMM will need exist, before anything is written."""
        for field_name, hint in (
            ("kernel_path", "give the path of a kernel image (--kernel)"),
            ("rootfs_path", "give the path of a root filesystem image (--image)"),
        ):
            path = getattr(config, field_name)
            if not os.path.isfile(path):
                raise ConfigError(field_name, f"{path} is not a file", hint=hint)
            if not os.access(path, os.R_OK):
                raise ConfigError(
                    field_name, f"{path} is not readable", hint="fix its permissions"
                )
        parent = os.path.dirname(config.sandbox_dir)
        if not os.path.isdir(parent):
            raise ConfigError(
                "sandbox_dir",
                f"its parent directory {parent} does not exist",
                hint="create it (mode 0700 is best) or choose another run directory",
            )
        vmm = config.vmm_bin
        if not (os.path.isfile(vmm) and os.access(vmm, os.X_OK)):
            found = shutil.which("cloud-hypervisor")
            raise ConfigError(
                "vmm_bin",
                f"{vmm} is not an executable file",
                hint=(
                    f"cloud-hypervisor is at {found}; pass it as the VMM binary"
                    if found
                    else "install cloud-hypervisor, or use the bundled "
                    "simulator (--vmm simulator / EngineSettings(vmm='simulator'))"
                ),
            )


def simulator_path() -> str:
    """The bundled simulator's executable (the console script in this env)."""
    import sys

    beside = os.path.join(os.path.dirname(sys.executable), "wrenn-ch-simulator")
    if os.path.isfile(beside):
        return beside
    found = shutil.which("wrenn-ch-simulator")
    if found:
        return os.path.abspath(found)
    raise ConfigError(
        "vmm",
        "the wrenn-ch-simulator script is not installed",
        hint="reinstall wrenn-engine (pip install -e .)",
    )


def real_drivers(settings: EngineSettings) -> HostDrivers:
    """The Linux drivers, configured from ``settings``."""
    from wrenn_engine.host.network import LinuxNetworkDriver, NetworkSettings
    from wrenn_engine.host.rootfs import LinuxRootfsDriver, RootfsSettings
    from wrenn_engine.host.vmm.driver import CloudHypervisorDriver

    return HostDrivers(
        rootfs=LinuxRootfsDriver(settings.rootfs or RootfsSettings()),
        network=LinuxNetworkDriver(settings.network or NetworkSettings()),
        vmm=CloudHypervisorDriver(settings.vmm_driver),
    )


def _check_timeout(value: float | None) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            "inactivity_timeout_s",
            f"{value!r} is not a positive number of seconds",
            limit="a finite number > 0, or None for no timeout",
        )


def _check_actor(actor: str, command_id: str | None) -> None:
    check_text("actor", actor)
    if command_id is not None:
        check_text("command_id", command_id)


def _check_labels(labels: dict[str, str] | None) -> None:
    for key, value in (labels or {}).items():
        check_text("labels", key, maximum=63)
        check_text(f"labels[{key}]", value, maximum=253, empty=True)


def _fingerprint(config: VMConfig | None, *request: object) -> str:
    """``create`` plus a digest of what was asked: a command id reused for a
    different create is refused instead of answered with the old sandbox."""
    text = json.dumps(
        [config.to_dict() if config else None, *request], sort_keys=True, default=str
    )
    return f"create {hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _readable(command: str) -> str:
    name, _, digest = command.partition(" ")
    return f"{name} (request {digest})" if digest else name
