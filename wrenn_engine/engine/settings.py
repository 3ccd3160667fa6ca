"""Settings of one Engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wrenn_engine import settings as env
from wrenn_engine.lifecycle.settings import LifecycleSettings


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """How an engine runs on its host.

    ``vmm`` picks the VMM binary: ``cloud-hypervisor`` (the default: the
    binary at VMConfig's default path or on PATH; create fails with a clear
    error when there is none), ``simulator`` (the bundled
    ``wrenn-ch-simulator``), or an absolute path.

    ``run_dir`` puts every sandbox's directory and API socket below one
    directory (``<run_dir>/<id>/`` and ``<run_dir>/<id>.sock``); by default
    VMConfig's own defaults apply (``/tmp/ch-vm-<id>``, ``/tmp/ch-<id>.sock``).
    """

    host_id: str = field(default_factory=env.host_id)
    vmm: str = "cloud-hypervisor"
    run_dir: str | None = None
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    #: Options for the real drivers (NetworkSettings, RootfsSettings,
    #: VmmSettings); ignored when drivers are passed in.
    network: Any = None
    rootfs: Any = None
    vmm_driver: Any = None
    #: The guest side of every sandbox's network (the original's layout).
    guest_ip: str = "169.254.0.21"
    gateway_ip: str = "169.254.0.22"
    netmask: str = "255.255.255.252"
    reconcile_on_open: bool = True
    workers: bool = True
    #: How often the VMM watcher looks for exits and monitor events.
    watch_interval_s: float = 0.25
    #: How often the inactivity worker looks for idle sandboxes.
    inactivity_interval_s: float = 5.0
