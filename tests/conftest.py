"""Shared test guards and fixtures.

Guards skip with a reason on a developer's machine but *fail* in CI
(``CI=true``), so a CI run can never pass by skipping what it must run:
PostgreSQL, root, the system tools. Guards for what this workplace cannot
have at all (device-mapper, the real cloud-hypervisor binary) always skip.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DEFAULT_PG_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"


def skip_or_fail(reason: str) -> None:
    """Skip locally; in CI a missing prerequisite is a failure."""
    if IN_CI:
        pytest.fail(f"CI requires this test to run: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root to create namespaces, links and loop devices")


def require_tool(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            skip_or_fail(f"needs `{name}` on PATH (make system-deps installs it)")


def unique(prefix: str = "t") -> str:
    """A short name no other test (or test run) uses: prefix + 6 hex digits."""
    return f"{prefix}{uuid.uuid4().hex[:6]}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import sqlalchemy as sa

    base = os.environ.get("WRENN_TEST_PG_URL", DEFAULT_PG_URL)
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"wrenn_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        skip_or_fail(f"PostgreSQL at {base} is not reachable: {exc.orig}")
    url = (
        sa.engine.make_url(base)
        .set(database=name)
        .render_as_string(hide_password=False)
    )
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path / 'engine.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:  # type: ignore[no-untyped-def]
    """Run a test once on SQLite (a file) and once on the real PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))
