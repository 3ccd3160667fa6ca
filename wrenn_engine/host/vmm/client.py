"""A client for cloud-hypervisor's REST API on its unix socket.

HTTP/1.1 over ``AF_UNIX`` with the standard library's ``http.client``; one
connection per request, so a VMM that dies between two calls is never
mistaken for a slow one. Every failure is a :class:`~wrenn_engine.errors.VmmError`:
a non-2xx answer carries its status and the VMM's error text (upstream sends
a JSON array of messages, outermost first); no answer at all (no socket,
nothing listening, a timeout, a dropped connection) has status ``None`` and
chains the OS error.

``recorder`` sees every exchange that got an answer, as ``(method, path,
request_body, status, response_body)``, so tests can check each one against
the OpenAPI document.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable
from typing import Any

from wrenn_engine.errors import VmmError

API_ROOT = "/api/v1"

#: ``recorder(method, path, request_body, status, response_body)``
Recorder = Callable[[str, str, bytes | None, int, bytes], None]


class _UnixConnection(http.client.HTTPConnection):
    """An HTTPConnection that dials a unix socket instead of TCP."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class VmmClient:
    """cloud-hypervisor's API at ``socket_path``; ``timeout`` is per request."""

    def __init__(
        self, socket_path: str, timeout: float = 5.0, recorder: Recorder | None = None
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.recorder = recorder

    # --- reads ------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        """``vmm.ping``: the VMM's version, pid and features."""
        return self._json("GET", "vmm.ping")

    def info(self) -> dict[str, Any]:
        """``vm.info``: the VM's config and state (404 when no VM exists)."""
        return self._json("GET", "vm.info")

    def counters(self) -> dict[str, Any]:
        """``vm.counters``: per-device counters of a booted VM."""
        return self._json("GET", "vm.counters")

    # --- actions ----------------------------------------------------------------

    def create(self, vm_config: dict[str, Any]) -> None:
        """``vm.create``: store the VM config; nothing is opened yet."""
        self._call("PUT", "vm.create", vm_config)

    def boot(self) -> None:
        """``vm.boot``: open the devices and start the created VM."""
        self._call("PUT", "vm.boot")

    def pause(self) -> None:
        self._call("PUT", "vm.pause")

    def resume(self) -> None:
        self._call("PUT", "vm.resume")

    def snapshot(self, destination_url: str) -> None:
        """``vm.snapshot`` of a paused VM into ``file://<existing dir>``."""
        self._call("PUT", "vm.snapshot", {"destination_url": destination_url})

    def restore(self, restore_config: dict[str, Any]) -> None:
        """``vm.restore`` with a RestoreConfig (``source_url`` required)."""
        self._call("PUT", "vm.restore", restore_config)

    def shutdown(self) -> None:
        """``vm.shutdown``: stop the VM; the VMM keeps running."""
        self._call("PUT", "vm.shutdown")

    def reboot(self) -> None:
        self._call("PUT", "vm.reboot")

    def power_button(self) -> None:
        """``vm.power-button``: ask the guest to power off."""
        self._call("PUT", "vm.power-button")

    def delete(self) -> None:
        """``vm.delete``: shut down and forget the VM (no VM is success)."""
        self._call("PUT", "vm.delete")

    def shutdown_vmm(self) -> None:
        """``vmm.shutdown``: delete the VM and make the VMM process exit."""
        self._call("PUT", "vmm.shutdown")

    # --- plumbing ---------------------------------------------------------------

    def _json(self, method: str, endpoint: str) -> dict[str, Any]:
        status, data = self._call(method, endpoint)
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise VmmError(
                endpoint, status, f"answer is not JSON: {data[:200]!r}"
            ) from exc
        if not isinstance(value, dict):
            raise VmmError(endpoint, status, f"answer is not a JSON object: {value!r}")
        return value

    def _call(
        self, method: str, endpoint: str, body: dict[str, Any] | None = None
    ) -> tuple[int, bytes]:
        path = f"{API_ROOT}/{endpoint}"
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"

        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            status, data = response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise VmmError(endpoint, None, self._describe(exc)) from exc
        finally:
            conn.close()

        if self.recorder is not None:
            self.recorder(method, path, payload, status, data)
        if not 200 <= status < 300:
            raise VmmError(endpoint, status, _error_text(data))
        return status, data

    def _describe(self, exc: BaseException) -> str:
        where = self.socket_path
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.timeout:g}s on {where}"
        if isinstance(exc, FileNotFoundError):
            return f"{where} does not exist; is the VMM running?"
        if isinstance(exc, ConnectionRefusedError):
            return f"nothing listens on {where}; the VMM has exited"
        return f"{type(exc).__name__} on {where}: {exc}"


def _error_text(data: bytes) -> str:
    """The VMM's error body as one line: upstream's message list joined."""
    text = data.decode("utf-8", "replace").strip()
    try:
        value = json.loads(text)
    except ValueError:
        return text or "no error text"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ": ".join(value) or "no error text"
    return text
