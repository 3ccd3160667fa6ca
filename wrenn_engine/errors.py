"""The exception tree of wrenn_engine.

Every error the package raises on purpose is a :class:`WrennError`. Errors
carry their data as attributes (sandbox id, step, versions) and build their
own message, which always says what to do next. Driver and operating-system
errors are translated in one place per layer (the store's ``_translate``,
the host's ``HostCommandError``) and always chained to their cause with
``raise ... from``.

::

    WrennError
    ├── ConfigError                 bad input: a field, its limit, what to do
    ├── StoreError                  the event store
    │   ├── ConcurrencyError        expected version did not match
    │   ├── IdempotencyError        a command id reused for another command
    │   ├── SchemaError             the database schema is behind or unknown
    │   ├── UnknownEventError       an event type or schema version nobody knows
    │   ├── SlotTaken               a network slot is held by another sandbox
    │   └── DatabaseError           a driver error, translated, cause chained
    ├── LifecycleError              the state machine
    │   ├── SandboxNotFound
    │   ├── InvalidTransition       command not allowed in the current state
    │   ├── SandboxBusy             another command holds the sandbox
    │   ├── NotOwner                another host owns the sandbox
    │   ├── CommandFailed           a pipeline step failed (after undo)
    │   ├── PipelineError           an edit to a pipeline was not possible
    │   └── WaitTimeout             wait() gave up
    ├── HostError                   side effects on the host
    │   ├── HostCommandError        an external command failed
    │   ├── ResourceBusy            a name or slot is taken on the host
    │   ├── VmmError                the VMM API answered with an error
    │   └── InsufficientSpace       not enough free disk space
    ├── FailpointError              an injected failure (tests and drills)
    └── CliError                    bad command-line input (wrenn_engine.cli)
"""

from __future__ import annotations

from collections.abc import Sequence


class WrennError(Exception):
    """Root of every error raised by wrenn_engine on purpose."""


class ConfigError(WrennError):
    """A configuration value is missing or out of its limits.

    ``field`` names the offending field, ``limit`` states what is allowed,
    and ``hint`` says what to do about it.
    """

    def __init__(self, field: str, problem: str, limit: str = "", hint: str = ""):
        self.field = field
        self.problem = problem
        self.limit = limit
        self.hint = hint
        parts = [f"{field}: {problem}"]
        if limit:
            parts.append(f"allowed: {limit}")
        if hint:
            parts.append(hint)
        super().__init__("; ".join(parts))


# --- store ------------------------------------------------------------------


class StoreError(WrennError):
    """Something went wrong in the event store."""


class ConcurrencyError(StoreError):
    """An append expected a stream version that is no longer current."""

    def __init__(self, stream_id: str, expected: int, actual: int):
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"sandbox {stream_id}: expected version {expected} but the stream is at "
            f"{actual}; another command changed it first. Re-read the sandbox and "
            "retry if the command still makes sense."
        )


class IdempotencyError(StoreError):
    """A command id was reused for a different command or sandbox."""

    def __init__(self, command_id: str, recorded: str, given: str):
        self.command_id = command_id
        self.recorded = recorded
        self.given = given
        super().__init__(
            f"command id {command_id!r} was already used for {recorded}, not "
            f"{given}; use a fresh command id for a new command."
        )


class SchemaError(StoreError):
    """The database schema is not at the revision this code needs."""

    def __init__(self, url: str, current: str | None, head: str):
        self.url = url
        self.current = current
        self.head = head
        where = current or "no schema"
        super().__init__(
            f"database {url} is at {where}, this wrenn-engine needs {head}; "
            f"run `wrenn-engine --db {url} db upgrade` to bring it up to date."
        )


class UnknownEventError(StoreError):
    """A stored event has a type or schema version that no code understands."""

    def __init__(self, stream_id: str, version: int, event_type: str, schema: int):
        self.stream_id = stream_id
        self.version = version
        self.event_type = event_type
        self.schema_version = schema
        super().__init__(
            f"sandbox {stream_id} version {version}: event type {event_type!r} "
            f"schema {schema} is not known to this wrenn-engine; upgrade "
            "wrenn-engine or register an upcaster for it. Nothing was skipped."
        )


class SlotTaken(StoreError):
    """A network slot was claimed by another sandbox in the meantime."""

    def __init__(self, host_id: str, slot: int, holder: str):
        self.host_id = host_id
        self.slot = slot
        self.holder = holder
        super().__init__(
            f"network slot {slot} on host {host_id} is held by sandbox {holder}; "
            "pick another slot (the engine retries with the next free one)."
        )


class DatabaseError(StoreError):
    """A database driver error, translated; the original is ``__cause__``."""

    def __init__(self, operation: str, detail: str):
        self.operation = operation
        self.detail = detail
        super().__init__(
            f"database error during {operation}: {detail}. Check that the "
            "database is reachable, that its disk has free space, and that its "
            "schema is current (`wrenn-engine db current`)."
        )


# --- lifecycle ----------------------------------------------------------------


class LifecycleError(WrennError):
    """A lifecycle command could not be carried out."""


class SandboxNotFound(LifecycleError):
    def __init__(self, sandbox_id: str):
        self.sandbox_id = sandbox_id
        super().__init__(
            f"sandbox {sandbox_id} does not exist; `wrenn-engine ls` lists the "
            "sandboxes this database knows."
        )


class InvalidTransition(LifecycleError):
    def __init__(
        self, sandbox_id: str, command: str, state: str, allowed: Sequence[str] = ()
    ):
        self.sandbox_id = sandbox_id
        self.command = command
        self.state = state
        self.allowed = tuple(allowed)
        hint = (
            f" it is allowed from: {', '.join(self.allowed)}." if self.allowed else ""
        )
        super().__init__(f"sandbox {sandbox_id}: cannot {command} while {state};{hint}")


class SandboxBusy(LifecycleError):
    def __init__(self, sandbox_id: str, command: str, holder: str):
        self.sandbox_id = sandbox_id
        self.command = command
        self.holder = holder
        super().__init__(
            f"sandbox {sandbox_id}: cannot {command} now, {holder} is in progress; "
            "wait for it to finish (`wrenn-engine show` or Engine.wait) or pass "
            "wait=True."
        )


class NotOwner(LifecycleError):
    def __init__(self, sandbox_id: str, owner: str, me: str):
        self.sandbox_id = sandbox_id
        self.owner = owner
        self.me = me
        super().__init__(
            f"sandbox {sandbox_id} is owned by host {owner}, this engine is host "
            f"{me}; run the command on {owner}."
        )


class CommandFailed(LifecycleError):
    """A pipeline step failed; the sandbox is back where it started (its done
    steps undone) or in ``error`` with the cause."""

    def __init__(
        self,
        sandbox_id: str,
        step: str,
        landed_in: str,
        cause: str,
        rolled_back: bool = False,
    ):
        self.sandbox_id = sandbox_id
        self.step = step
        self.landed_in = landed_in
        self.cause = cause
        self.rolled_back = rolled_back
        if rolled_back:
            outcome = f"the steps before it were undone and the sandbox is {landed_in}"
        else:
            outcome = (
                f"the sandbox is {landed_in}; what it still holds is recorded "
                f"and `wrenn-engine destroy {sandbox_id}` removes it"
            )
        super().__init__(
            f"sandbox {sandbox_id}: step {step} failed: {cause}; {outcome}. "
            f"`wrenn-engine replay {sandbox_id} --explain` shows every step."
        )


class PipelineError(LifecycleError):
    def __init__(self, pipeline: str, problem: str):
        self.pipeline = pipeline
        super().__init__(f"pipeline {pipeline}: {problem}")


class WaitTimeout(LifecycleError):
    def __init__(
        self, sandbox_id: str, wanted: Sequence[str], state: str, timeout: float
    ):
        self.sandbox_id = sandbox_id
        self.wanted = tuple(wanted)
        self.state = state
        self.timeout = timeout
        super().__init__(
            f"sandbox {sandbox_id} did not reach {' or '.join(self.wanted)} within "
            f"{timeout:g}s (it is {state}); look at `wrenn-engine events "
            f"--sandbox {sandbox_id}`."
        )


# --- host ---------------------------------------------------------------------


class HostError(WrennError):
    """A side effect on the host failed."""


class HostCommandError(HostError):
    """An external command (nft, qemu-img, losetup, dmsetup) failed."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str):
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(
            f"`{' '.join(self.argv)}` exited {returncode}: {self.stderr or 'no output'}"
        )


class ResourceBusy(HostError):
    def __init__(self, kind: str, name: str, detail: str = ""):
        self.kind = kind
        self.name = name
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"{kind} {name} already exists on this host{extra}; run "
            "`wrenn-engine reconcile` to remove leftovers of crashed sandboxes."
        )


class VmmError(HostError):
    """The VMM API answered with an error, or did not answer."""

    def __init__(self, endpoint: str, status: int | None, detail: str):
        self.endpoint = endpoint
        self.status = status
        self.detail = detail
        code = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"VMM {endpoint}: {code}: {detail}")


class InsufficientSpace(HostError):
    def __init__(self, path: str, needed: int, available: int):
        self.path = path
        self.needed = needed
        self.available = available
        super().__init__(
            f"{path}: needs {needed} bytes free but only {available} are; free "
            "some space on that filesystem, or put the sandboxes (the run "
            "directory) on a larger one."
        )


class FailpointError(WrennError):
    """Raised by a failpoint whose action is ``error``."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"failpoint {name} fired (WRENN_ENGINE_FAILPOINTS)")
