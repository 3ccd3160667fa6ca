"""wrenn_engine: event-sourced lifecycle of cloud-hypervisor microVM sandboxes."""

from wrenn_engine.domain.config import VMConfig
from wrenn_engine.errors import (
    CommandFailed,
    ConcurrencyError,
    ConfigError,
    HostError,
    InvalidTransition,
    LifecycleError,
    SandboxBusy,
    SandboxNotFound,
    StoreError,
    WrennError,
)

__all__ = [
    "CommandFailed",
    "ConcurrencyError",
    "ConfigError",
    "HostError",
    "InvalidTransition",
    "LifecycleError",
    "SandboxBusy",
    "SandboxNotFound",
    "StoreError",
    "VMConfig",
    "WrennError",
]
__version__ = "0.1.0"
