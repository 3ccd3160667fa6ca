"""Every request the engine sends and every answer the VMM gives, checked
against cloud-hypervisor's OpenAPI document; and the statuses of requests
made out of order, on the simulator and (where installed) the real VMM."""

# Fixtures imported from test_vmm_fixtures come back as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.host.test_vmm_fixtures import (  # noqa: F401 - fixtures
    Sandbox,
    driver,
    make_driver,
    make_sandbox,
    netns,
    openapi_path,
    owner,
    sandbox,
    skip_or_fail,
    tap_netns,
)
from wrenn_engine.errors import VmmError
from wrenn_engine.host.base import DiskSpec
from wrenn_engine.host.vmm import launcher
from wrenn_engine.host.vmm.client import VmmClient
from wrenn_engine.host.vmm.driver import (
    SIMULATOR,
    CloudHypervisorDriver,
    find_cloud_hypervisor,
)

API_ROOT = "/api/v1"


class Conformance:
    """A client recorder that validates each exchange against the document.

    A status the document lists for the operation is validated in full with
    openapi-core. A status it does not list must be upstream's generic API
    error (500 with a JSON array of messages); those are collected in
    ``undocumented`` so a test can say exactly which ones it expects.
    """

    def __init__(self, document: dict[str, Any]) -> None:
        from openapi_core import OpenAPI

        self.document = document
        self.openapi = OpenAPI.from_dict(document)
        self.checked: list[tuple[str, str, int]] = []
        self.undocumented: list[tuple[str, int]] = []

    def __call__(
        self,
        method: str,
        path: str,
        request_body: bytes | None,
        status: int,
        response_body: bytes,
    ) -> None:
        from openapi_core.testing import MockRequest, MockResponse

        assert path.startswith(API_ROOT + "/"), path
        endpoint = path[len(API_ROOT) :]
        request = MockRequest(
            "http://localhost", method, path, data=request_body or b""
        )
        self.openapi.validate_request(request)

        responses = self.document["paths"][endpoint][method.lower()]["responses"]
        if status in {int(code) for code in responses}:
            self.openapi.validate_response(
                request, MockResponse(response_body, status_code=status)
            )
        else:
            assert status == 500, f"{method} {endpoint}: undocumented {status}"
            messages = json.loads(response_body)
            assert messages and all(isinstance(m, str) for m in messages)
            self.undocumented.append((endpoint, status))
        self.checked.append((method, endpoint, status))


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    import yaml

    path = openapi_path()
    if not path.is_file():
        skip_or_fail(f"the OpenAPI document is not at {path} (set WRENN_CH_OPENAPI)")
    # YAML reads status codes as integers; JSON turns every key into a string,
    # as OpenAPI wants them.
    loaded: dict[str, Any] = json.loads(json.dumps(yaml.safe_load(path.read_text())))
    return loaded


@pytest.fixture
def conformance(document: dict[str, Any]) -> Conformance:
    return Conformance(document)


# --- the engine's whole sequence ------------------------------------------------------


@pytest.mark.host
def test_engine_sequence_conforms_to_the_document(
    conformance: Conformance,
    tap_netns: str,
    tmp_path: Path,
    make_driver: Callable[..., CloudHypervisorDriver],
) -> None:
    box = make_sandbox(tmp_path, tap_netns)
    drv = make_driver(recorder=conformance)
    sock = box.socket
    process = drv.launch(box.spec(), 10)
    client = drv.client(sock)

    assert client.ping()["pid"] == process.pid
    drv.create_vm(sock, box.vm_config(), DiskSpec(str(box.disk)))
    created = client.info()
    assert created["state"] == "Created"
    drv.boot(sock)
    assert drv.info(sock)["state"] == "Running"
    assert set(client.counters()) == {"_disk0", "_net0"}

    drv.pause(sock)
    assert drv.info(sock)["state"] == "Paused"
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    drv.snapshot(sock, str(snapshot))
    drv.resume(sock)
    assert drv.info(sock)["state"] == "Running"

    client.shutdown()
    assert client.info()["state"] == "Created"
    client.delete()
    with pytest.raises(VmmError) as missing:
        client.info()
    assert missing.value.status == 404
    client.shutdown_vmm()
    assert drv.wait_exit(process, 5) == 0
    drv.shutdown(process, sock, 1)
    assert not os.path.exists(sock)

    restored = drv.launch(box.spec(), 10)
    drv.restore(sock, str(snapshot))
    info = drv.info(sock)
    assert info["state"] == "Paused"
    assert info["config"] == created["config"]
    drv.resume(sock)
    assert drv.info(sock)["state"] == "Running"
    drv.shutdown(restored, sock, 5)
    assert not drv.is_running(restored)

    seen = {(method, endpoint) for method, endpoint, _ in conformance.checked}
    assert seen >= {
        ("GET", "/vmm.ping"),
        ("PUT", "/vm.create"),
        ("GET", "/vm.info"),
        ("PUT", "/vm.boot"),
        ("GET", "/vm.counters"),
        ("PUT", "/vm.pause"),
        ("PUT", "/vm.snapshot"),
        ("PUT", "/vm.resume"),
        ("PUT", "/vm.shutdown"),
        ("PUT", "/vm.delete"),
        ("PUT", "/vmm.shutdown"),
        ("PUT", "/vm.restore"),
    }
    assert conformance.undocumented == []


# --- requests out of order ------------------------------------------------------------


@pytest.fixture(params=[SIMULATOR, "cloud-hypervisor"])
def vmm(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    make_driver: Callable[..., CloudHypervisorDriver],
    conformance: Conformance,
) -> Iterator[tuple[Sandbox, VmmClient]]:
    """A fresh VMM without a VM, and a client that validates every exchange."""
    box = make_sandbox(tmp_path)
    if request.param != SIMULATOR:
        binary = find_cloud_hypervisor()
        if binary is None:
            pytest.skip(
                "cloud-hypervisor binary not installed (no Debian or PyPI "
                "package ships it)"
            )
        if not os.path.exists("/dev/kvm"):
            pytest.skip("cloud-hypervisor needs /dev/kvm, which this machine lacks")
        box.binary = binary
    drv = make_driver()
    process = drv.launch(box.spec(), 10)
    try:
        yield box, VmmClient(box.socket, 5, recorder=conformance)
    finally:
        drv.shutdown(process, box.socket, 5)


def status_of(call: Callable[[], object]) -> int:
    try:
        call()
    except VmmError as exc:
        assert exc.status is not None, exc
        return exc.status
    return 200


def test_requests_out_of_order_get_upstream_statuses(
    vmm: tuple[Sandbox, VmmClient],
    conformance: Conformance,
) -> None:
    box, client = vmm
    body = box.body(net=False)
    source = {"source_url": f"file://{box.dir}"}

    assert status_of(client.info) == 404
    assert status_of(client.boot) == 404
    assert status_of(client.pause) == 500
    assert status_of(client.resume) == 500
    assert status_of(client.shutdown) == 500
    assert status_of(lambda: client.snapshot(f"file://{box.dir}")) == 500
    assert status_of(lambda: client.create(body)) == 200
    assert status_of(lambda: client.create(body)) == 500
    assert client.info()["state"] == "Created"
    assert status_of(client.pause) == 500
    assert status_of(client.shutdown) == 500
    assert status_of(lambda: client.restore(source)) == 500
    assert status_of(client.delete) == 200
    assert status_of(client.delete) == 200
    assert status_of(client.info) == 404

    assert sorted(set(conformance.undocumented)) == [
        ("/vm.create", 500),
        ("/vm.pause", 500),
        ("/vm.restore", 500),
        ("/vm.resume", 500),
        ("/vm.shutdown", 500),
        ("/vm.snapshot", 500),
    ]


def test_requests_out_of_order_on_a_booted_vm(
    sandbox: Sandbox,
    make_driver: Callable[..., CloudHypervisorDriver],
    conformance: Conformance,
    tmp_path: Path,
) -> None:
    drv = make_driver(recorder=conformance)
    process = drv.launch(sandbox.spec(), 10)
    client = drv.client(sandbox.socket)
    source = {"source_url": f"file://{sandbox.dir}"}
    try:
        client.create(sandbox.body(net=False))
        assert status_of(client.boot) == 200
        assert status_of(client.boot) == 500
        assert status_of(client.resume) == 500
        assert status_of(lambda: client.snapshot(f"file://{tmp_path}")) == 500
        assert status_of(client.pause) == 200
        assert status_of(client.pause) == 500
        assert status_of(client.boot) == 500
        assert status_of(lambda: client.snapshot(f"file://{tmp_path}/missing")) == 500
        assert status_of(lambda: client.restore(source)) == 500
        assert client.info()["state"] == "Paused"
    finally:
        drv.shutdown(process, sandbox.socket, 5)


def test_malformed_bodies_are_400(
    sandbox: Sandbox, driver: CloudHypervisorDriver
) -> None:
    process = driver.launch(sandbox.spec(), 10)
    client = driver.client(sandbox.socket)
    try:
        with pytest.raises(VmmError) as bad:
            client.create({"payload": "not an object"})
        assert bad.value.status == 400
        with pytest.raises(VmmError) as bad:
            client.create({"payload": {}, "cpus": {"boot_vcpus": "one"}})
        assert bad.value.status == 400
        with pytest.raises(VmmError) as bad:
            client.restore({"prefault": True})
        assert bad.value.status == 400
        with pytest.raises(VmmError) as missing:
            client.info()
        assert missing.value.status == 404
    finally:
        driver.shutdown(process, sandbox.socket, 5)
    assert launcher.socket_state(sandbox.socket) == "absent"
