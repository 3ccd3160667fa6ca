"""Opening an engine for the commands that act on the host, and their progress.

The real Linux drivers are the default and need root. For tests of the CLI
itself (never in production) the in-memory fake drivers can stand in::

    WRENN_ENGINE_DRIVERS=fake WRENN_ENGINE_FAKE_HOST=/tmp/host.json wrenn-engine ...

``WRENN_ENGINE_FAKE_HOST`` is the JSON file the fake host keeps its objects
in between commands (default: ``fake-host.json`` in the state directory).

``WRENN_ENGINE_HOST_NETNS`` and ``WRENN_ENGINE_NET_PREFIX`` configure the real
network driver (see ``network_settings``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

from wrenn_engine import settings
from wrenn_engine.cli.common import CliError, db_url
from wrenn_engine.engine import Engine, EngineSettings
from wrenn_engine.host.base import HostDrivers

DRIVERS_ENV = "WRENN_ENGINE_DRIVERS"
FAKE_HOST_ENV = "WRENN_ENGINE_FAKE_HOST"
RUN_DIR_ENV = "WRENN_ENGINE_RUN_DIR"
HOST_NETNS_ENV = "WRENN_ENGINE_HOST_NETNS"
NET_PREFIX_ENV = "WRENN_ENGINE_NET_PREFIX"


def network_settings() -> object:
    """The real network driver's settings from the environment.

    ``WRENN_ENGINE_HOST_NETNS`` makes a named network namespace (which must
    exist) play the host's part: the veth host sides and the per-sandbox
    nftables tables go there instead of the machine's own namespace, for
    trying the engine out or drills. ``WRENN_ENGINE_NET_PREFIX`` changes the
    prefix of every namespace, link and table name (default ``wrenn``).
    """
    from wrenn_engine.host import netns
    from wrenn_engine.host.network import NetworkSettings

    host_netns = os.environ.get(HOST_NETNS_ENV) or None
    if host_netns and not netns.exists(host_netns):
        raise CliError(
            f"{HOST_NETNS_ENV}={host_netns!r}: no such network namespace; "
            f"create it first (`ip netns add {host_netns}`)"
        )
    prefix = os.environ.get(NET_PREFIX_ENV) or "wrenn"
    return NetworkSettings(prefix=prefix, host_netns=host_netns)


def driver_kind() -> str:
    kind = os.environ.get(DRIVERS_ENV, "linux") or "linux"
    if kind not in ("linux", "fake"):
        raise CliError(
            f"{DRIVERS_ENV}={kind!r} is not a driver set; use linux (the "
            "default) or fake (a testing aid)"
        )
    return kind


def fake_drivers() -> HostDrivers:
    from wrenn_engine.host.fake import FakeHost

    path = os.environ.get(FAKE_HOST_ENV) or str(settings.state_dir() / "fake-host.json")
    return FakeHost(path=path).drivers()


def require_root(command: str) -> None:
    """The real drivers make namespaces, links and loop devices: root only."""
    if os.geteuid() != 0:
        raise CliError(
            f"`{command}` drives the real host (network namespaces, loop devices, "
            "the VMM) and needs root; run it with sudo. (`wrenn-engine demo` runs "
            "without root on stand-in drivers.)"
        )


@contextmanager
def open_engine(
    args: argparse.Namespace, command: str, vmm: str = "cloud-hypervisor"
) -> Iterator[Engine]:
    """An engine for one command: no workers, no reconcile at open.

    The CLI is one short process per command; watching VMMs and reconciling
    are the job of a long-running engine or of ``wrenn-engine reconcile``.
    """
    if driver_kind() == "fake":
        drivers = fake_drivers()
    else:
        require_root(command)
        drivers = None
    run_dir = getattr(args, "run_dir", None) or os.environ.get(RUN_DIR_ENV) or None
    engine_settings = EngineSettings(
        vmm=vmm,
        run_dir=run_dir,
        workers=False,
        reconcile_on_open=False,
        network=network_settings() if drivers is None else None,
    )
    engine = Engine.open(db_url(args), drivers=drivers, settings=engine_settings)
    try:
        yield engine
    finally:
        engine.close()
