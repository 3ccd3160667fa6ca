"""The default steps of every command.

Step names are stable: an embedding control plane refers to them to insert,
replace or remove steps, and failpoints use them. The phase of a step is the
transient state the sandbox shows while it runs.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from typing import Any

from wrenn_engine.domain.events import resource_key
from wrenn_engine.domain.state import State
from wrenn_engine.errors import PipelineError, ResourceBusy, VmmError
from wrenn_engine.host import paths
from wrenn_engine.host.base import (
    DiskSpec,
    NetworkPlan,
    RootfsAttachment,
    RootfsPlan,
    VmmProcess,
    VmmSpec,
)
from wrenn_engine.lifecycle.steps import (
    Intent,
    Pipeline,
    Pipelines,
    Result,
    Step,
    StepContext,
)

# --- helpers ----------------------------------------------------------------------


def _rootfs_plan(ctx: StepContext) -> RootfsPlan | None:
    data = ctx.facts.get("rootfs")
    return RootfsPlan(**data) if data else None


def _attachment(data: dict[str, Any] | None) -> RootfsAttachment:
    return RootfsAttachment(**data) if data else RootfsAttachment()


def _attachment_resources(att: RootfsAttachment) -> list[dict[str, str]]:
    out = []
    if att.template_loop:
        out.append({"kind": "loop", "name": att.template_loop})
    if att.cow_loop:
        out.append({"kind": "loop", "name": att.cow_loop})
    if att.dm_name:
        out.append({"kind": "dm", "name": att.dm_name})
    return out


def _vmm(ctx: StepContext) -> VmmProcess | None:
    data = ctx.facts.get("vmm")
    return VmmProcess.from_dict(data) if data else None


def _sandbox_paths(ctx: StepContext) -> paths.SandboxPaths:
    config = ctx.config
    return paths.SandboxPaths(
        sandbox_dir=config.sandbox_dir, socket_path=config.socket_path
    )


def _skipped(reason: str) -> Result:
    return {"skipped": reason}


# --- sandbox directory --------------------------------------------------------------


def plan_dir(ctx: StepContext) -> Intent:
    path = ctx.config.sandbox_dir
    existed = os.path.lexists(path)
    if existed and resource_key("dir", path) not in ctx.sandbox.resources:
        # Only a directory this engine made (and the log holds) is reused;
        # anything else there is someone's data, never the sandbox's.
        raise ResourceBusy(
            "sandbox directory",
            path,
            "the engine did not create it; move it "
            "away or give the sandbox another sandbox_dir / run directory",
        )
    intent: Intent = {"path": path, "existed": existed}
    if not existed:
        intent["resources"] = [{"kind": "dir", "name": path}]
    return intent


def run_dir(ctx: StepContext, intent: Intent) -> Result:
    paths.prepare_sandbox_dir(intent["path"])
    if intent["existed"]:
        return {}
    return {"resources": [{"kind": "dir", "name": intent["path"]}]}


def undo_dir(ctx: StepContext, intent: Intent, result: Result | None) -> None:
    if not intent["existed"]:
        paths.remove_sandbox_dir(intent["path"])


def run_dir_remove(ctx: StepContext, intent: Intent) -> Result:
    path = ctx.config.sandbox_dir
    if resource_key("dir", path) not in ctx.sandbox.resources:
        return _skipped("the log holds no directory the engine created")
    paths.remove_sandbox_dir(path)
    return {"released": [{"kind": "dir", "name": path}]}


# --- rootfs ---------------------------------------------------------------------------


def plan_rootfs(ctx: StepContext) -> Intent:
    existing = _rootfs_plan(ctx)
    if existing is not None:
        return {"plan": existing.to_dict(), "attach": True}
    config = ctx.config
    plan = ctx.drivers.rootfs.plan(
        config.sandbox_id, config.rootfs_path, config.sandbox_dir
    )
    return {
        "plan": plan.to_dict(),
        "attach": False,
        "resources": [{"kind": "cow", "name": plan.cow_path}],
    }


def run_rootfs(ctx: StepContext, intent: Intent) -> Result:
    plan = RootfsPlan(**intent["plan"])
    if intent["attach"]:
        # The disk (and its "rootfs" fact) was there before this command:
        # report only the attachment, so an undo forgets only that.
        attachment = ctx.drivers.rootfs.attach(plan)
        return {
            "resources": _attachment_resources(attachment),
            "facts": {"rootfs_attachment": attachment.to_dict()},
        }
    attachment = ctx.drivers.rootfs.prepare(plan)
    return {
        "resources": [
            {"kind": "cow", "name": plan.cow_path},
            *_attachment_resources(attachment),
        ],
        "facts": {"rootfs": plan.to_dict(), "rootfs_attachment": attachment.to_dict()},
    }


def undo_rootfs(ctx: StepContext, intent: Intent, result: Result | None) -> None:
    plan = RootfsPlan(**intent["plan"])
    facts = (result or {}).get("facts") or {}
    attachment = _attachment(facts.get("rootfs_attachment"))
    if intent["attach"]:
        ctx.drivers.rootfs.detach(plan, attachment)
    else:
        ctx.drivers.rootfs.remove(plan, attachment)


def plan_rootfs_attach(ctx: StepContext) -> Intent:
    plan = _rootfs_plan(ctx)
    return {"plan": plan.to_dict() if plan else None, "attach": True}


def run_rootfs_detach(ctx: StepContext, intent: Intent) -> Result:
    plan = _rootfs_plan(ctx)
    attachment = _attachment(ctx.facts.get("rootfs_attachment"))
    if plan is None or attachment == RootfsAttachment():
        return _skipped("no attached disk")
    ctx.drivers.rootfs.detach(plan, attachment)
    return {
        "released": _attachment_resources(attachment),
        "facts": {"rootfs_attachment": None},
    }


def run_rootfs_remove(ctx: StepContext, intent: Intent) -> Result:
    plan = _rootfs_plan(ctx)
    if plan is None:
        return _skipped("no disk was made")
    attachment = _attachment(ctx.facts.get("rootfs_attachment"))
    ctx.drivers.rootfs.remove(plan, attachment)
    return {
        "released": [
            {"kind": "cow", "name": plan.cow_path},
            *_attachment_resources(attachment),
        ],
        "facts": {"rootfs": None, "rootfs_attachment": None},
    }


# --- network --------------------------------------------------------------------------


def plan_network(ctx: StepContext) -> Intent:
    slot = ctx.free_slot()
    plan = ctx.drivers.network.plan(ctx.sandbox.id, slot)
    return {"plan": plan.to_dict(), "resources": plan.resources()}


def run_network(ctx: StepContext, intent: Intent) -> Result:
    plan = NetworkPlan(**intent["plan"])
    ctx.drivers.network.prepare(plan)
    return {"resources": plan.resources(), "facts": {"network": plan.to_dict()}}


def undo_network(ctx: StepContext, intent: Intent, result: Result | None) -> None:
    ctx.drivers.network.teardown(NetworkPlan(**intent["plan"]))


def run_network_release(ctx: StepContext, intent: Intent) -> Result:
    data = ctx.facts.get("network")
    if not data:
        return _skipped("no network")
    plan = NetworkPlan(**data)
    ctx.drivers.network.teardown(plan)
    return {"released": plan.resources(), "facts": {"network": None}}


# --- vmm ------------------------------------------------------------------------------


def plan_launch(ctx: StepContext) -> Intent:
    config = ctx.config
    files = _sandbox_paths(ctx)
    network = ctx.facts.get("network") or {}
    spec = VmmSpec(
        sandbox_id=config.sandbox_id,
        binary=config.vmm_bin,
        netns=network.get("netns", config.network_namespace),
        socket_path=config.socket_path,
        sandbox_dir=config.sandbox_dir,
        log_path=files.vmm_log,
        event_monitor_path=files.event_monitor,
    )
    return {
        "spec": spec.to_dict(),
        "resources": [{"kind": "socket", "name": config.socket_path}],
    }


def run_launch(ctx: StepContext, intent: Intent) -> Result:
    spec = VmmSpec(**intent["spec"])
    process = ctx.drivers.vmm.launch(spec, ctx.settings.launch_timeout_s)
    return {
        "resources": [
            {"kind": "vmm", "name": str(process.pid)},
            {"kind": "socket", "name": spec.socket_path},
        ],
        "facts": {"vmm": process.to_dict(), "event_monitor": spec.event_monitor_path},
    }


def undo_launch(ctx: StepContext, intent: Intent, result: Result | None) -> None:
    spec = VmmSpec(**intent["spec"])
    data = ((result or {}).get("facts") or {}).get("vmm")
    # Without a recorded result the launch may still have happened: look for
    # the process by its mark and socket rather than trust the absence.
    process = VmmProcess.from_dict(data) if data else ctx.drivers.vmm.find(spec)
    if process is not None:
        ctx.drivers.vmm.shutdown(
            process, spec.socket_path, ctx.settings.shutdown_timeout_s
        )
    if os.path.exists(spec.socket_path):
        ctx.drivers.vmm.remove_leftover("socket", spec.socket_path)


def undone_with_vmm(ctx: StepContext, intent: Intent, result: Result | None) -> None:
    """The undo of a step whose effect lives only inside the VMM process
    (``vm.create``, ``vm.boot``, ``vm.restore``, ``vm.resume``): nothing to
    do here, because undoing ``vmm.launch`` ends the process and the VM with
    it."""


def run_vmm_stop(ctx: StepContext, intent: Intent) -> Result:
    process = _vmm(ctx)
    socket = ctx.config.socket_path
    if process is None:
        return _skipped("no VMM")
    ctx.drivers.vmm.shutdown(process, socket, ctx.settings.shutdown_timeout_s)
    return {
        "released": [
            {"kind": "vmm", "name": str(process.pid)},
            {"kind": "socket", "name": socket},
        ],
        "facts": {"vmm": None},
    }


def run_vm_create(ctx: StepContext, intent: Intent) -> Result:
    config = ctx.config
    rootfs = _rootfs_plan(ctx)
    if rootfs is None:
        raise PipelineError(
            ctx.command,
            "vm.create found no prepared disk; keep rootfs.prepare before it",
        )
    disk = DiskSpec(
        path=rootfs.disk_path,
        image_type=rootfs.image_type,
        backing_files=rootfs.backing_files,
    )
    ctx.drivers.vmm.create_vm(config.socket_path, config, disk)
    return {}


def run_vm_boot(ctx: StepContext, intent: Intent) -> Result:
    ctx.drivers.vmm.boot(ctx.config.socket_path)
    return {}


def run_vm_pause(ctx: StepContext, intent: Intent) -> Result:
    ctx.drivers.vmm.pause(ctx.config.socket_path)
    return {}


def undo_vm_pause(ctx: StepContext, intent: Intent, result: Result | None) -> None:
    process = _vmm(ctx)
    if process is None or not ctx.drivers.vmm.is_running(process):
        raise VmmError("vm.resume", None, "the VMM is gone; the VM cannot run again")
    info = ctx.drivers.vmm.info(ctx.config.socket_path)
    if info.get("state") == "Paused":
        ctx.drivers.vmm.resume(ctx.config.socket_path)


def plan_snapshot(ctx: StepContext) -> Intent:
    files = _sandbox_paths(ctx)
    return {
        "path": files.snapshot_dir,
        "tmp": files.snapshot_tmp_dir,
        "resources": [{"kind": "snapshot", "name": files.snapshot_dir}],
    }


def run_snapshot(ctx: StepContext, intent: Intent) -> Result:
    final, tmp = intent["path"], intent["tmp"]
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.mkdir(tmp, 0o700)
        ctx.drivers.vmm.snapshot(ctx.config.socket_path, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "resources": [{"kind": "snapshot", "name": final}],
        "facts": {"snapshot": final},
    }


def undo_snapshot(ctx: StepContext, intent: Intent, result: Result | None) -> None:
    shutil.rmtree(intent["tmp"], ignore_errors=True)
    shutil.rmtree(intent["path"], ignore_errors=True)


def run_vm_restore(ctx: StepContext, intent: Intent) -> Result:
    snapshot = ctx.facts.get("snapshot")
    if not snapshot:
        raise PipelineError(
            ctx.command,
            "vm.restore found no snapshot; pause (vm.snapshot) must have taken one",
        )
    ctx.drivers.vmm.restore(ctx.config.socket_path, snapshot)
    return {}


def run_vm_resume(ctx: StepContext, intent: Intent) -> Result:
    ctx.drivers.vmm.resume(ctx.config.socket_path)
    return {}


def run_snapshot_discard(ctx: StepContext, intent: Intent) -> Result:
    snapshot = ctx.facts.get("snapshot")
    if not snapshot:
        return _skipped("no snapshot")
    shutil.rmtree(snapshot, ignore_errors=True)
    return {
        "released": [{"kind": "snapshot", "name": snapshot}],
        "facts": {"snapshot": None},
    }


def run_sweep(ctx: StepContext, intent: Intent) -> Result:
    """Remove every resource the log still says this sandbox holds."""
    released = []
    for res in list(ctx.sandbox.resources.values()):
        kind, name = res["kind"], res["name"]
        if kind in ("slot", "dir"):
            continue
        ctx.remove_resource(kind, name)
        released.append({"kind": kind, "name": name})
    return {"released": released}


# --- the pipelines --------------------------------------------------------------------

P, S = State.PROVISIONING, State.STARTING


def _steps() -> dict[str, Step]:
    return {
        "sandbox.dir": Step(
            "sandbox.dir",
            run_dir,
            undo_dir,
            plan_dir,
            description="create the sandbox directory (0700)",
        ),
        "rootfs.prepare": Step(
            "rootfs.prepare",
            run_rootfs,
            undo_rootfs,
            plan_rootfs,
            description="create or re-attach the CoW disk",
        ),
        "rootfs.attach": Step(
            "rootfs.attach",
            run_rootfs,
            undo_rootfs,
            plan_rootfs_attach,
            description="attach the kept CoW disk again",
        ),
        "rootfs.detach": Step(
            "rootfs.detach",
            run_rootfs_detach,
            description="release loop and dm devices, keep the disk",
        ),
        "rootfs.remove": Step(
            "rootfs.remove", run_rootfs_remove, description="delete the CoW disk"
        ),
        "network.prepare": Step(
            "network.prepare",
            run_network,
            undo_network,
            plan_network,
            description="namespace, veth, TAP, NAT on a free slot",
        ),
        "network.release": Step(
            "network.release",
            run_network_release,
            description="tear the network down, free the slot",
        ),
        "vmm.launch": Step(
            "vmm.launch",
            run_launch,
            undo_launch,
            plan_launch,
            description="start the VMM in the namespace, wait for API",
        ),
        "vmm.stop": Step(
            "vmm.stop",
            run_vmm_stop,
            description="shut the VM and VMM down, then signals",
        ),
        "vm.create": Step(
            "vm.create", run_vm_create, undone_with_vmm, description="vm.create"
        ),
        "vm.boot": Step(
            "vm.boot",
            run_vm_boot,
            undone_with_vmm,
            description="vm.boot, then vm.info must say Running",
        ),
        "vm.pause": Step(
            "vm.pause",
            run_vm_pause,
            undo_vm_pause,
            description="vm.pause (undo: vm.resume)",
        ),
        "vm.snapshot": Step(
            "vm.snapshot",
            run_snapshot,
            undo_snapshot,
            plan_snapshot,
            description="snapshot into a temp dir, rename on success",
        ),
        "vm.restore": Step(
            "vm.restore",
            run_vm_restore,
            undone_with_vmm,
            description="vm.restore from the snapshot",
        ),
        "vm.resume": Step(
            "vm.resume", run_vm_resume, undone_with_vmm, description="vm.resume"
        ),
        "snapshot.discard": Step(
            "snapshot.discard", run_snapshot_discard, description="delete the snapshot"
        ),
        "host.sweep": Step(
            "host.sweep",
            run_sweep,
            description="remove anything else the log says is held",
        ),
        "sandbox.dir.remove": Step(
            "sandbox.dir.remove",
            run_dir_remove,
            description="delete the sandbox directory",
        ),
    }


def default_pipelines() -> Pipelines:
    """A fresh, editable set of the default pipelines."""
    s = _steps()

    def phase(state: State, *names: str) -> list[Step]:
        return [_with_phase(s[n], state) for n in names]

    release = ("vmm.stop", "network.release", "rootfs.detach")
    return Pipelines(
        {
            "start": Pipeline(
                "start",
                [
                    *phase(P, "sandbox.dir", "rootfs.prepare", "network.prepare"),
                    *phase(S, "vmm.launch", "vm.create", "vm.boot"),
                ],
            ),
            "pause": Pipeline(
                "pause", phase(State.PAUSING, "vm.pause", "vm.snapshot", *release)
            ),
            "resume": Pipeline(
                "resume",
                phase(
                    State.RESUMING,
                    "rootfs.attach",
                    "network.prepare",
                    "vmm.launch",
                    "vm.restore",
                    "vm.resume",
                    "snapshot.discard",
                ),
            ),
            "stop": Pipeline(
                "stop", phase(State.STOPPING, *release, "snapshot.discard")
            ),
            "halt": Pipeline("halt", phase(State.STOPPING, *release)),
            "destroy": Pipeline(
                "destroy",
                phase(
                    State.DESTROYING,
                    *release,
                    "rootfs.remove",
                    "snapshot.discard",
                    "host.sweep",
                    "sandbox.dir.remove",
                ),
            ),
        }
    )


def _with_phase(step: Step, state: State) -> Step:
    return replace(step, phase=str(state))
