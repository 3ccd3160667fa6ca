"""Regressions for what an adversarial review found: data the engine did not
create is never removed, a failed command never loses the disk or the
snapshot, and hostile input is refused before anything is written."""

from __future__ import annotations

import math
import os

import pytest

from tests.lifecycle.conftest import EngineFactory, create, host_objects
from wrenn_engine.domain.config import VMConfig
from wrenn_engine.engine import Engine
from wrenn_engine.errors import CommandFailed, ConfigError, IdempotencyError
from wrenn_engine.host.fake import FakeHost


def test_destroy_never_removes_a_directory_the_engine_did_not_create(
    engine: Engine, files
):
    precious = os.path.join(files["run_dir"], "precious")
    os.mkdir(precious, 0o700)
    with open(os.path.join(precious, "data.txt"), "w") as f:
        f.write("someone's data")

    create(engine, files, sandbox_id="precious", start=False)
    with pytest.raises(CommandFailed) as raised:
        engine.start("precious")
    assert "did not create it" in raised.value.cause
    engine.destroy("precious")

    assert os.path.exists(os.path.join(precious, "data.txt"))


@pytest.mark.parametrize("failing", ["vmm.launch", "vm.boot"])
def test_a_failed_start_of_a_stopped_sandbox_keeps_its_disk(
    engine: Engine, files, failing
):
    sid = create(engine, files).id
    engine.stop(sid)
    cow = engine.get(sid).facts["rootfs"]["cow_path"]

    engine.failpoints.arm(failing, "error")
    with pytest.raises(CommandFailed):
        engine.start(sid)
    engine.failpoints.disarm()

    stopped = engine.get(sid)
    assert stopped.state == "stopped"
    assert stopped.facts["rootfs"]["cow_path"] == cow
    assert f"cow:{cow}" in host_objects(engine)
    assert engine.start(sid).state == "running"
    assert f"cow:{cow}" in host_objects(engine)


@pytest.mark.parametrize("failing", ["rootfs.attach.done", "vmm.launch", "vm.resume"])
def test_a_failed_resume_can_be_resumed_again(engine: Engine, files, failing):
    sid = create(engine, files).id
    engine.pause(sid)

    engine.failpoints.arm(failing, "error")
    with pytest.raises(CommandFailed):
        engine.resume(sid)
    engine.failpoints.disarm()

    assert engine.get(sid).state == "paused"
    assert engine.resume(sid).state == "running"


def test_reconcile_elsewhere_leaves_a_vmm_being_launched_alone(
    make_engine: EngineFactory, files
):
    host = FakeHost()
    first = make_engine(host=host)
    second = make_engine(host=host)
    launch = first.pipelines["start"].get("vmm.launch")
    actions: list[str] = []

    def launch_then_reconcile_elsewhere(ctx, intent):  # type: ignore[no-untyped-def]
        result = launch.run(ctx, intent)
        actions.extend(second.reconcile())
        return result

    first.pipelines["start"].replace(
        "vmm.launch",
        launch.__class__(
            "vmm.launch", launch_then_reconcile_elsewhere, launch.undo, launch.plan
        ),
    )

    assert create(first, files).state == "running"
    assert not any("vmm" in line for line in actions), actions


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sandbox_id": "abc\n"}, "sandbox_id"),
        ({"template_id": "base\n"}, "template_id"),
        ({"inactivity_timeout_s": math.nan}, "inactivity_timeout_s"),
        ({"inactivity_timeout_s": math.inf}, "inactivity_timeout_s"),
        ({"actor": "al\x00ice"}, "actor"),
        ({"actor": ""}, "actor"),
        ({"actor": "\udc80"}, "actor"),
        ({"command_id": "req\n1"}, "command_id"),
        ({"labels": {"team": "a\x00b"}}, "labels[team]"),
        ({"labels": {"team": 1}}, "labels[team]"),
        ({"config": VMConfig(init_path="/sbin/init quiet=0")}, "init_path"),
    ],
)
def test_hostile_input_is_refused_and_leaves_nothing(
    engine: Engine, files, kwargs, field
):
    with pytest.raises(ConfigError) as raised:
        create(engine, files, **kwargs)

    assert raised.value.field == field
    assert engine.store.stats().events == 0
    assert os.listdir(files["run_dir"]) == []


def test_a_command_id_reused_for_another_create_is_refused(engine: Engine, files):
    create(engine, files, command_id="req-7", vcpus=1)

    with pytest.raises(IdempotencyError):
        create(engine, files, command_id="req-7", vcpus=8)
    assert len(engine.list()) == 1


def test_a_repeated_command_answers_with_where_the_first_ended(engine: Engine, files):
    import threading

    sid = create(engine, files).id
    results: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                engine.pause(sid, command_id="p-1", wait=True).state
            )
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    assert results == ["paused"] * 4


def test_a_failpoint_that_names_no_step_is_refused(make_engine: EngineFactory):
    with pytest.raises(ConfigError) as raised:
        make_engine(failpoints={"nosuch.step": "error"})
    assert "names no step" in str(raised.value)
