"""The Engine over fake host drivers: every command, every failure path."""

from __future__ import annotations

import os
import threading

import pytest

from tests.lifecycle.conftest import (
    EngineFactory,
    create,
    host_objects,
    sandbox_dir_exists,
    types,
)
from wrenn_engine.domain.state import fold
from wrenn_engine.engine import Engine
from wrenn_engine.errors import (
    CommandFailed,
    ConfigError,
    IdempotencyError,
    InvalidTransition,
    PipelineError,
    SandboxBusy,
    SandboxNotFound,
    WrennError,
)
from wrenn_engine.lifecycle.steps import Step

START_STEPS = [
    "sandbox.dir",
    "rootfs.prepare",
    "network.prepare",
    "vmm.launch",
    "vm.create",
    "vm.boot",
]


def test_create_starts_the_sandbox_and_records_every_step(engine: Engine, files):
    sandbox = create(engine, files, sandbox_id="sb-one", vcpus=2, memory_mb=256)

    assert sandbox.state == "running"
    assert sandbox.config["vcpus"] == 2
    assert sandbox.config["socket_path"] == os.path.join(
        files["run_dir"], "sb-one.sock"
    )
    history = engine.history("sb-one")
    assert [e.type for e in history[:4]] == [
        "sandbox.created",
        "config.defaults_applied",
        "config.validated",
        "transition.started",
    ]
    completed = [e.data["step"] for e in history if e.type == "step.completed"]
    assert completed == START_STEPS
    assert history[-1].type == "transition.completed"
    assert history[-1].data["to_state"] == "running"
    assert {e.metadata.actor for e in history} == {"api"}
    assert {e.metadata.host_id for e in history} == {"host-a"}

    filled = history[1].data["filled"]
    assert filled["tap_device"] == "tap0" and filled["tap_mac"] == "02:FC:00:00:00:05"
    assert "socket_path" not in filled  # set by the engine's run_dir, kept

    slot = sandbox.facts["network"]["slot"]
    assert host_objects(engine) == {
        "netns:wrenn-sb-one",
        f"veth:wr{slot}h",
        f"nft_table:wrenn_{slot}",
        f"cow:{files['run_dir']}/sb-one/rootfs.qcow2",
        f"vmm:{sandbox.facts['vmm']['pid']}",
    }
    assert engine.store.verify_projections() == []
    assert fold(history).to_dict() == engine.get("sb-one").to_dict()


def test_create_without_start_stays_pending(engine: Engine, files):
    sandbox = create(engine, files, start=False)
    assert sandbox.state == "pending"
    assert host_objects(engine) == set()
    assert engine.start(sandbox.id).state == "running"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sandbox_id": "../escape"}, "sandbox_id"),
        ({"sandbox_id": "UPPER"}, "sandbox_id"),
        ({"sandbox_id": "x" * 64}, "sandbox_id"),
        ({"vcpus": 65}, "vcpus"),
        ({"vcpus": -1}, "vcpus"),
        ({"memory_mb": 16}, "memory_mb"),
        ({"kernel_path": "relative/vmlinux"}, "kernel_path"),
        ({"kernel_path": "/no/such/kernel"}, "kernel_path"),
        ({"rootfs_path": "/no/such/image"}, "rootfs_path"),
        ({"inactivity_timeout_s": 0}, "inactivity_timeout_s"),
    ],
)
def test_bad_input_is_refused_and_leaves_nothing(engine: Engine, files, kwargs, field):
    args = {"kernel_path": files["kernel"], "rootfs_path": files["image"], **kwargs}

    with pytest.raises(ConfigError) as raised:
        engine.create(**args)

    assert raised.value.field == field
    assert field in str(raised.value)
    assert engine.store.stats().events == 0
    assert engine.list() == []
    assert host_objects(engine) == set()
    assert os.listdir(files["run_dir"]) == []


def test_the_whole_lifecycle_leaves_nothing(engine: Engine, files):
    sid = create(engine, files).id
    cow = f"cow:{files['run_dir']}/{sid}/rootfs.qcow2"

    paused = engine.pause(sid)
    assert paused.state == "paused"
    assert os.path.isdir(paused.facts["snapshot"])
    assert sorted(os.listdir(paused.facts["snapshot"])) == [
        "config.json",
        "memory-ranges",
        "state.json",
    ]
    assert host_objects(engine) == {cow}  # the disk is kept, all else released
    assert "network" not in paused.facts and "vmm" not in paused.facts

    resumed = engine.resume(sid)
    assert resumed.state == "running"
    assert "snapshot" not in resumed.facts
    assert not os.path.exists(paused.facts["snapshot"])

    assert engine.stop(sid).state == "stopped"
    assert host_objects(engine) == {cow}
    assert engine.start(sid).state == "running"

    destroyed = engine.destroy(sid)
    assert destroyed.state == "destroyed"
    assert destroyed.resources == {}
    assert host_objects(engine) == set()
    assert not sandbox_dir_exists(engine, sid)
    assert engine.store.network_slots("host-a") == {}
    assert engine.store.verify_projections() == []


@pytest.mark.parametrize("point", [p for s in START_STEPS for p in (s, f"{s}.done")])
def test_a_failing_start_step_rolls_back_to_pending(
    make_engine: EngineFactory, files, point
):
    engine = make_engine(failpoints={point: "error"})

    with pytest.raises(CommandFailed) as raised:
        create(engine, files, sandbox_id="sb-fail")

    step = point.removesuffix(".done")
    assert raised.value.step == step
    assert raised.value.landed_in == "pending"
    sandbox = engine.get("sb-fail")
    assert sandbox.state == "pending"
    assert sandbox.last_error.startswith(f"{step}: failpoint {point}")
    assert sandbox.resources == {}
    assert host_objects(engine) == set()
    assert not sandbox_dir_exists(engine, "sb-fail")
    undone = [
        e.data["step"] for e in engine.history("sb-fail") if e.type == "step.undone"
    ]
    done_before = START_STEPS[: START_STEPS.index(step) + 1]
    assert undone == list(reversed(done_before))  # the failed step's too
    assert engine.store.verify_projections() == []

    engine.failpoints.disarm()
    assert engine.start("sb-fail").state == "running"


def test_a_failed_snapshot_leaves_the_sandbox_running(engine: Engine, files):
    sid = create(engine, files).id
    engine.fake_host.fail("vm.snapshot")  # type: ignore[attr-defined]

    with pytest.raises(CommandFailed) as raised:
        engine.pause(sid)

    assert raised.value.landed_in == "running"
    sandbox = engine.get(sid)
    assert sandbox.state == "running"
    assert not os.path.exists(os.path.join(files["run_dir"], sid, "snapshot"))
    assert not os.path.exists(os.path.join(files["run_dir"], sid, "snapshot.tmp"))
    assert engine.drivers.vmm.info(sandbox.config["socket_path"])["state"] == "Running"
    assert engine.pause(sid).state == "paused"


def test_a_failure_after_an_irreversible_step_lands_in_error(engine: Engine, files):
    sid = create(engine, files).id
    engine.fake_host.fail("network.teardown")  # type: ignore[attr-defined]

    with pytest.raises(CommandFailed) as raised:
        engine.pause(sid)

    assert raised.value.landed_in == "error"
    sandbox = engine.get(sid)
    assert sandbox.state == "error"
    assert "network.release" in sandbox.last_error
    assert any(r["kind"] == "netns" for r in sandbox.resources.values())

    assert engine.destroy(sid).state == "destroyed"
    assert host_objects(engine) == set()
    assert not sandbox_dir_exists(engine, sid)


@pytest.mark.parametrize("setup", ["pending", "running", "paused", "stopped", "error"])
def test_destroy_works_from_every_state_and_twice_adds_nothing(
    engine: Engine, files, setup
):
    sid = create(engine, files, start=setup != "pending").id
    if setup == "paused":
        engine.pause(sid)
    elif setup == "stopped":
        engine.stop(sid)
    elif setup == "error":
        engine.fake_host.fail("network.teardown")  # type: ignore[attr-defined]
        with pytest.raises(CommandFailed):
            engine.pause(sid)
    assert engine.get(sid).state == setup

    engine.destroy(sid)
    version = engine.get(sid).version
    assert engine.destroy(sid).state == "destroyed"

    assert engine.get(sid).version == version
    assert host_objects(engine) == set()
    with pytest.raises(InvalidTransition):
        engine.start(sid)


def test_commands_not_allowed_in_a_state_say_where_they_are(engine: Engine, files):
    sid = create(engine, files, start=False).id
    with pytest.raises(InvalidTransition) as raised:
        engine.pause(sid)
    assert raised.value.state == "pending"
    assert raised.value.allowed == ("running",)
    with pytest.raises(SandboxNotFound):
        engine.pause("sb-nobody")


def test_two_commands_on_one_sandbox_exactly_one_acts(engine: Engine, files):
    sid = create(engine, files).id
    gate = threading.Barrier(2)
    original = engine.drivers.vmm.pause
    entered = threading.Event()

    def slow_pause(socket: str) -> None:
        entered.set()
        gate.wait(timeout=5)
        original(socket)

    engine.drivers.vmm.pause = slow_pause  # type: ignore[method-assign]
    results: list[object] = []
    worker = threading.Thread(target=lambda: results.append(engine.pause(sid)))
    worker.start()
    assert entered.wait(5)

    with pytest.raises(SandboxBusy) as raised:
        engine.pause(sid)
    assert raised.value.holder == "pause"
    gate.wait(timeout=5)
    worker.join(5)

    assert results[0].state == "paused"
    started = [e for e in engine.history(sid) if e.type == "transition.started"]
    assert [e.data["transition"] for e in started] == ["start", "pause"]


def test_a_waiting_command_runs_after_the_first(engine: Engine, files):
    sid = create(engine, files).id
    with engine.hold(sid, "test", wait=False):
        waiter = threading.Thread(
            target=engine.stop, args=(sid,), kwargs={"wait": True}
        )
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()  # blocked on the sandbox, not refused
        assert engine.get(sid).state == "running"
    waiter.join(5)
    assert engine.get(sid).state == "stopped"
    with pytest.raises(InvalidTransition):
        engine.stop(sid, wait=True)


def test_a_command_id_acts_once(engine: Engine, files):
    sid = create(engine, files, command_id="create-1").id
    again = create(engine, files, sandbox_id=sid, command_id="create-1")
    assert again.id == sid

    first = engine.pause(sid, command_id="pause-1")
    version = first.version
    assert engine.pause(sid, command_id="pause-1").version == version
    assert types(engine, sid).count("transition.started") == 2
    with pytest.raises(IdempotencyError):
        engine.resume(sid, command_id="pause-1")


def test_many_sandboxes_in_parallel_get_distinct_slots(engine: Engine, files):
    ids = [f"sb-par-{i}" for i in range(8)]
    errors: list[BaseException] = []

    def make(sid: str) -> None:
        try:
            create(engine, files, sandbox_id=sid)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(sid,)) for sid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert errors == []
    slots = engine.store.network_slots("host-a")
    assert sorted(slots.values()) == sorted(ids)
    assert len(set(slots)) == len(ids)
    for sid in ids:
        engine.destroy(sid)
    assert host_objects(engine) == set()


def test_pipelines_can_be_listed_and_edited(engine: Engine, files):
    start = engine.pipelines["start"]
    assert start.names() == START_STEPS
    seen: list[str] = []
    start.insert_after(
        "vm.boot",
        Step(
            "agent.wait",
            run=lambda ctx, intent: (
                seen.append(ctx.sandbox.id) or {"facts": {"agent": "ready"}}
            ),
        ),
    )
    assert start.names()[-1] == "agent.wait"
    assert start.get("agent.wait").phase == "starting"

    sandbox = create(engine, files)
    assert seen == [sandbox.id]
    assert sandbox.facts["agent"] == "ready"

    start.remove("agent.wait")
    start.replace("vm.boot", Step("vm.boot", run=lambda ctx, intent: {"custom": True}))
    with pytest.raises(PipelineError):
        start.insert_after("no.such.step", Step("x", run=lambda c, i: {}))
    with pytest.raises(PipelineError):
        start.insert_after("vm.boot", Step("vm.create", run=lambda c, i: {}))
    assert "agent.wait" not in engine.step_names()
    assert create(engine, files).facts.get("agent") is None


def test_replay_shows_the_state_at_any_version(engine: Engine, files):
    sid = create(engine, files).id
    engine.pause(sid)
    history = engine.history(sid)
    paused_at = next(
        e.version
        for e in history
        if e.type == "transition.completed" and e.data["to_state"] == "paused"
    )

    assert engine.replay(sid, to_version=1).state == "pending"
    assert engine.replay(sid, to_version=paused_at).state == "paused"
    assert engine.replay(sid, to_version=paused_at - 1).state == "pausing"
    assert engine.replay(sid, at=history[2].recorded_at).version == 3
    assert engine.replay(sid).to_dict() == engine.get(sid).to_dict()


def test_an_unexpected_exit_halts_the_sandbox(make_engine: EngineFactory, files):
    engine = make_engine(workers=True, watch_interval_s=0.05, inactivity_interval_s=60)
    sandbox = create(engine, files)
    from wrenn_engine.host.base import VmmProcess

    engine.drivers.vmm.exit_on_its_own(VmmProcess.from_dict(sandbox.facts["vmm"]))

    halted = engine.wait(sandbox.id, "error", timeout=10)
    assert "vmm-exited" in halted.last_error
    exited = [e for e in engine.history(sandbox.id) if e.type == "vmm.exited"]
    assert exited and exited[0].metadata.actor == "system"
    assert host_objects(engine) == {f"cow:{files['run_dir']}/{sandbox.id}/rootfs.qcow2"}


def test_a_guest_poweroff_stops_the_sandbox(make_engine: EngineFactory, files):
    engine = make_engine(workers=True, watch_interval_s=0.05, inactivity_interval_s=60)
    sandbox = create(engine, files)
    monitor = sandbox.facts["event_monitor"]
    with open(monitor, "a") as f:  # the VMM writes pretty JSON, a blank line after
        f.write(
            '{\n  "timestamp": {"secs": 3, "nanos": 5},\n  "source": "vm",\n'
            '  "event": "shutdown",\n  "properties": null\n}\n\n'
        )

    stopped = engine.wait(sandbox.id, "stopped", timeout=10)
    assert stopped.facts["exit_reason"] == "guest-shutdown"
    observed = [e for e in engine.history(sandbox.id) if e.type == "vmm.event_observed"]
    assert [(e.data["source"], e.data["event"]) for e in observed] == [
        ("vm", "shutdown")
    ]
    assert observed[0].data["vmm_time_s"] == pytest.approx(3.000000005)


def test_an_idle_sandbox_is_paused_by_the_system(make_engine: EngineFactory, files):
    engine = make_engine(workers=True, inactivity_interval_s=0.05)
    sandbox = create(engine, files, inactivity_timeout_s=0.2)

    engine.wait(sandbox.id, "paused", timeout=10)

    pause = [
        e
        for e in engine.history(sandbox.id)
        if e.type == "transition.started" and e.data["transition"] == "pause"
    ]
    assert pause[0].metadata.actor == "system"


def test_wait_times_out_with_the_current_state(engine: Engine, files):
    from wrenn_engine.errors import WaitTimeout

    sid = create(engine, files, start=False).id
    with pytest.raises(WaitTimeout) as raised:
        engine.wait(sid, "running", timeout=0.2)
    assert raised.value.state == "pending"


def test_close_lets_running_commands_finish_and_refuses_new_ones(
    make_engine: EngineFactory, files
):
    engine = make_engine()
    sid = create(engine, files).id
    entered, release = threading.Event(), threading.Event()
    original = engine.drivers.vmm.pause

    def slow_pause(socket: str) -> None:
        entered.set()
        release.wait(5)
        original(socket)

    engine.drivers.vmm.pause = slow_pause  # type: ignore[method-assign]
    worker = threading.Thread(target=engine.pause, args=(sid,))
    worker.start()
    assert entered.wait(5)
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # waiting for the pause

    with pytest.raises(WrennError, match="closed"):
        engine.stop(sid)
    release.set()
    worker.join(5)
    closer.join(5)

    assert not closer.is_alive()
    reopened = make_engine()
    assert reopened.get(sid).state == "paused"


def test_a_retried_create_without_an_id_returns_the_first_sandbox(
    engine: Engine, files
):
    first = create(engine, files, command_id="req-42")
    again = create(engine, files, command_id="req-42")

    assert again.id == first.id
    assert len(engine.list()) == 1


def test_a_host_stream_is_not_a_sandbox(engine: Engine, files):
    sid = create(engine, files).id
    engine.fake_host.add("netns", "wrenn-orphan")  # type: ignore[attr-defined]
    engine.reconcile()

    with pytest.raises(SandboxNotFound):
        engine.replay("host.host-a")
    assert [s.id for s in engine.list()] == [sid]


def test_a_missing_run_directory_is_refused_before_anything_is_written(
    make_engine: EngineFactory, files, tmp_path
):
    engine = make_engine(run_dir=str(tmp_path / "no" / "such" / "dir"))

    with pytest.raises(ConfigError) as raised:
        create(engine, files)

    assert raised.value.field == "sandbox_dir"
    assert engine.list() == []
    assert engine.store.stats().events == 0
