"""VMConfig: what one sandbox's VM is given, with the original's defaults.

Pure data, no I/O. ``with_defaults`` fills empty fields exactly as the Go
original did; ``validate`` checks presence in the original's order and then
checks every value against the limits the kernel and the VMM impose, so a bad
id or name is refused before anything touches the host.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, fields
from typing import Any

from wrenn_engine.errors import ConfigError

DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MB = 512
DEFAULT_VMM_BIN = "/usr/local/bin/cloud-hypervisor"
DEFAULT_TAP_DEVICE = "tap0"
DEFAULT_TAP_MAC = "02:FC:00:00:00:05"
DEFAULT_INIT_PATH = "/usr/local/bin/wrenn-init"

VCPUS_MAX = 64
MEMORY_MB_MIN = 128
MEMORY_MB_MAX = 1024 * 1024

#: sun_path is 108 bytes including the terminating NUL.
UNIX_SOCKET_PATH_MAX = 107
#: IFNAMSIZ is 16 bytes including the terminating NUL.
IFNAME_MAX = 15
SANDBOX_ID_MAX = 63
NETNS_NAME_MAX = 63
PATH_MAX = 4095

SANDBOX_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")

#: Presence is checked in this order, the original's.
REQUIRED_FIELDS = (
    "sandbox_id",
    "kernel_path",
    "rootfs_path",
    "network_namespace",
    "guest_ip",
    "gateway_ip",
    "netmask",
)


def default_socket_path(sandbox_id: str) -> str:
    return f"/tmp/ch-{sandbox_id}.sock"


def default_sandbox_dir(sandbox_id: str) -> str:
    return f"/tmp/ch-vm-{sandbox_id}"


@dataclass(frozen=True, slots=True)
class VMConfig:
    """The configuration of one sandbox's VM (the original's fields)."""

    sandbox_id: str = ""
    template_id: str = ""
    kernel_path: str = ""
    rootfs_path: str = ""
    vcpus: int = 0
    memory_mb: int = 0
    network_namespace: str = ""
    tap_device: str = ""
    tap_mac: str = ""
    guest_ip: str = ""
    gateway_ip: str = ""
    netmask: str = ""
    vmm_bin: str = ""
    socket_path: str = ""
    sandbox_dir: str = ""
    init_path: str = ""
    snapshot_dir: str = ""

    # --- defaults -------------------------------------------------------------

    def with_defaults(self) -> VMConfig:
        """A copy with every empty field filled as the original does."""
        return dataclasses.replace(self, **self.defaults_to_apply())

    def defaults_to_apply(self) -> dict[str, Any]:
        """The fields ``with_defaults`` would fill, and the values it would use."""
        filled: dict[str, Any] = {}
        if self.vcpus == 0:
            filled["vcpus"] = DEFAULT_VCPUS
        if self.memory_mb == 0:
            filled["memory_mb"] = DEFAULT_MEMORY_MB
        if not self.vmm_bin:
            filled["vmm_bin"] = DEFAULT_VMM_BIN
        if not self.socket_path:
            filled["socket_path"] = default_socket_path(self.sandbox_id)
        if not self.sandbox_dir:
            filled["sandbox_dir"] = default_sandbox_dir(self.sandbox_id)
        if not self.tap_device:
            filled["tap_device"] = DEFAULT_TAP_DEVICE
        if not self.tap_mac:
            filled["tap_mac"] = DEFAULT_TAP_MAC
        if not self.init_path:
            filled["init_path"] = DEFAULT_INIT_PATH
        return filled

    def kernel_args(self) -> str:
        """The kernel command line, byte for byte the original's."""
        return (
            "console=ttyS0 root=/dev/vda rw reboot=k panic=1 quiet loglevel=1 "
            f"init_on_free=1 clocksource=kvm-clock init={self.init_path} "
            f"ip={self.guest_ip}::{self.gateway_ip}:{self.netmask}:capsule:eth0:off"
        )

    # --- validation -----------------------------------------------------------

    def validate(self) -> None:
        """Raise ConfigError for the first missing field, then for any bad value."""
        for name in REQUIRED_FIELDS:
            if not getattr(self, name):
                raise ConfigError(name, "is required", hint=_REQUIRED_HINTS[name])

        _check_sandbox_id(self.sandbox_id)
        if self.template_id:
            _check_name("template_id", self.template_id, SANDBOX_ID_RE, 63)
        _check_range("vcpus", self.vcpus, 1, VCPUS_MAX, "vCPUs")
        _check_range("memory_mb", self.memory_mb, MEMORY_MB_MIN, MEMORY_MB_MAX, "MiB")

        _check_name(
            "network_namespace", self.network_namespace, NETNS_RE, NETNS_NAME_MAX
        )
        if self.tap_device:
            _check_name("tap_device", self.tap_device, IFNAME_RE, IFNAME_MAX)
        if self.tap_mac:
            _check_mac(self.tap_mac)
        _check_network(self.guest_ip, self.gateway_ip, self.netmask)

        for name in (
            "kernel_path",
            "rootfs_path",
            "vmm_bin",
            "sandbox_dir",
            "init_path",
            "snapshot_dir",
        ):
            value = getattr(self, name)
            if value:
                check_path(name, value)
        if self.socket_path:
            check_path("socket_path", self.socket_path)
            _check_socket_path("socket_path", self.socket_path)

    # --- conversion -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                unknown[0],
                "is not a VMConfig field",
                limit=", ".join(sorted(known)),
                hint="check the spelling of the field name",
            )
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """The few fields an operator scans for in a listing."""
        return {
            "template_id": self.template_id,
            "vcpus": self.vcpus,
            "memory_mb": self.memory_mb,
            "kernel_path": self.kernel_path,
            "rootfs_path": self.rootfs_path,
        }


_REQUIRED_HINTS = {
    "sandbox_id": "give the sandbox an id, or let Engine.create generate one",
    "kernel_path": "give the path of an uncompressed kernel image (--kernel)",
    "rootfs_path": "give the path of the template root filesystem image (--image)",
    "network_namespace": "the engine names it after the sandbox id; set it when "
    "building a VMConfig by hand",
    "guest_ip": "the guest's IPv4 address, 169.254.0.21 in the engine's layout",
    "gateway_ip": "the TAP address the guest routes through, 169.254.0.22",
    "netmask": "the guest network's mask, 255.255.255.252 in the engine's layout",
}


def validate_sandbox_id(value: str) -> None:
    """Raise ConfigError unless ``value`` is a sandbox id that is safe to use
    in paths, interface names and command lines."""
    _check_sandbox_id(value)


def _check_sandbox_id(value: str) -> None:
    limit = (
        f"1 to {SANDBOX_ID_MAX} characters of a-z, 0-9, '-' and '_', starting "
        "with a letter or digit"
    )
    if len(value) > SANDBOX_ID_MAX or not SANDBOX_ID_RE.fullmatch(value):
        raise ConfigError(
            "sandbox_id",
            f"{value!r} is not a valid sandbox id",
            limit=limit,
            hint="pick an id from that alphabet or let the engine generate one",
        )
    socket = default_socket_path(value)
    if len(socket.encode()) > UNIX_SOCKET_PATH_MAX:
        raise ConfigError(
            "sandbox_id",
            f"{value!r} makes the socket path {socket!r} too long",
            limit=f"{UNIX_SOCKET_PATH_MAX} bytes for a unix socket path",
            hint="use a shorter sandbox id",
        )


def _check_name(field: str, value: str, pattern: re.Pattern[str], maximum: int) -> None:
    size = len(value.encode())
    if size > maximum:
        raise ConfigError(
            field,
            f"{value!r} is {size} bytes long",
            limit=f"at most {maximum} bytes",
            hint="use a shorter name",
        )
    if not pattern.fullmatch(value):
        raise ConfigError(
            field,
            f"{value!r} has characters that are not allowed",
            limit="letters, digits, '.', '-' and '_', starting with a letter or digit",
            hint="rename it",
        )


def _check_range(field: str, value: int, low: int, high: int, unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            field, f"{value!r} is not a whole number", limit=f"{low} to {high} {unit}"
        )
    if not low <= value <= high:
        raise ConfigError(
            field,
            f"{value} is out of range",
            limit=f"{low} to {high} {unit}",
            hint=f"choose a value between {low} and {high}",
        )


def _check_mac(value: str) -> None:
    if not MAC_RE.fullmatch(value):
        raise ConfigError(
            "tap_mac",
            f"{value!r} is not a MAC address",
            limit="six hex octets separated by ':', e.g. 02:FC:00:00:00:05",
        )
    if int(value[:2], 16) & 0x01:
        raise ConfigError(
            "tap_mac",
            f"{value!r} is a multicast address",
            limit="a unicast MAC (the lowest bit of the first octet clear)",
            hint="use a locally administered unicast MAC such as 02:FC:00:00:00:05",
        )


def _check_network(guest_ip: str, gateway_ip: str, netmask: str) -> None:
    addresses = {}
    for field, value in (("guest_ip", guest_ip), ("gateway_ip", gateway_ip)):
        try:
            addresses[field] = ipaddress.IPv4Address(value)
        except ValueError as exc:
            raise ConfigError(
                field,
                f"{value!r} is not an IPv4 address",
                limit="dotted quad, e.g. 169.254.0.21",
            ) from exc
    try:
        network = ipaddress.IPv4Network(f"0.0.0.0/{netmask}")
    except ValueError as exc:
        raise ConfigError(
            "netmask",
            f"{netmask!r} is not a network mask",
            limit="contiguous ones then zeros, e.g. 255.255.255.252",
        ) from exc
    if str(network.netmask) != netmask:
        raise ConfigError(
            "netmask",
            f"{netmask!r} is not written as a dotted mask",
            limit="dotted quad, e.g. 255.255.255.252",
        )
    guest_net = ipaddress.IPv4Network(f"{guest_ip}/{netmask}", strict=False)
    if addresses["gateway_ip"] not in guest_net:
        raise ConfigError(
            "gateway_ip",
            f"{gateway_ip} is not in the guest network {guest_net}",
            hint="put the guest and its gateway in the same subnet",
        )
    if guest_ip == gateway_ip:
        raise ConfigError(
            "gateway_ip",
            "equals guest_ip",
            hint="the guest and its gateway need different addresses",
        )


def check_text(
    field: str, value: object, maximum: int = 200, empty: bool = False
) -> None:
    """Refuse text that would corrupt a log line, a database row or a command
    line: not a string, empty (unless allowed), too long, a control
    character, or not encodable as UTF-8."""
    if not isinstance(value, str):
        raise ConfigError(field, f"{value!r} is not text", limit="a string")
    if not value and not empty:
        raise ConfigError(field, "is empty", hint="give a non-empty value")
    if len(value) > maximum:
        raise ConfigError(
            field, f"is {len(value)} characters long", limit=f"at most {maximum}"
        )
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ConfigError(
            field,
            f"{value!r} contains a control character",
            limit="printable characters only",
        )
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ConfigError(
            field,
            f"{value!r} is not valid Unicode text",
            hint="check the encoding of the input",
        ) from exc


def check_path(field: str, value: str) -> None:
    """Refuse a path the host steps could not use safely: not absolute, not
    in normal form, with white space, control characters, ',' or '=' (the
    VMM's option syntax), or longer than PATH_MAX."""
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ConfigError(
            field,
            f"{value!r} contains white space or a control character",
            limit="no spaces, tabs, newlines or control characters (the path "
            "goes on the VMM's and the kernel's command lines)",
            hint="rename or move the file",
        )
    if not value.startswith("/"):
        raise ConfigError(
            field,
            f"{value!r} is not an absolute path",
            hint="give the full path, starting with '/'",
        )
    if os.path.normpath(value) != value:
        raise ConfigError(
            field,
            f"{value!r} is not in normal form",
            limit="no '.', '..', '//' or trailing '/'",
            hint=f"write it as {os.path.normpath(value)!r}",
        )
    if "," in value or "=" in value:
        raise ConfigError(
            field,
            f"{value!r} contains ',' or '='",
            limit="no ',' or '=' (the VMM's option syntax uses them)",
            hint="rename or move the file",
        )
    if len(value.encode()) > PATH_MAX:
        raise ConfigError(field, "is too long", limit=f"{PATH_MAX} bytes")


def _check_socket_path(field: str, value: str) -> None:
    size = len(value.encode())
    if size > UNIX_SOCKET_PATH_MAX:
        raise ConfigError(
            field,
            f"{value!r} is {size} bytes long",
            limit=f"{UNIX_SOCKET_PATH_MAX} bytes for a unix socket path",
            hint="use a shorter directory or sandbox id",
        )
