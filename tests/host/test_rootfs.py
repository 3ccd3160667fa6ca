"""The rootfs driver on real files, real loop devices and real qemu-img.

dm-snapshot cannot run for real here (no device-mapper in this kernel), so
it is tested three ways: for real where /dev/mapper/control exists; over
real loop devices with only ``dmsetup`` recorded (``DmOverRealLoops``); and
as an exact command sequence against an in-memory kernel (``FakeKernel``).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool, unique
from wrenn_engine.errors import (
    ConfigError,
    HostCommandError,
    HostError,
    InsufficientSpace,
    ResourceBusy,
)
from wrenn_engine.host import rootfs
from wrenn_engine.host.base import RootfsAttachment, RootfsDriver, RootfsPlan
from wrenn_engine.host.paths import prepare_sandbox_dir
from wrenn_engine.host.rootfs import (
    LinuxRootfsDriver,
    LoopDevice,
    RootfsSettings,
    detect_strategy,
    list_loop_devices,
    resource_names,
    run_command,
)

MIB = 1024 * 1024
NO_DM = (
    "kernel has no device-mapper (/dev/mapper/control missing); the dmsetup "
    "command sequence is tested by test_dm_commands_*"
)


# --- fixtures and helpers ------------------------------------------------------------


def _real_loops() -> list[LoopDevice]:
    return list_loop_devices(run_command)


def _loops_under(root: Path) -> list[LoopDevice]:
    prefix = os.path.realpath(root) + "/"
    return [loop for loop in _real_loops() if loop.back_file.startswith(prefix)]


@pytest.fixture(autouse=True)
def detach_test_loops(tmp_path: Path) -> Iterator[None]:
    """Detach every loop device on a file under tmp_path, even after a failure."""
    yield
    if os.geteuid() != 0 or not _have("losetup"):
        return
    for loop in _loops_under(tmp_path):
        subprocess.run(["losetup", "-d", loop.name], check=False)
    assert _loops_under(tmp_path) == [], "a test left loop devices attached"


def _have(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


def _make_template(path: Path, size: int = 16 * MIB) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    return path


@pytest.fixture
def template(tmp_path: Path) -> Path:
    """A real, sparse 16 MiB ext4 image."""
    require_tool("mkfs.ext4")
    return _make_template(tmp_path / "template.ext4")


@pytest.fixture
def plain_template(tmp_path: Path) -> Path:
    """A 1 MiB sparse file: enough for tests whose loop devices are fake."""
    path = tmp_path / "plain.img"
    with open(path, "wb") as handle:
        handle.truncate(MIB)
    return path


def _sandbox_dir(tmp_path: Path) -> str:
    path = tmp_path / unique("sb")
    prepare_sandbox_dir(str(path))
    return str(path)


def _settings(tmp_path: Path, strategy: str, **extra: object) -> RootfsSettings:
    return RootfsSettings(
        strategy=strategy, work_dir=str(tmp_path / "work"), min_free_bytes=MIB, **extra
    )  # type: ignore[arg-type]


def _records(tmp_path: Path) -> list[str]:
    work = tmp_path / "work"
    found = []
    for sub in ("cow", "templates"):
        if (work / sub).is_dir():
            found += sorted(p.name for p in (work / sub).iterdir())
    return found


def _allocated(path: str | Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def dm_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the driver plan dm-snapshot on a kernel without device-mapper."""
    monkeypatch.setattr(rootfs, "strategy_unavailable", lambda strategy: "")


class FakeKernel:
    """A command runner that records argv and plays losetup and dmsetup
    against in-memory loop and dm tables. ``fail`` picks calls to fail."""

    def __init__(self, fail: Callable[[list[str]], bool] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.loops: dict[str, tuple[str, bool]] = {}
        self.dms: dict[str, str] = {}
        self.fail = fail or (lambda argv: False)

    def __call__(self, argv: Sequence[str]) -> str:
        args = list(argv)
        self.calls.append(args)
        if self.fail(args):
            raise HostCommandError(args, 1, "injected failure")
        if args[:3] == ["losetup", "-J", "-l"]:
            return json.dumps(
                {
                    "loopdevices": [
                        {"name": name, "back-file": back, "ro": ro, "autoclear": False}
                        for name, (back, ro) in sorted(self.loops.items())
                    ]
                }
            )
        if args[:3] == ["losetup", "--find", "--show"]:
            assert os.path.isfile(args[-1]), args
            name = next(
                f"/dev/loop{i}" for i in range(64) if f"/dev/loop{i}" not in self.loops
            )
            self.loops[name] = (args[-1], "-r" in args)
            return name + "\n"
        if args[:2] == ["losetup", "-d"]:
            if args[2] not in self.loops:
                raise HostCommandError(args, 1, "No such device or address")
            del self.loops[args[2]]
            return ""
        if args[:2] == ["dmsetup", "ls"]:
            if not self.dms:
                return "No devices found\n"
            return "".join(f"{name}\t(253:{i})\n" for i, name in enumerate(self.dms))
        if args[:2] == ["dmsetup", "create"]:
            table = args[4].split()
            assert table[3] in self.loops and table[4] in self.loops, table
            self.dms[args[2]] = args[4]
            return ""
        if args[:3] == ["dmsetup", "remove", "--retry"]:
            del self.dms[args[3]]
            return ""
        raise AssertionError(f"unexpected command {args}")


class DmOverRealLoops:
    """Real ``losetup`` (and everything else); ``dmsetup`` recorded and played
    in memory, checking that the loop devices in a table really exist."""

    def __init__(self, fail: Callable[[list[str]], bool] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.dms: dict[str, str] = {}
        self.fail = fail or (lambda argv: False)

    def __call__(self, argv: Sequence[str]) -> str:
        args = list(argv)
        self.calls.append(args)
        if self.fail(args):
            raise HostCommandError(args, 1, "injected failure")
        if args[0] != "dmsetup":
            return run_command(args)
        if args[1] == "ls":
            return "".join(f"{name}\t(253:0)\n" for name in self.dms) or (
                "No devices found\n"
            )
        if args[1] == "create":
            names = {loop.name: loop for loop in _real_loops()}
            table = args[4].split()
            assert names[table[3]].read_only and not names[table[4]].read_only
            self.dms[args[2]] = args[4]
            return ""
        if args[1] == "remove":
            del self.dms[args[-1]]
            return ""
        raise AssertionError(f"unexpected command {args}")


def _real_dm_driver(tmp_path: Path, runner: DmOverRealLoops) -> LinuxRootfsDriver:
    require_root()
    require_tool("losetup", "mkfs.ext4")
    return LinuxRootfsDriver(_settings(tmp_path, "dm-snapshot"), runner)


def _assert_nothing_left(tmp_path: Path, plan: RootfsPlan) -> None:
    assert not os.path.lexists(plan.cow_path)
    assert _records(tmp_path) == []
    if os.geteuid() == 0 and _have("losetup"):
        assert _loops_under(tmp_path) == []


# --- commands, settings, detection -------------------------------------------------


def test_run_command_returns_stdout() -> None:
    assert run_command(["sh", "-c", "echo out; echo err >&2"]) == "out\n"


def test_run_command_failure_carries_argv_code_stderr_and_cause() -> None:
    with pytest.raises(HostCommandError) as caught:
        run_command(["sh", "-c", "echo broken >&2; exit 3"])

    assert caught.value.argv == ("sh", "-c", "echo broken >&2; exit 3")
    assert caught.value.returncode == 3
    assert caught.value.stderr == "broken"
    assert isinstance(caught.value.__cause__, subprocess.CalledProcessError)


def test_run_command_missing_program() -> None:
    with pytest.raises(HostCommandError) as caught:
        run_command([unique("no-such-tool-")])

    assert caught.value.returncode == 127
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_settings_refuse_unknown_strategy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rootfs\.strategy"):
        RootfsSettings(strategy="zfs", work_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="cow_size_bytes"):
        RootfsSettings(cow_size_bytes=1000, work_dir=str(tmp_path))


def test_detect_strategy_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = tmp_path / "control"
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(rootfs, "DM_CONTROL", str(control))

    assert detect_strategy() == "copy"

    (bin_dir / "qemu-img").symlink_to("/bin/true")
    assert detect_strategy() == "qcow2"

    (bin_dir / "dmsetup").symlink_to("/bin/true")
    (bin_dir / "losetup").symlink_to("/bin/true")
    assert detect_strategy() == "qcow2"

    control.touch()  # a node alone, as libdevmapper leaves behind: not enough
    monkeypatch.setattr(rootfs, "_kernel_has_device_mapper", lambda: False)
    assert detect_strategy() == "qcow2"

    monkeypatch.setattr(rootfs, "_kernel_has_device_mapper", lambda: True)
    assert detect_strategy() == "dm-snapshot"


def test_driver_satisfies_the_contract(tmp_path: Path) -> None:
    assert isinstance(LinuxRootfsDriver(_settings(tmp_path, "copy")), RootfsDriver)


def test_plan_touches_nothing(tmp_path: Path, plain_template: Path) -> None:
    sandbox_dir = _sandbox_dir(tmp_path)
    driver = LinuxRootfsDriver(_settings(tmp_path, "qcow2"))

    plan = driver.plan("sb1", str(plain_template), sandbox_dir)

    assert plan == RootfsPlan(
        sandbox_id="sb1",
        strategy="qcow2",
        template_path=str(plain_template),
        cow_path=f"{sandbox_dir}/rootfs.cow",
        disk_path=f"{sandbox_dir}/rootfs.cow",
        image_type="Qcow2",
        backing_files=True,
    )
    assert os.listdir(sandbox_dir) == []
    assert not (tmp_path / "work").exists()


def test_plan_dm_snapshot(
    tmp_path: Path, plain_template: Path, dm_available: None
) -> None:
    driver = LinuxRootfsDriver(_settings(tmp_path, "dm-snapshot"))

    plan = driver.plan("sb1", str(plain_template), "/tmp/ch-vm-sb1")

    assert plan.dm_name == "wrenn-sb1"
    assert plan.disk_path == "/dev/mapper/wrenn-sb1"
    assert plan.image_type == "Raw" and not plan.backing_files
    assert plan.cow_size_bytes >= MIB + MIB // 64
    assert plan.cow_size_bytes % 4096 == 0


def test_plan_refuses_dm_snapshot_without_device_mapper(
    tmp_path: Path, plain_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rootfs, "DM_CONTROL", str(tmp_path / "no-control"))
    driver = LinuxRootfsDriver(_settings(tmp_path, "dm-snapshot"))

    with pytest.raises(ConfigError, match="device-mapper"):
        driver.plan("sb1", str(plain_template), "/tmp/ch-vm-sb1")


@pytest.mark.parametrize(
    ("sandbox_id", "template", "match"),
    [
        ("../x", "/x", "sandbox_id"),
        ("sb1", "relative.img", "not absolute"),
        ("sb1", "/nonexistent/template.img", "cannot be read"),
    ],
)
def test_plan_refuses_bad_input(
    tmp_path: Path, sandbox_id: str, template: str, match: str
) -> None:
    driver = LinuxRootfsDriver(_settings(tmp_path, "copy"))

    with pytest.raises(ConfigError, match=match):
        driver.plan(sandbox_id, template, "/tmp/ch-vm-sb1")


# --- qcow2 (real qemu-img) ------------------------------------------------------------


def _qemu_info(path: str) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info: dict[str, object] = json.loads(out)
    return info


@pytest.mark.host
def test_qcow2_prepare_detach_attach_remove(tmp_path: Path, template: Path) -> None:
    require_tool("qemu-img")
    driver = LinuxRootfsDriver(_settings(tmp_path, "qcow2"))
    plan = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))

    attachment = driver.prepare(plan)

    assert attachment == RootfsAttachment()
    info = _qemu_info(plan.cow_path)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(template)
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == template.stat().st_size
    assert _allocated(plan.cow_path) < MIB < template.stat().st_size
    assert os.stat(plan.cow_path).st_mode & 0o777 == 0o600
    assert driver.leftovers(resource_names(plan, attachment)) == []

    driver.detach(plan, attachment)
    assert os.path.isfile(plan.cow_path)
    assert driver.attach(plan) == RootfsAttachment()

    driver.remove(plan, attachment)
    _assert_nothing_left(tmp_path, plan)
    driver.remove(plan, attachment)


@pytest.mark.host
def test_qcow2_failing_qemu_img_leaves_no_file(tmp_path: Path, template: Path) -> None:
    require_tool("qemu-img")

    def runner(argv: Sequence[str]) -> str:
        if argv[0] == "qemu-img":
            raise HostCommandError(argv, 1, "injected failure")
        return run_command(argv)

    driver = LinuxRootfsDriver(_settings(tmp_path, "qcow2"), runner)
    plan = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))

    with pytest.raises(HostCommandError, match="injected failure"):
        driver.prepare(plan)

    _assert_nothing_left(tmp_path, plan)


# --- copy -----------------------------------------------------------------------------


@pytest.mark.host
def test_copy_prepare_remove(tmp_path: Path, template: Path) -> None:
    driver = LinuxRootfsDriver(_settings(tmp_path, "copy"))
    plan = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))

    attachment = driver.prepare(plan)

    assert (plan.image_type, plan.disk_path) == ("Raw", plan.cow_path)
    assert Path(plan.cow_path).read_bytes() == template.read_bytes()
    assert _allocated(plan.cow_path) <= _allocated(template) + 64 * 1024
    assert _allocated(plan.cow_path) < template.stat().st_size // 4
    assert driver.attach(plan) == RootfsAttachment()

    driver.remove(plan, attachment)
    _assert_nothing_left(tmp_path, plan)


def test_sparse_copy_skips_holes_and_zero_blocks(tmp_path: Path) -> None:
    source = tmp_path / "holes.img"
    with open(source, "wb") as handle:
        handle.truncate(32 * MIB)
        handle.seek(MIB)
        handle.write(b"a" * 4096)
        handle.seek(8 * MIB)
        handle.write(bytes(4 * MIB))  # allocated, but all zeros
        handle.seek(20 * MIB)
        handle.write(b"z" * (MIB + 17))
    driver = LinuxRootfsDriver(_settings(tmp_path, "copy"))
    plan = driver.plan("sb1", str(source), _sandbox_dir(tmp_path))

    driver.prepare(plan)

    assert Path(plan.cow_path).read_bytes() == source.read_bytes()
    assert _allocated(source) >= 5 * MIB
    assert _allocated(plan.cow_path) <= 3 * MIB


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _failing_close(only: str = "") -> Callable[[int], None]:
    """A close that really closes, then fails (for ``only``, or for any file)."""

    def close(fd: int) -> None:
        path = _fd_path(fd)
        os.close(fd)
        if not only or path == os.path.realpath(only):
            raise OSError(errno.EIO, "Input/output error (injected at close)")

    return close


def _failing_fsync(only: str = "") -> Callable[[int], None]:
    def fsync(fd: int) -> None:
        if not only or _fd_path(fd) == os.path.realpath(only):
            raise OSError(errno.EIO, "Input/output error (injected at fsync)")
        os.fsync(fd)

    return fsync


@pytest.mark.parametrize("seam", ["_close_fd", "_fsync_fd"])
@pytest.mark.parametrize("which", ["cow", "record"])
def test_copy_failing_close_or_fsync_leaves_no_file(
    tmp_path: Path,
    plain_template: Path,
    monkeypatch: pytest.MonkeyPatch,
    seam: str,
    which: str,
) -> None:
    driver = LinuxRootfsDriver(_settings(tmp_path, "copy"))
    plan = driver.plan("sb1", str(plain_template), _sandbox_dir(tmp_path))
    only = plan.cow_path if which == "cow" else ""
    failing = _failing_close if seam == "_close_fd" else _failing_fsync
    monkeypatch.setattr(rootfs, seam, failing(only))

    with pytest.raises(HostError, match="injected at") as caught:
        driver.prepare(plan)

    assert isinstance(caught.value.__cause__, OSError)
    _assert_nothing_left(tmp_path, plan)
    assert [p.name for p in (tmp_path / "work" / "cow").iterdir()] == []


@pytest.mark.host
def test_qcow2_failing_close_leaves_no_file(
    tmp_path: Path, template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tool("qemu-img")
    driver = LinuxRootfsDriver(_settings(tmp_path, "qcow2"))
    plan = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))
    monkeypatch.setattr(rootfs, "_close_fd", _failing_close(plan.cow_path))

    with pytest.raises(HostError, match="injected at close"):
        driver.prepare(plan)

    _assert_nothing_left(tmp_path, plan)


def test_prepare_refuses_an_existing_cow_file(
    tmp_path: Path, plain_template: Path
) -> None:
    driver = LinuxRootfsDriver(_settings(tmp_path, "copy"))
    plan = driver.plan("sb1", str(plain_template), _sandbox_dir(tmp_path))
    Path(plan.cow_path).write_bytes(b"someone's data")

    with pytest.raises(ResourceBusy, match=r"rootfs\.cow"):
        driver.prepare(plan)

    assert Path(plan.cow_path).read_bytes() == b"someone's data"
    assert _records(tmp_path) == []


def test_attach_refuses_a_missing_cow_file(
    tmp_path: Path, plain_template: Path
) -> None:
    driver = LinuxRootfsDriver(_settings(tmp_path, "copy"))
    plan = driver.plan("sb1", str(plain_template), _sandbox_dir(tmp_path))

    with pytest.raises(HostError, match="is missing"):
        driver.attach(plan)


@pytest.mark.parametrize("strategy", ["copy", "qcow2", "dm-snapshot"])
def test_insufficient_space_raises_before_writing(
    tmp_path: Path,
    plain_template: Path,
    monkeypatch: pytest.MonkeyPatch,
    dm_available: None,
    strategy: str,
) -> None:
    kernel = FakeKernel()
    driver = LinuxRootfsDriver(_settings(tmp_path, strategy), kernel)
    plan = driver.plan("sb1", str(plain_template), _sandbox_dir(tmp_path))
    probed: list[str] = []

    def free_bytes(path: str) -> int:
        probed.append(path)
        return 512 * 1024

    monkeypatch.setattr(driver, "free_bytes", free_bytes)

    with pytest.raises(InsufficientSpace) as caught:
        driver.prepare(plan)

    assert probed == [os.path.dirname(plan.cow_path)]
    assert caught.value.needed >= MIB
    assert caught.value.available == 512 * 1024
    assert kernel.calls == []
    assert os.listdir(os.path.dirname(plan.cow_path)) == []
    assert not (tmp_path / "work").exists()


# --- dm-snapshot: exact commands against an in-memory kernel --------------------------


def _dm_plan(
    tmp_path: Path, template: Path, kernel: FakeKernel, sandbox_id: str = "sb1"
) -> tuple[LinuxRootfsDriver, RootfsPlan]:
    driver = LinuxRootfsDriver(_settings(tmp_path, "dm-snapshot"), kernel)
    return driver, driver.plan(sandbox_id, str(template), _sandbox_dir(tmp_path))


def test_dm_commands_prepare_detach_remove(
    tmp_path: Path, plain_template: Path, dm_available: None
) -> None:
    kernel = FakeKernel()
    driver, plan = _dm_plan(tmp_path, plain_template, kernel)
    template = os.path.realpath(plain_template)
    cow = os.path.realpath(plan.cow_path)
    table = "0 2048 snapshot /dev/loop0 /dev/loop1 P 8"

    attachment = driver.prepare(plan)

    assert attachment == RootfsAttachment("/dev/loop0", "/dev/loop1", "wrenn-sb1")
    assert kernel.calls == [
        ["losetup", "-J", "-l"],
        ["losetup", "--find", "--show", "-r", template],
        ["losetup", "--find", "--show", cow],
        ["dmsetup", "create", "wrenn-sb1", "--table", table],
    ]
    assert os.stat(plan.cow_path).st_size == plan.cow_size_bytes
    assert _allocated(plan.cow_path) == 0

    kernel.calls.clear()
    driver.detach(plan, attachment)

    assert kernel.calls == [
        ["dmsetup", "ls"],
        ["dmsetup", "remove", "--retry", "wrenn-sb1"],
        ["losetup", "-J", "-l"],
        ["losetup", "-d", "/dev/loop1"],
        ["losetup", "-J", "-l"],
        ["losetup", "-d", "/dev/loop0"],
        ["losetup", "-J", "-l"],
    ]
    assert kernel.loops == {} and kernel.dms == {}
    assert os.path.isfile(plan.cow_path)

    kernel.calls.clear()
    assert driver.attach(plan) == attachment
    assert kernel.calls[-1] == ["dmsetup", "create", "wrenn-sb1", "--table", table]

    kernel.calls.clear()
    driver.remove(plan, attachment)

    assert [call[:2] for call in kernel.calls] == [
        ["dmsetup", "ls"],
        ["dmsetup", "remove"],
        ["losetup", "-J"],
        ["losetup", "-d"],
        ["losetup", "-J"],
        ["losetup", "-d"],
        ["losetup", "-J"],
    ]
    _assert_nothing_left(tmp_path, plan)

    kernel.calls.clear()
    driver.remove(plan, attachment)
    assert kernel.calls == [
        ["dmsetup", "ls"],
        ["losetup", "-J", "-l"],
        ["losetup", "-J", "-l"],
        ["losetup", "-J", "-l"],
    ]


def test_dm_commands_undo_when_dmsetup_create_fails(
    tmp_path: Path, plain_template: Path, dm_available: None
) -> None:
    kernel = FakeKernel(fail=lambda argv: argv[:2] == ["dmsetup", "create"])
    driver, plan = _dm_plan(tmp_path, plain_template, kernel)

    with pytest.raises(HostCommandError, match="injected failure"):
        driver.prepare(plan)

    assert kernel.calls[4:] == [
        ["losetup", "-d", "/dev/loop1"],
        ["losetup", "-J", "-l"],
        ["losetup", "-d", "/dev/loop0"],
    ]
    assert kernel.loops == {} and kernel.dms == {}
    _assert_nothing_left(tmp_path, plan)


@pytest.mark.parametrize("failing", [0, 1, 2, 3])
def test_dm_commands_failure_at_each_step_leaves_nothing(
    tmp_path: Path, plain_template: Path, dm_available: None, failing: int
) -> None:
    seen: list[int] = []

    def fail(argv: list[str]) -> bool:
        seen.append(1)
        return len(seen) - 1 == failing

    kernel = FakeKernel(fail=fail)
    driver, plan = _dm_plan(tmp_path, plain_template, kernel)

    with pytest.raises(HostCommandError):
        driver.prepare(plan)

    assert kernel.loops == {} and kernel.dms == {}
    _assert_nothing_left(tmp_path, plan)


def test_dm_commands_failing_close_leaves_no_cow_file(
    tmp_path: Path,
    plain_template: Path,
    dm_available: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernel = FakeKernel()
    driver, plan = _dm_plan(tmp_path, plain_template, kernel)
    monkeypatch.setattr(rootfs, "_close_fd", _failing_close(plan.cow_path))

    with pytest.raises(HostError, match="injected at close"):
        driver.prepare(plan)

    assert kernel.calls == []
    _assert_nothing_left(tmp_path, plan)


def test_dm_commands_two_sandboxes_share_the_template_loop(
    tmp_path: Path, plain_template: Path, dm_available: None
) -> None:
    kernel = FakeKernel()
    driver, first = _dm_plan(tmp_path, plain_template, kernel, "sb1")
    second = driver.plan("sb2", str(plain_template), _sandbox_dir(tmp_path))

    a = driver.prepare(first)
    kernel.calls.clear()
    b = driver.prepare(second)

    assert a.template_loop == b.template_loop == "/dev/loop0"
    assert [
        "losetup",
        "--find",
        "--show",
        "-r",
        os.path.realpath(plain_template),
    ] not in kernel.calls

    driver.detach(first, a)
    assert set(kernel.loops) == {"/dev/loop0", b.cow_loop}
    driver.detach(second, b)
    assert kernel.loops == {}


# --- dm-snapshot over real loop devices (dmsetup recorded) ----------------------------


@pytest.mark.host
def test_dm_over_real_loops_prepare_detach_attach_remove(
    tmp_path: Path, template: Path, dm_available: None
) -> None:
    runner = DmOverRealLoops()
    driver = _real_dm_driver(tmp_path, runner)
    plan = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))

    attachment = driver.prepare(plan)

    loops = {loop.name: loop for loop in _loops_under(tmp_path)}
    assert set(loops) == {attachment.template_loop, attachment.cow_loop}
    assert loops[attachment.template_loop].read_only
    assert loops[attachment.template_loop].back_file == os.path.realpath(template)
    assert not loops[attachment.cow_loop].read_only
    assert loops[attachment.cow_loop].back_file == os.path.realpath(plan.cow_path)
    assert os.stat(plan.cow_path).st_size == plan.cow_size_bytes
    assert _allocated(plan.cow_path) < 64 * 1024
    sectors = template.stat().st_size // 512
    assert runner.dms == {
        plan.dm_name: (
            f"0 {sectors} snapshot {attachment.template_loop} {attachment.cow_loop} P 8"
        )
    }

    driver.detach(plan, attachment)

    assert _loops_under(tmp_path) == []
    assert runner.dms == {}
    assert os.path.isfile(plan.cow_path)

    again = driver.attach(plan)
    assert {loop.name for loop in _loops_under(tmp_path)} == {
        again.template_loop,
        again.cow_loop,
    }

    driver.remove(plan, again)
    _assert_nothing_left(tmp_path, plan)
    assert runner.dms == {}


@pytest.mark.host
def test_dm_over_real_loops_refcount_is_shared_and_survives_a_restart(
    tmp_path: Path, template: Path, dm_available: None
) -> None:
    runner = DmOverRealLoops()
    driver = _real_dm_driver(tmp_path, runner)
    first = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))
    second = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))

    a = driver.prepare(first)
    restarted = LinuxRootfsDriver(driver.settings, runner)
    b = restarted.prepare(second)

    assert a.template_loop == b.template_loop
    template_loops = [
        loop
        for loop in _loops_under(tmp_path)
        if loop.back_file == os.path.realpath(template)
    ]
    assert [loop.name for loop in template_loops] == [a.template_loop]

    restarted.detach(first, a)
    assert {loop.name for loop in _loops_under(tmp_path)} == {
        a.template_loop,
        b.cow_loop,
    }

    LinuxRootfsDriver(driver.settings, runner).detach(second, b)
    assert _loops_under(tmp_path) == []

    driver.remove(first, a)
    driver.remove(second, b)
    _assert_nothing_left(tmp_path, first)


@pytest.mark.host
def test_dm_over_real_loops_concurrent_prepares_share_one_template_loop(
    tmp_path: Path, template: Path, dm_available: None
) -> None:
    runner = DmOverRealLoops()
    driver = _real_dm_driver(tmp_path, runner)
    plans = [
        driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))
        for _ in range(4)
    ]
    results: dict[str, RootfsAttachment] = {}
    errors: list[BaseException] = []

    def prepare(plan: RootfsPlan) -> None:
        try:
            results[plan.sandbox_id] = LinuxRootfsDriver(
                driver.settings, runner
            ).prepare(plan)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=prepare, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len({a.template_loop for a in results.values()}) == 1
    assert len(_loops_under(tmp_path)) == 1 + len(plans)

    for plan in plans:
        driver.remove(plan, results[plan.sandbox_id])
    assert _loops_under(tmp_path) == []
    assert _records(tmp_path) == []


@pytest.mark.host
@pytest.mark.parametrize("step", ["template-loop", "cow-loop", "dmsetup-create"])
def test_dm_over_real_loops_failure_at_each_command_leaves_nothing(
    tmp_path: Path, template: Path, dm_available: None, step: str
) -> None:
    def fail(argv: list[str]) -> bool:
        if step == "template-loop":
            return "-r" in argv
        if step == "cow-loop":
            return argv[:3] == ["losetup", "--find", "--show"] and "-r" not in argv
        return argv[:2] == ["dmsetup", "create"]

    runner = DmOverRealLoops(fail)
    driver = _real_dm_driver(tmp_path, runner)
    plan = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))

    with pytest.raises(HostCommandError, match="injected failure"):
        driver.prepare(plan)

    _assert_nothing_left(tmp_path, plan)


@pytest.mark.host
def test_dm_over_real_loops_failure_keeps_a_shared_template_loop(
    tmp_path: Path, template: Path, dm_available: None
) -> None:
    runner = DmOverRealLoops()
    driver = _real_dm_driver(tmp_path, runner)
    first = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))
    second = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))
    a = driver.prepare(first)
    runner.fail = lambda argv: argv[:2] == ["dmsetup", "create"]

    with pytest.raises(HostCommandError):
        driver.prepare(second)

    assert not os.path.exists(second.cow_path)
    assert {loop.name for loop in _loops_under(tmp_path)} == {
        a.template_loop,
        a.cow_loop,
    }

    runner.fail = lambda argv: False
    driver.remove(first, a)
    _assert_nothing_left(tmp_path, first)


@pytest.mark.host
def test_template_loop_is_read_only_and_detached_at_zero(
    tmp_path: Path, template: Path, dm_available: None
) -> None:
    runner = DmOverRealLoops()
    driver = _real_dm_driver(tmp_path, runner)
    plan = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))
    before = template.read_bytes()
    attachment = driver.prepare(plan)

    with open(attachment.template_loop, "rb") as device:
        assert device.read(4096) == template.read_bytes()[:4096]
    fd = os.open(attachment.template_loop, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as caught:
            os.write(fd, bytes(512))
    finally:
        os.close(fd)
    assert caught.value.errno in (errno.EPERM, errno.EROFS)

    driver.detach(plan, attachment)
    assert os.path.realpath(template) not in {loop.back_file for loop in _real_loops()}
    driver.remove(plan, attachment)
    assert template.read_bytes() == before


# --- leftovers ------------------------------------------------------------------------


@pytest.mark.host
def test_leftovers_over_real_loops(
    tmp_path: Path, template: Path, dm_available: None
) -> None:
    runner = DmOverRealLoops()
    driver = _real_dm_driver(tmp_path, runner)
    kept = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))
    lost = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))
    kept_attachment = driver.prepare(kept)
    lost_attachment = driver.prepare(lost)
    foreign_file = tmp_path / "foreign.img"
    foreign_file.write_bytes(bytes(MIB))
    foreign = run_command(["losetup", "--find", "--show", str(foreign_file)]).strip()
    known = resource_names(kept, kept_attachment)

    found = driver.leftovers(known)

    assert found == [
        ("dm", lost.dm_name),
        ("loop", lost_attachment.cow_loop),
        ("cow", lost.cow_path),
    ]
    with pytest.raises(HostError, match="not made by this engine"):
        driver.remove_leftover("loop", foreign)
    with pytest.raises(ResourceBusy):
        driver.remove_leftover("loop", kept_attachment.template_loop)
    with pytest.raises(ResourceBusy):
        driver.remove_leftover("cow", lost.cow_path)

    for kind, name in found:
        driver.remove_leftover(kind, name)
        driver.remove_leftover(kind, name)

    assert driver.leftovers(known) == []
    assert not os.path.exists(lost.cow_path)
    assert {loop.name for loop in _loops_under(tmp_path)} == {
        kept_attachment.template_loop,
        kept_attachment.cow_loop,
        foreign,
    }
    assert set(driver.leftovers(set())) == {
        ("dm", kept.dm_name),
        ("loop", kept_attachment.cow_loop),
        ("loop", kept_attachment.template_loop),
        ("cow", kept.cow_path),
    }

    driver.remove(kept, kept_attachment)
    run_command(["losetup", "-d", foreign])
    _assert_nothing_left(tmp_path, kept)


@pytest.mark.host
def test_leftover_template_loop_after_a_crash(
    tmp_path: Path, template: Path, dm_available: None
) -> None:
    runner = DmOverRealLoops()
    driver = _real_dm_driver(tmp_path, runner)
    plan = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))
    attachment = driver.prepare(plan)
    runner.dms.clear()
    run_command(["losetup", "-d", attachment.cow_loop])

    found = driver.leftovers({f"cow:{plan.cow_path}"})

    assert found == [("loop", attachment.template_loop)]
    driver.remove_leftover("loop", attachment.template_loop)
    assert _loops_under(tmp_path) == []
    driver.remove(plan, attachment)
    _assert_nothing_left(tmp_path, plan)


def test_leftover_cow_files_of_qcow2_and_copy(
    tmp_path: Path, plain_template: Path
) -> None:
    driver = LinuxRootfsDriver(_settings(tmp_path, "copy"))
    plan = driver.plan("sb1", str(plain_template), _sandbox_dir(tmp_path))
    driver.prepare(plan)

    assert driver.leftovers({f"cow:{plan.cow_path}"}) == []
    assert driver.leftovers(set()) == [("cow", plan.cow_path)]

    driver.remove_leftover("cow", plan.cow_path)

    _assert_nothing_left(tmp_path, plan)
    assert driver.leftovers(set()) == []


# --- dm-snapshot for real (needs device-mapper) ---------------------------------------


@pytest.mark.host
def test_dm_snapshot_for_real(tmp_path: Path, template: Path) -> None:
    if rootfs.strategy_unavailable("dm-snapshot"):
        pytest.skip(NO_DM)
    require_root()
    require_tool("losetup", "dmsetup", "mkfs.ext4")
    driver = LinuxRootfsDriver(
        _settings(tmp_path, "dm-snapshot", dm_prefix=unique("wt") + "-")
    )
    first = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))
    second = driver.plan(unique("sb"), str(template), _sandbox_dir(tmp_path))
    a = b = RootfsAttachment()
    try:
        a = driver.prepare(first)
        b = driver.prepare(second)

        assert os.path.exists(first.disk_path)
        assert a.template_loop == b.template_loop
        with open(first.disk_path, "r+b") as disk:
            disk.write(b"changed")
        assert template.read_bytes()[:7] != b"changed"
        assert _allocated(first.cow_path) < 4 * MIB

        driver.detach(first, a)
        assert not os.path.exists(first.disk_path)
        assert a.template_loop in {loop.name for loop in _loops_under(tmp_path)}
        a = driver.attach(first)
        with open(first.disk_path, "rb") as disk:
            assert disk.read(7) == b"changed"
    finally:
        driver.remove(first, a)
        driver.remove(second, b)

    _assert_nothing_left(tmp_path, first)
    assert driver.leftovers(set()) == []
