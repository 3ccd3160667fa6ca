"""Where the engine keeps its state, and which database it uses.

Read from the environment, with the defaults the docs promise:

- ``WRENN_ENGINE_HOME``: the state directory; ``/var/lib/wrenn-engine`` for
  root, ``~/.local/state/wrenn-engine`` otherwise.
- ``WRENN_ENGINE_DB``: a SQLAlchemy URL; by default the SQLite file
  ``engine.db`` in the state directory. A ``postgresql+psycopg://`` URL
  chooses PostgreSQL.
- ``WRENN_ENGINE_HOST_ID``: this host's id in a shared database; by default
  the machine's hostname.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def state_dir() -> Path:
    configured = os.environ.get("WRENN_ENGINE_HOME")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/var/lib/wrenn-engine")
    return Path.home() / ".local" / "state" / "wrenn-engine"


def default_db_url() -> str:
    return os.environ.get("WRENN_ENGINE_DB") or f"sqlite:///{state_dir() / 'engine.db'}"


def host_id() -> str:
    return os.environ.get("WRENN_ENGINE_HOST_ID") or socket.gethostname()
