"""wrenn-ch-simulator: a stand-in for cloud-hypervisor at its REST API.

cloud-hypervisor cannot be installed on the project's machines, so the
engine's VMM code is exercised against this program. It takes the command
line the engine passes to cloud-hypervisor, serves the same REST API on the
unix socket and touches the host the way the real VMM does where a test can
see it (TAP device, disk images, snapshot files, event monitor, log). It runs
no guest: "booting" opens the devices and flips a state.

It imports only the standard library, because it sits on the create path:
the engine runs it with ``python -I -S`` (no ``site``, no package import),
importing this file as the top-level module ``simulator`` so that its cached
bytecode is used (``launcher.simulator_program``). It also runs as a script
(``python simulator.py``), as the ``wrenn-ch-simulator`` console script and
with ``python -m``. Of its start-up, about 8 ms of CPU is the interpreter
and 12 ms the imports, most of that ``json`` (with ``re``, ``enum`` and
``collections``), which the first answer needs.

Command line (the options the engine uses; anything else is refused)::

    --api-socket path=<socket> | fd=<n> | <socket>
    --event-monitor path=<file> | fd=<n>
    --log-file <file>          (standard error when absent)
    -v, -vv                    (warnings only by default, as upstream)
    --restore source_url=file://<dir>[,prefault=on|off]
              [,memory_restore_mode=copy|ondemand][,resume=true|false]
    --no-shutdown              (a guest power-off keeps the VMM running)
    --seccomp <value>          (accepted and ignored)
    -V, --version
    --sim-ignore-shutdown      (test control, see below)

Statuses. The OpenAPI document lists 404 and 405 for several actions, but
the upstream HTTP layer (``vmm/src/api/http``) answers 400 for a body it
cannot deserialize, a missing or unexpected body and a wrong method; 404 for
an unknown path and for the two "no VM config" errors (VM not created, VM
missing config); and 500 for every other API error (read from upstream's
source; no binary was at hand to confirm it). The simulator follows
upstream, which keeps the document's codes where the two agree:

==================================  ======  ==================================
request                             status  why
==================================  ======  ==================================
vm.info, no VM created              404     VM not created (documented)
vm.boot, no VM created              404     VM missing config (documented)
vm.reboot, VM not booted            404     VM not created (documented)
vm.create, a VM exists              500     VM already created
vm.boot, VM running or paused       500     invalid state transition
vm.pause, VM not booted             500     VM not running (not 404/405)
vm.pause, VM paused                 500     invalid state transition
vm.resume, VM not paused            500     VM not running / invalid state
vm.snapshot, VM not paused          500     snapshot needs a paused VM
vm.snapshot, directory missing      500     cannot write the snapshot
vm.restore, a VM exists             500     VM already created (not 404)
vm.restore, bad snapshot            500     restore failed
vm.shutdown, VM not booted          500     VM not running (not 404/405)
vm.counters, VM not booted          500     VM not running
vm.boot, TAP/disk/kernel unusable   500     device creation failed
vm.delete, no VM                    204     nothing to delete
malformed or wrongly typed body     400     deserialization failed
unknown endpoint                    404     not found
wrong method, stray body            400     bad request
==================================  ======  ==================================

Endpoints the engine does not use (resize, add-*, remove-device, migration,
coredump, nmi) are not simulated and answer 404 like an unknown path.

Error bodies are upstream's shape: a JSON array of messages, outermost
first, with ``Content-Type: application/json``.

States and preconditions follow upstream's VMM: ``vm.create`` only stores
the config; ``vm.boot`` opens the devices and makes the VM ``Running``;
pause needs ``Running``, resume and snapshot need ``Paused``; restore needs
no VM config at all. ``vm.shutdown`` drops the running VM (closing its
devices) and keeps the config, so ``vm.info`` then reports ``Created`` and
``vm.boot`` works again, as upstream does; ``Shutdown`` is never reported.
``vm.shutdown`` and ``vmm.shutdown`` work on a paused VM. ``vmm.shutdown``
deletes the VM, answers 204 and exits 0. The socket file stays behind when
the process exits, as upstream's does; the engine removes it.

Devices, on ``vm.boot`` and on restore, as upstream opens them:

- ``payload.kernel`` (and firmware, initramfs) must be readable; the image
  is not parsed.
- every ``disks[].path`` is opened read-write (read-only when ``readonly``)
  and locked (a shared lock for read-only, exclusive otherwise), so a disk
  used by another VMM fails; ``image_type`` Qcow2 (or an image with the
  qcow2 magic when no type is given) has its header checked, and a backing
  file is refused unless ``backing_files`` is true, then opened read-only.
- every ``net[].tap`` is attached with ``TUNSETIFF`` (``IFF_TAP |
  IFF_NO_PI | IFF_VNET_HDR``, multi-queue when ``num_queues`` > 2) on
  ``/dev/net/tun`` in the current network namespace. Deviation: upstream,
  when it may, *creates* a TAP that does not exist; the simulator refuses,
  because the engine always makes the TAP itself and a missing one means
  the network step did not happen. A ``net`` entry without ``tap`` is
  refused for the same reason.
- a ``serial``/``console`` in ``File`` mode gets its file created.

Everything stays open while the VM exists (``/proc/<pid>/fd`` shows
``/dev/net/tun`` and the disks) and is closed on shutdown and delete.

Snapshots: ``vm.snapshot`` (``destination_url`` ``file://<dir>``, the
directory must exist) writes ``config.json`` (the VM config), ``state.json``
(the simulator's VM state and memory ranges) and ``memory-ranges`` (a sparse
file of the guest memory size). Restore reads all three back, opens the
devices again and leaves the VM ``Paused`` unless ``resume`` is true.

Events go to the ``--event-monitor`` file in upstream's format: one
pretty-printed JSON object per event (``timestamp`` {``secs``, ``nanos``}
since start, ``source``, ``event``, ``properties`` or null), each followed by
a blank line. Emitted: vmm starting/shutdown; vm booting/booted,
pausing/paused, resuming/resumed, snapshotting/snapshotted,
restoring/restored, rebooting/rebooted, shutdown, deleted; guest panic.

Signals and test controls:

- SIGTERM, SIGINT: shut down like upstream (VM shut down and deleted,
  ``vmm shutdown`` event), exit 0.
- SIGUSR1 (or ``vm.power-button``): the guest powers off. Upstream then
  shuts the VMM down: events vm shutdown, vm deleted, vmm shutdown, exit 0.
  With ``--no-shutdown`` the VMM stays and the VM is back to ``Created``.
- SIGUSR2: the guest panics: a ``guest panic`` event, then the process exits
  1 as if the VMM died. (Upstream with pvpanic and ``panic=1 reboot=k``
  would reboot the guest instead; this control models a crash.)
- ``--sim-ignore-shutdown``: SIGTERM and SIGINT are ignored and
  ``vm.shutdown``/``vmm.shutdown`` are never answered, to test the engine's
  escalation to SIGKILL.

Like upstream it takes a lock on ``<socket>.lock`` and refuses to start when
another process holds it, then removes any stale file at the socket path.

Not simulated: guest memory (nothing is allocated), kernel parsing,
vhost-user devices, hot-plug, resize, migration, and the ``Shutdown`` state
(upstream drops the VM on shutdown, so it is not seen over the API either).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time

# Not ``typing.TYPE_CHECKING``: importing typing would slow the start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    JsonObject = dict[str, Any]

API_ROOT = "/api/v1"
VERSION = "54.0.0"
BUILD_VERSION = "wrenn-ch-simulator"
SNAPSHOT_FILES = ("config.json", "state.json", "memory-ranges")

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFNAMSIZ = 16
QCOW2_MAGIC = b"QFI\xfb"
MAX_BACKING_DEPTH = 8

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024
SEND_TIMEOUT_S = 5.0

IMAGE_TYPES = ("FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown")
CONSOLE_MODES = ("Off", "Pty", "Tty", "File", "Socket", "Null")
RESTORE_MODES = {"copy": "Copy", "ondemand": "OnDemand"}

REASONS = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    500: "Internal Server Error",
}


class ApiError(Exception):
    """An API failure: its HTTP status and the error chain, outermost first."""

    def __init__(self, status: int, *messages: str) -> None:
        super().__init__(": ".join(messages))
        self.status = status
        self.messages = list(messages)


class UsageError(Exception):
    """A command-line problem; the process exits 2 like a clap error."""


class StartupError(Exception):
    """The VMM cannot start (socket in use, file not writable)."""


def bad_request(detail: str) -> ApiError:
    return ApiError(400, "Failed to deserialize JSON", detail)


def failed(action: str, reason: str) -> ApiError:
    return ApiError(500, "Error from API", f"The VM could not {action}", reason)


def not_created(action: str) -> ApiError:
    return ApiError(
        404, "Error from API", f"The VM could not {action}", "VM is not created"
    )


# --- command line -----------------------------------------------------------------


class Options:
    """The parsed command line."""

    def __init__(self) -> None:
        self.api_socket: str | None = None
        self.api_fd: int | None = None
        self.event_path: str | None = None
        self.event_fd: int | None = None
        self.log_file: str | None = None
        self.verbosity = 0
        self.restore: JsonObject | None = None
        self.no_shutdown = False
        self.ignore_shutdown = False
        self.version = False


def parse_option_list(text: str) -> dict[str, str]:
    """``a=1,b=2`` as a dict; a bare value is returned under the key ``""``."""
    values: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep:
            values[key.strip()] = value
        elif part:
            values[""] = part
    return values


def _flag(value: str, option: str) -> bool:
    lowered = value.lower()
    if lowered in ("on", "true"):
        return True
    if lowered in ("off", "false"):
        return False
    raise UsageError(f"{option}: {value!r} is not on/off/true/false")


def parse_restore(text: str) -> JsonObject:
    """``--restore`` as a RestoreConfig dict."""
    values = parse_option_list(text)
    unknown = sorted(
        set(values) - {"source_url", "prefault", "memory_restore_mode", "resume"}
    )
    if unknown or "source_url" not in values:
        raise UsageError(
            "--restore: expected source_url=file://<dir>[,prefault=on|off]"
            "[,memory_restore_mode=copy|ondemand][,resume=true|false]"
        )
    config: JsonObject = {"source_url": values["source_url"]}
    if "prefault" in values:
        config["prefault"] = _flag(values["prefault"], "prefault")
    if "resume" in values:
        config["resume"] = _flag(values["resume"], "resume")
    if "memory_restore_mode" in values:
        mode = RESTORE_MODES.get(values["memory_restore_mode"].lower())
        if mode is None:
            raise UsageError("--restore: memory_restore_mode is copy or ondemand")
        config["memory_restore_mode"] = mode
    return config


def parse_args(argv: list[str]) -> Options:
    options = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--"):
            name, sep, inline = arg.partition("=")
        else:
            name, sep, inline = arg, "", ""

        def value(name: str = name, sep: str = sep, inline: str = inline) -> str:
            if sep:
                return inline
            if not args:
                raise UsageError(f"{name} needs a value")
            return args.pop(0)

        if name == "--api-socket":
            parsed = parse_option_list(value())
            if "fd" in parsed:
                options.api_fd = int(parsed["fd"])
            else:
                options.api_socket = parsed.get("path") or parsed.get("")
        elif name == "--event-monitor":
            parsed = parse_option_list(value())
            if "fd" in parsed:
                options.event_fd = int(parsed["fd"])
            elif "path" in parsed:
                options.event_path = parsed["path"]
            else:
                raise UsageError("--event-monitor: path or fd required")
        elif name == "--log-file":
            options.log_file = value()
        elif name == "--restore":
            options.restore = parse_restore(value())
        elif name == "--no-shutdown":
            options.no_shutdown = True
        elif name == "--seccomp":
            value()
        elif name == "--sim-ignore-shutdown":
            options.ignore_shutdown = True
        elif name in ("-V", "--version"):
            options.version = True
        elif arg.startswith("-v") and set(arg[1:]) == {"v"}:
            options.verbosity += len(arg) - 1
        else:
            raise UsageError(
                f"{arg!r} is not an option the simulator knows; it takes the VM "
                "config over the API (vm.create), like the engine uses it"
            )
    if not options.version and options.api_socket is None and options.api_fd is None:
        raise UsageError("--api-socket path=<socket> is required")
    return options


# --- log and events -------------------------------------------------------------


class Log:
    """Upstream-style log lines: elapsed seconds, thread, level, message."""

    LEVELS = {"ERROR": 0, "WARN": 0, "INFO": 1, "DEBUG": 2}

    def __init__(self, fd: int, verbosity: int, start: float) -> None:
        self.fd = fd
        self.verbosity = verbosity
        self.start = start

    def write(self, level: str, message: str) -> None:
        if self.LEVELS[level] > self.verbosity:
            return
        elapsed = time.monotonic() - self.start
        line = f"{BUILD_VERSION}: {elapsed:>10.6f}s: <vmm> {level} -- {message}\n"
        with contextlib.suppress(OSError):
            os.write(self.fd, line.encode())

    def info(self, message: str) -> None:
        self.write("INFO", message)

    def warn(self, message: str) -> None:
        self.write("WARN", message)

    def error(self, message: str) -> None:
        self.write("ERROR", message)


class EventWriter:
    """Writes lifecycle events to the event-monitor file, as upstream does."""

    def __init__(self, fd: int | None, start: float) -> None:
        self.fd = fd
        self.start = start

    def emit(
        self, source: str, event: str, properties: dict[str, str] | None = None
    ) -> None:
        if self.fd is None:
            return
        elapsed = time.monotonic() - self.start
        secs = int(elapsed)
        record = {
            "timestamp": {"secs": secs, "nanos": int((elapsed - secs) * 1e9)},
            "source": source,
            "event": event,
            "properties": properties,
        }
        data = json.dumps(record, indent=2).encode() + b"\n\n"
        with contextlib.suppress(OSError):
            os.write(self.fd, data)


# --- config checks ----------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(
    obj: object, where: str, types: dict[str, str], required: tuple[str, ...] = ()
) -> JsonObject:
    """Type-check ``obj`` the way serde would: a wrong type fails with 400."""
    if not isinstance(obj, dict):
        raise bad_request(f"{where}: expected an object")
    for name in required:
        if name not in obj:
            raise bad_request(f"{where}: missing field `{name}`")
    for name, kind in types.items():
        if name not in obj:
            continue
        value = obj[name]
        ok = {
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "uint": _is_int(value) and value >= 0,
        }[kind]
        if not ok:
            raise bad_request(f"{where}.{name}: expected {kind}, got {value!r}")
    return obj


def _check_enum(
    obj: JsonObject, name: str, allowed: tuple[str, ...], where: str
) -> None:
    if name in obj and obj[name] not in allowed:
        raise bad_request(
            f"{where}.{name}: unknown variant {obj[name]!r}, "
            f"expected one of {', '.join(allowed)}"
        )


def check_vm_config(config: object) -> JsonObject:
    """The parts of a VmConfig the simulator uses, type-checked (400 if not)."""
    config = _check_fields(config, "VmConfig", {}, required=("payload",))
    _check_fields(
        config["payload"],
        "payload",
        {
            k: "str"
            for k in ("kernel", "cmdline", "firmware", "initramfs", "igvm", "host_data")
        },
    )
    if "cpus" in config:
        _check_fields(
            config["cpus"],
            "cpus",
            {"boot_vcpus": "uint", "max_vcpus": "uint"},
            required=("boot_vcpus", "max_vcpus"),
        )
    if "memory" in config:
        _check_fields(config["memory"], "memory", {"size": "uint"}, required=("size",))
    for key in ("disks", "net"):
        if key in config and not isinstance(config[key], list):
            raise bad_request(f"{key}: expected an array")
    for i, disk in enumerate(config.get("disks") or []):
        where = f"disks[{i}]"
        _check_fields(
            disk,
            where,
            {
                "path": "str",
                "readonly": "bool",
                "direct": "bool",
                "backing_files": "bool",
                "num_queues": "uint",
                "id": "str",
            },
        )
        _check_enum(disk, "image_type", IMAGE_TYPES, where)
    for i, net in enumerate(config.get("net") or []):
        _check_fields(
            net,
            f"net[{i}]",
            {
                "tap": "str",
                "mac": "str",
                "ip": "str",
                "mask": "str",
                "num_queues": "uint",
                "id": "str",
            },
        )
    for key in ("serial", "console"):
        if key in config:
            _check_fields(
                config[key], key, {"file": "str", "socket": "str"}, required=("mode",)
            )
            _check_enum(config[key], "mode", CONSOLE_MODES, key)
    return config


def validate_vm_config(config: JsonObject) -> None:
    """What upstream refuses when it builds the VM (500 at boot)."""
    cpus = config.get("cpus") or {"boot_vcpus": 1, "max_vcpus": 1}
    if cpus["boot_vcpus"] < 1 or cpus["boot_vcpus"] > cpus["max_vcpus"]:
        raise failed(
            "boot", "invalid config: boot_vcpus must be between 1 and max_vcpus"
        )
    memory = config.get("memory") or {"size": 512 << 20}
    if memory["size"] < 1 << 20:
        raise failed("boot", "invalid config: memory size is below 1 MiB")


def memory_size(config: JsonObject) -> int:
    memory = config.get("memory") or {}
    size = memory.get("size", 512 << 20)
    return int(size)


# --- devices ----------------------------------------------------------------------


class Devices:
    """The files one VM holds open while it exists."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.serial_fd: int | None = None

    def keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.pop())
        self.serial_fd = None


def _open(path: str, flags: int, action: str, what: str, mode: int = 0o600) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise failed(action, f"cannot open {what} {path}: {exc.strerror}") from exc


def open_payload(payload: JsonObject, action: str) -> None:
    if not any(payload.get(k) for k in ("kernel", "firmware", "igvm")):
        raise failed(action, "the payload names no kernel, firmware or igvm")
    for key in ("kernel", "firmware", "initramfs", "igvm"):
        path = payload.get(key)
        if path:
            os.close(_open(path, os.O_RDONLY, action, key))


def check_qcow2(
    fd: int,
    path: str,
    allow_backing: bool,
    devices: Devices,
    action: str,
    depth: int = 0,
) -> None:
    """Check a qcow2 header and open its backing chain read-only."""
    header = os.pread(fd, 72, 0)
    if len(header) < 72 or header[:4] != QCOW2_MAGIC:
        raise failed(action, f"{path} is not a qcow2 image (bad magic)")
    version = int.from_bytes(header[4:8], "big")
    if version not in (2, 3):
        raise failed(action, f"{path}: unsupported qcow2 version {version}")

    offset = int.from_bytes(header[8:16], "big")
    size = int.from_bytes(header[16:20], "big")
    if offset == 0:
        return
    if not allow_backing:
        raise failed(action, f"{path} has a backing file but backing_files is off")
    if depth >= MAX_BACKING_DEPTH or not 0 < size < 1024:
        raise failed(action, f"{path}: bad backing file reference")

    name = os.pread(fd, size, offset).decode("utf-8", "replace")
    backing = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
    backing_fd = devices.keep(_open(backing, os.O_RDONLY, action, "backing file"))
    if os.pread(backing_fd, 4, 0) == QCOW2_MAGIC:
        check_qcow2(backing_fd, backing, True, devices, action, depth + 1)


def open_disk(disk: JsonObject, devices: Devices, action: str) -> None:
    path = disk.get("path")
    if not path:
        raise failed(action, "a disk without a path (vhost-user) is not simulated")
    readonly = bool(disk.get("readonly", False))
    flags = os.O_RDONLY if readonly else os.O_RDWR
    if disk.get("direct"):
        flags |= os.O_DIRECT
    fd = devices.keep(_open(path, flags, action, "disk image"))
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise failed(action, f"disk image {path} is not a file or block device")

    try:
        fcntl.lockf(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        raise failed(action, f"disk image {path} is locked by another process") from exc

    image_type = disk.get("image_type")
    if image_type is None and os.pread(fd, 4, 0) == QCOW2_MAGIC:
        image_type = "Qcow2"
    if image_type == "Qcow2":
        check_qcow2(fd, path, bool(disk.get("backing_files", False)), devices, action)


def open_tap(net: JsonObject, devices: Devices, action: str) -> None:
    name = net.get("tap")
    if not name:
        raise failed(
            action,
            "net entry names no TAP device; the simulator does not create TAP devices",
        )
    encoded = name.encode()
    if len(encoded) >= IFNAMSIZ:
        raise failed(action, f"TAP name {name!r} is longer than 15 bytes")
    try:
        socket.if_nametoindex(name)
    except OSError as exc:
        raise failed(
            action,
            f"cannot open TAP device {name}: no such device in this network namespace",
        ) from exc

    pairs = max(1, int(net.get("num_queues", 2)) // 2)
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if pairs > 1 else 0)
    request = struct.pack("16sH22x", encoded, flags)
    for _ in range(pairs):
        fd = devices.keep(
            _open(
                "/dev/net/tun", os.O_RDWR | os.O_NONBLOCK, action, "TUN control device"
            )
        )
        try:
            fcntl.ioctl(fd, TUNSETIFF, request)
        except OSError as exc:
            raise failed(
                action, f"cannot open TAP device {name}: {exc.strerror}"
            ) from exc


def open_console(
    config: JsonObject | None, kind: str, devices: Devices, action: str
) -> None:
    if not config or config.get("mode") != "File":
        return
    path = config.get("file")
    if not path:
        raise failed(action, f"{kind} in File mode needs a file")
    fd = devices.keep(
        _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, action, f"{kind} file")
    )
    if kind == "serial":
        devices.serial_fd = fd


def open_devices(config: JsonObject, action: str) -> Devices:
    """Open what the VM needs, in upstream's order; on failure close it all."""
    devices = Devices()
    try:
        validate_vm_config(config)
        open_payload(config["payload"], action)
        for disk in config.get("disks") or []:
            open_disk(disk, devices, action)
        for net in config.get("net") or []:
            open_tap(net, devices, action)
        open_console(config.get("serial"), "serial", devices, action)
        open_console(config.get("console"), "console", devices, action)
    except BaseException:
        devices.close()
        raise
    return devices


# --- the VMM ----------------------------------------------------------------------


class Reply:
    """An API answer, and what to do once it is sent."""

    def __init__(self, status: int, body: object = None, after: str = "") -> None:
        self.status = status
        self.body = None if body is None else json.dumps(body).encode()
        self.after = after  # "", "exit", "poweroff" or "hang"


class Vm:
    """A booted or restored VM: its state and the devices it holds."""

    def __init__(self, devices: Devices, state: str) -> None:
        self.devices = devices
        self.state = state


def url_to_path(url: object, action: str) -> str:
    if not isinstance(url, str) or not url.startswith("file://"):
        raise failed(action, f"{url!r} is not a file:// URL")
    return url[len("file://") :]


class Simulator:
    """The VMM's state machine behind the API, upstream's rules."""

    def __init__(self, options: Options, log: Log, events: EventWriter) -> None:
        self.options = options
        self.log = log
        self.events = events
        self.config: JsonObject | None = None
        self.vm: Vm | None = None
        self.exit_code: int | None = None

    # --- dispatch ---------------------------------------------------------

    def dispatch(self, method: str, endpoint: str, body: bytes) -> Reply:
        route = self.routes().get(endpoint)
        if route is None:
            return Reply(404, ["Not Found"])
        wanted, takes_body, handler = route
        if method != wanted or (body and not takes_body):
            return Reply(400, ["Bad Request"])
        if takes_body and not body:
            return Reply(400, ["Bad Request"])

        try:
            if takes_body:
                try:
                    payload = json.loads(body)
                except ValueError as exc:
                    raise bad_request(str(exc)) from exc
                return handler(payload)
            return handler(None)
        except ApiError as exc:
            self.log.info(f"HTTP API error response: {exc}")
            return Reply(exc.status, exc.messages)
        except Exception as exc:  # a simulator bug must not kill the "VMM"
            self.log.error(f"{endpoint}: internal error {exc!r}")
            return Reply(500, ["Internal Server Error", repr(exc)])

    def routes(self) -> dict[str, tuple[str, bool, Callable[[object], Reply]]]:
        return {
            "vmm.ping": ("GET", False, self.api_ping),
            "vmm.shutdown": ("PUT", False, self.api_vmm_shutdown),
            "vm.info": ("GET", False, self.api_info),
            "vm.counters": ("GET", False, self.api_counters),
            "vm.create": ("PUT", True, self.api_create),
            "vm.boot": ("PUT", False, self.api_boot),
            "vm.pause": ("PUT", False, self.api_pause),
            "vm.resume": ("PUT", False, self.api_resume),
            "vm.snapshot": ("PUT", True, self.api_snapshot),
            "vm.restore": ("PUT", True, self.api_restore),
            "vm.shutdown": ("PUT", False, self.api_shutdown),
            "vm.reboot": ("PUT", False, self.api_reboot),
            "vm.power-button": ("PUT", False, self.api_power_button),
            "vm.delete": ("PUT", False, self.api_delete),
        }

    # --- endpoints --------------------------------------------------------

    def api_ping(self, _: object) -> Reply:
        return Reply(
            200,
            {
                "build_version": BUILD_VERSION,
                "version": VERSION,
                "pid": os.getpid(),
                "features": [],
            },
        )

    def api_info(self, _: object) -> Reply:
        if self.config is None:
            raise ApiError(
                404,
                "Error from API",
                "The VM information could not be retrieved",
                "VM is not created",
            )
        info: JsonObject = {
            "config": self.config,
            "state": self.vm.state if self.vm else "Created",
            "memory_actual_size": memory_size(self.config),
        }
        if self.vm is not None:
            info["device_tree"] = self.device_tree()
        return Reply(200, info)

    def api_counters(self, _: object) -> Reply:
        if self.vm is None or self.config is None:
            raise failed("report counters", "VM is not running")
        counters: JsonObject = {}
        for i, _disk in enumerate(self.config.get("disks") or []):
            counters[f"_disk{i}"] = {
                "read_bytes": 0,
                "read_ops": 0,
                "write_bytes": 0,
                "write_ops": 0,
            }
        for i, _net in enumerate(self.config.get("net") or []):
            counters[f"_net{i}"] = {
                "rx_bytes": 0,
                "rx_frames": 0,
                "tx_bytes": 0,
                "tx_frames": 0,
            }
        return Reply(200, counters)

    def api_create(self, body: object) -> Reply:
        config = check_vm_config(body)
        if self.config is not None:
            raise failed("be created", "VM is already created")
        self.config = config
        self.log.info("VM config stored")
        return Reply(204)

    def api_boot(self, _: object) -> Reply:
        self.events.emit("vm", "booting")
        if self.config is None:
            raise not_created("boot")
        if self.vm is None:
            self.vm = Vm(open_devices(self.config, "boot"), "Created")
        if self.vm.state != "Created":
            raise failed("boot", f"invalid state transition {self.vm.state} -> Running")
        self.vm.state = "Running"
        self.write_serial("simulated guest booted (no guest runs in the simulator)")
        self.log.info("VM booted")
        self.events.emit("vm", "booted")
        return Reply(204)

    def api_pause(self, _: object) -> Reply:
        vm = self.running_vm("pause")
        if vm.state != "Running":
            raise failed("pause", f"invalid state transition {vm.state} -> Paused")
        self.events.emit("vm", "pausing")
        vm.state = "Paused"
        self.events.emit("vm", "paused")
        return Reply(204)

    def api_resume(self, _: object) -> Reply:
        self.resume()
        return Reply(204)

    def api_snapshot(self, body: object) -> Reply:
        config = _check_fields(body, "VmSnapshotConfig", {"destination_url": "str"})
        vm = self.running_vm("be snapshotted")
        self.events.emit("vm", "snapshotting")
        if vm.state != "Paused":
            raise failed("be snapshotted", "trying to snapshot while VM is running")
        directory = url_to_path(config.get("destination_url"), "be snapshotted")
        self.write_snapshot(directory)
        self.events.emit("vm", "snapshotted")
        return Reply(204)

    def api_restore(self, body: object) -> Reply:
        config = _check_fields(
            body,
            "RestoreConfig",
            {
                "source_url": "str",
                "prefault": "bool",
                "resume": "bool",
            },
            required=("source_url",),
        )
        _check_enum(
            config, "memory_restore_mode", ("Copy", "OnDemand"), "RestoreConfig"
        )
        self.restore(config)
        return Reply(204)

    def api_shutdown(self, _: object) -> Reply:
        if self.options.ignore_shutdown:
            return Reply(0, after="hang")
        self.running_vm("shut down")
        self.vm_shutdown()
        return Reply(204)

    def api_reboot(self, _: object) -> Reply:
        if self.vm is None or self.config is None:
            raise not_created("reboot")
        self.events.emit("vm", "rebooting")
        self.vm.devices.close()
        self.vm = None
        self.vm = Vm(open_devices(self.config, "reboot"), "Running")
        self.events.emit("vm", "rebooted")
        return Reply(204)

    def api_power_button(self, _: object) -> Reply:
        vm = self.running_vm("press the power button")
        if vm.state != "Running":
            raise failed("press the power button", "VM is not running")
        return Reply(204, after="poweroff")

    def api_delete(self, _: object) -> Reply:
        self.vm_delete()
        return Reply(204)

    def api_vmm_shutdown(self, _: object) -> Reply:
        if self.options.ignore_shutdown:
            return Reply(0, after="hang")
        self.vmm_shutdown(0)
        return Reply(204, after="exit")

    # --- operations -------------------------------------------------------

    def running_vm(self, action: str) -> Vm:
        if self.vm is None:
            raise failed(action, "VM is not running")
        return self.vm

    def resume(self) -> None:
        vm = self.running_vm("resume")
        if vm.state != "Paused":
            raise failed("resume", f"invalid state transition {vm.state} -> Running")
        self.events.emit("vm", "resuming")
        vm.state = "Running"
        self.events.emit("vm", "resumed")

    def vm_shutdown(self) -> None:
        if self.vm is None:
            return
        self.vm.devices.close()
        self.vm = None
        self.log.info("VM shut down")
        self.events.emit("vm", "shutdown")

    def vm_delete(self) -> None:
        if self.config is None:
            return
        self.vm_shutdown()
        self.config = None
        self.events.emit("vm", "deleted")

    def vmm_shutdown(self, code: int) -> None:
        self.vm_delete()
        self.events.emit("vmm", "shutdown")
        self.exit_code = code

    def guest_poweroff(self) -> None:
        if self.vm is None or self.vm.state != "Running":
            self.log.warn("guest power-off ignored: no running VM")
            return
        self.log.info("guest powered off")
        if self.options.no_shutdown:
            self.vm_shutdown()
        else:
            self.vmm_shutdown(0)

    def guest_panic(self) -> None:
        if self.vm is None or self.vm.state != "Running":
            self.log.warn("guest panic ignored: no running VM")
            return
        self.events.emit("guest", "panic")
        self.log.error(
            "guest kernel panicked (test control); exiting like a crashed VMM"
        )
        self.exit_code = 1

    def write_serial(self, text: str) -> None:
        if self.vm is not None and self.vm.devices.serial_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.vm.devices.serial_fd, f"{text}\r\n".encode())

    def device_tree(self) -> JsonObject:
        assert self.config is not None
        tree: JsonObject = {}
        names = [f"_disk{i}" for i, _ in enumerate(self.config.get("disks") or [])]
        names += [f"_net{i}" for i, _ in enumerate(self.config.get("net") or [])]
        for slot, name in enumerate(names, start=1):
            tree[name] = {
                "id": name,
                "resources": [],
                "children": [],
                "pci_bdf": f"0000:00:{slot:02x}.0",
            }
        return tree

    def write_snapshot(self, directory: str) -> None:
        assert self.config is not None and self.vm is not None
        action = "be snapshotted"
        if not os.path.isdir(directory):
            raise failed(action, f"snapshot directory {directory} does not exist")
        size = memory_size(self.config)
        state = {
            "simulator": BUILD_VERSION,
            "version": VERSION,
            "vm_state": self.vm.state,
            "memory_ranges": [{"gpa": 0, "length": size}],
        }
        contents = {
            "config.json": json.dumps(self.config).encode(),
            "state.json": json.dumps(state).encode(),
        }
        try:
            for name, data in contents.items():
                fd = _create(os.path.join(directory, name))
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            fd = _create(os.path.join(directory, "memory-ranges"))
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise failed(
                action, f"cannot write the snapshot into {directory}: {exc.strerror}"
            ) from exc

    def restore(self, restore: JsonObject) -> None:
        action = "be restored"
        if self.config is not None or self.vm is not None:
            raise failed(action, "VM is already created")
        directory = url_to_path(restore.get("source_url"), action)

        try:
            with open(os.path.join(directory, "config.json"), "rb") as handle:
                config = json.load(handle)
            with open(os.path.join(directory, "state.json"), "rb") as handle:
                state = json.load(handle)
            if restore.get("memory_restore_mode", "Copy") == "Copy":
                os.stat(os.path.join(directory, "memory-ranges"))
        except (OSError, ValueError) as exc:
            raise failed(
                action, f"cannot read the snapshot in {directory}: {exc}"
            ) from exc
        try:
            config = check_vm_config(config)
        except ApiError as exc:
            raise failed(action, f"config.json: {exc}") from exc
        if not isinstance(state, dict):
            raise failed(action, "state.json is not an object")

        self.events.emit("vm", "restoring")
        self.vm = Vm(open_devices(config, action), "Paused")
        self.config = config
        self.events.emit("vm", "restored")
        if restore.get("resume"):
            self.resume()


# --- HTTP over the unix socket --------------------------------------------------------


class Request:
    def __init__(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        version: str,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.version = version


class Connection:
    """One client connection: its buffer and whether it waits forever."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.continued = False
        self.hung = False

    def take_request(self) -> Request | None:
        """The next complete request in the buffer, or None. Raises ValueError."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                raise ValueError("request header too large")
            return None
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ValueError(f"bad request line {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"bad header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise ValueError("chunked bodies are not supported")
        length = int(headers.get("content-length", "0"))
        if not 0 <= length <= MAX_BODY_BYTES:
            raise ValueError("bad content length")

        total = end + 4 + length
        if len(self.buffer) < total:
            expect = headers.get("expect", "").lower()
            if expect == "100-continue" and not self.continued:
                self.continued = True
                self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        self.continued = False
        return Request(parts[0], parts[1], headers, body, parts[2])

    def respond(self, status: int, body: bytes | None, close: bool) -> None:
        head = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
            "Server: Cloud Hypervisor API",
            "Content-Type: application/json",
        ]
        if body is not None:
            head.append(f"Content-Length: {len(body)}")
        elif status != 204:
            head.append("Content-Length: 0")
        if close:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")
        self.sock.settimeout(SEND_TIMEOUT_S)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)


class Server:
    """A single-threaded HTTP/1.1 server for the simulator's API."""

    def __init__(
        self,
        listener: socket.socket,
        simulator: Simulator,
        wakeup: socket.socket,
        pending: list[int],
    ) -> None:
        self.listener = listener
        self.simulator = simulator
        self.wakeup = wakeup
        self.pending = pending
        self.selector = selectors.DefaultSelector()
        self.connections: list[Connection] = []

    def run(self) -> int:
        sim = self.simulator
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.selector.register(self.wakeup, selectors.EVENT_READ, None)
        try:
            while sim.exit_code is None:
                for key, _ in self.selector.select():
                    if key.fileobj is self.listener:
                        self.accept()
                    elif key.fileobj is self.wakeup:
                        self.handle_signals()
                    else:
                        self.readable(key.data)
                    if sim.exit_code is not None:
                        break
        finally:
            for conn in list(self.connections):
                self.close(conn)
            self.selector.close()
            self.listener.close()
        return sim.exit_code if sim.exit_code is not None else 0

    def accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        conn = Connection(sock)
        self.connections.append(conn)
        self.selector.register(sock, selectors.EVENT_READ, conn)

    def close(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.remove(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def handle_signals(self) -> None:
        try:
            while self.wakeup.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self.pending:
            signum = self.pending.pop(0)
            sim = self.simulator
            if signum in (signal.SIGTERM, signal.SIGINT):
                sim.log.info(f"signal {signum}: shutting down")
                sim.vmm_shutdown(0)
            elif signum == signal.SIGUSR1:
                sim.guest_poweroff()
            elif signum == signal.SIGUSR2:
                sim.guest_panic()

    def readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        if not data:
            self.close(conn)
            return
        if conn.hung:
            return
        conn.buffer += data

        while self.simulator.exit_code is None:
            try:
                request = conn.take_request()
            except (ValueError, OSError) as exc:
                self.simulator.log.info(f"bad HTTP request: {exc}")
                self.send(conn, 400, json.dumps(["Bad Request"]).encode(), close=True)
                return
            if request is None:
                return
            if not self.serve(conn, request):
                return

    def serve(self, conn: Connection, request: Request) -> bool:
        """Answer one request; False when the connection is finished."""
        sim = self.simulator
        path = request.target.split("?", 1)[0]
        if path.startswith(API_ROOT + "/"):
            reply = sim.dispatch(
                request.method, path[len(API_ROOT) + 1 :], request.body
            )
        else:
            reply = Reply(404, ["Not Found"])

        if reply.after == "hang":
            sim.log.info(f"{path}: not answering (--sim-ignore-shutdown)")
            conn.hung = True
            return False
        close = (
            request.headers.get("connection", "").lower() == "close"
            or request.version == "HTTP/1.0"
            or reply.after == "exit"
        )
        if not self.send(conn, reply.status, reply.body, close):
            return False
        if reply.after == "poweroff":
            sim.guest_poweroff()
        return not close

    def send(
        self, conn: Connection, status: int, body: bytes | None, close: bool
    ) -> bool:
        try:
            conn.respond(status, body, close)
        except OSError:
            self.close(conn)
            return False
        if close:
            self.close(conn)
            return False
        return True


# --- start-up ------------------------------------------------------------------------


def open_api_socket(options: Options) -> tuple[socket.socket, int | None]:
    """Bind the API socket under ``<socket>.lock``, as upstream does."""
    if options.api_fd is not None:
        listener = socket.socket(fileno=options.api_fd)
        listener.listen(64)
        listener.setblocking(False)
        return listener, None

    path = options.api_socket
    assert path is not None
    try:
        lock_fd = os.open(
            f"{path}.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        raise StartupError(f"cannot create {path}.lock: {exc.strerror}") from exc
    try:
        fcntl.lockf(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        raise StartupError(f"API socket {path} is in use by another VMM") from exc

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        os.close(lock_fd)
        raise StartupError(f"cannot remove stale {path}: {exc.strerror}") from exc
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        listener.listen(64)
    except OSError as exc:
        listener.close()
        os.close(lock_fd)
        raise StartupError(
            f"cannot bind the API socket {path}: {exc.strerror}"
        ) from exc
    listener.setblocking(False)
    return listener, lock_fd


def install_signals(
    options: Options,
) -> tuple[socket.socket, socket.socket, list[int]]:
    """Route the handled signals through a wake-up socket pair into the loop.

    Returns the reading end, the writing end (which must stay open while the
    process runs) and the list the handlers append signal numbers to.
    """
    pending: list[int] = []
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def remember(signum: int, _frame: object) -> None:
        pending.append(signum)

    handled = [signal.SIGUSR1, signal.SIGUSR2]
    if options.ignore_shutdown:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        handled += [signal.SIGTERM, signal.SIGINT]
    for signum in handled:
        signal.signal(signum, remember)
    return reader, writer, pending


def _create(path: str) -> int:
    """Create or truncate ``path`` for writing, mode 0600."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def _open_output(path: str) -> int:
    try:
        return _create(path)
    except OSError as exc:
        raise StartupError(f"cannot create {path}: {exc.strerror}") from exc


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until ``vmm.shutdown``, a signal or a guest exit."""
    start = time.monotonic()
    os.umask(0o077)
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except (UsageError, ValueError) as exc:
        sys.stderr.write(f"{BUILD_VERSION}: {exc}\n")
        return 2
    if options.version:
        sys.stdout.write(f"{BUILD_VERSION} (cloud-hypervisor API {VERSION})\n")
        return 0

    try:
        log_fd = _open_output(options.log_file) if options.log_file else 2
        log = Log(log_fd, options.verbosity, start)
        event_fd = options.event_fd
        if options.event_path is not None:
            event_fd = _open_output(options.event_path)
    except StartupError as exc:
        sys.stderr.write(f"{BUILD_VERSION}: {exc}\n")
        return 1
    events = EventWriter(event_fd, start)
    wakeup, _wakeup_writer, pending = install_signals(options)

    log.info(f"{BUILD_VERSION} {VERSION} starting, pid {os.getpid()}")
    events.emit("vmm", "starting")
    try:
        listener, _lock_fd = open_api_socket(options)
    except StartupError as exc:
        log.error(str(exc))
        sys.stderr.write(f"{BUILD_VERSION}: {exc}\n")
        return 1

    simulator = Simulator(options, log, events)
    if options.restore is not None:
        try:
            simulator.restore(options.restore)
        except ApiError as exc:
            log.error(f"Error restoring VM: {exc}")
            sys.stderr.write(f"{BUILD_VERSION}: error restoring VM: {exc}\n")
            events.emit("vmm", "shutdown")
            listener.close()
            return 1

    code = Server(listener, simulator, wakeup, pending).run()
    log.info(f"exiting with status {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
