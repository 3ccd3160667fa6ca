"""The VmConfig body of ``vm.create``, built from a sandbox's VMConfig.

Shapes follow ``components.schemas.VmConfig`` of cloud-hypervisor's OpenAPI
document. Only what the sandbox needs is set; cloud-hypervisor fills the
rest with its defaults. The serial port goes to a file in the sandbox's
directory (or nowhere) and the virtio console is off, so nothing the guest
prints can reach the engine's terminal.
"""

from __future__ import annotations

from typing import Any

from wrenn_engine.domain.config import VMConfig
from wrenn_engine.host.base import DiskSpec

MIB = 1024 * 1024
SERIAL_LOG_NAME = "serial.log"


def build_vm_config(
    config: VMConfig, disk: DiskSpec, *, serial_path: str | None = None
) -> dict[str, Any]:
    """A ``vm.create`` body for ``config`` with ``disk`` as its root disk.

    ``serial_path``: file that receives the guest's serial console (the
    kernel command line says ``console=ttyS0``); None discards it.
    """
    disk_config: dict[str, Any] = {
        "path": disk.path,
        "readonly": disk.readonly,
        "image_type": disk.image_type,
    }
    if disk.backing_files:
        disk_config["backing_files"] = True

    net_config: dict[str, Any] = {"tap": config.tap_device, "mac": config.tap_mac}
    if config.gateway_ip and config.netmask:
        # The TAP's own address; upstream applies it only to a TAP it creates.
        net_config["ip"] = config.gateway_ip
        net_config["mask"] = config.netmask

    serial: dict[str, Any] = (
        {"mode": "File", "file": serial_path} if serial_path else {"mode": "Null"}
    )
    return {
        "payload": {"kernel": config.kernel_path, "cmdline": config.kernel_args()},
        "cpus": {"boot_vcpus": config.vcpus, "max_vcpus": config.vcpus},
        "memory": {"size": config.memory_mb * MIB},
        "disks": [disk_config],
        "net": [net_config],
        "serial": serial,
        "console": {"mode": "Off"},
    }
