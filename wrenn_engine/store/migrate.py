"""Schema migrations: Alembic, configured in code.

The revisions live in the top-level ``migrations/`` directory of the source
tree; a wheel carries them as ``wrenn_engine/_migrations``. No alembic.ini
is needed: ``alembic_config`` builds the configuration, and the database is
handed to ``migrations/env.py`` as a config attribute (so a password with a
``%`` never meets ConfigParser).

The CLI's ``wrenn-engine db upgrade|downgrade|current`` call these.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.pool import NullPool

from wrenn_engine.errors import SchemaError, StoreError
from wrenn_engine.store.schema import VERSION_TABLE
from wrenn_engine.store.sql import _translate, create_sql_engine, safe_url

logger = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent.parent

#: Alembic keeps the running migration in module globals (``alembic.context``,
#: ``alembic.op``), so two migrations in one process must not overlap; other
#: processes are kept apart by the database (see ``migrations/env.py``).
_ALEMBIC = threading.Lock()


def script_location() -> Path:
    """Where the revisions are: the wheel's copy first, then the source tree."""
    for candidate in (_PACKAGE / "_migrations", _PACKAGE.parent / "migrations"):
        if (candidate / "env.py").is_file() and (candidate / "versions").is_dir():
            return candidate
    raise StoreError(
        f"no migrations found beside {_PACKAGE}; reinstall wrenn-engine (the "
        "wheel carries them as wrenn_engine/_migrations)"
    )


def alembic_config(
    url: str | None = None, connection: sa.Connection | None = None
) -> Config:
    """An Alembic Config for ``url`` (or an open ``connection``)."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    if url is not None:
        config.attributes["url"] = url
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision this code needs."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise StoreError(f"no head revision in {script_location()}")
    return head


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at; None when it has no schema."""
    engine = create_sql_engine(url, poolclass=NullPool)
    try:
        with _translate("read schema revision"), engine.connect() as conn:
            return revision_of(conn)
    finally:
        engine.dispose()


def revision_of(connection: sa.Connection) -> str | None:
    """The revision of the database behind an open connection."""
    with _translate("read schema revision"):
        context = MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE}
        )
        return context.get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` up to ``revision``."""
    with _ALEMBIC, _translate(f"upgrade to {revision}"):
        command.upgrade(alembic_config(url), revision)
    logger.info("database %s upgraded to %s", safe_url(url), revision)


def upgrade_connection(connection: sa.Connection, revision: str = "head") -> None:
    """Upgrade through an open connection (an in-memory SQLite database)."""
    with _ALEMBIC, _translate(f"upgrade to {revision}"):
        command.upgrade(alembic_config(connection=connection), revision)


def downgrade(url: str, revision: str) -> None:
    """Take the schema at ``url`` down to ``revision`` (``base`` drops all)."""
    with _ALEMBIC, _translate(f"downgrade to {revision}"):
        command.downgrade(alembic_config(url), revision)
    logger.info("database %s downgraded to %s", safe_url(url), revision)


def check_schema(url: str) -> None:
    """Raise SchemaError unless the database at ``url`` is at the head."""
    current = current_revision(url)
    head = head_revision()
    if current != head:
        raise SchemaError(safe_url(url), current, head)
