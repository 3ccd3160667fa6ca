"""The Engine facade: commands, queries, wait, reconcile and workers."""

from wrenn_engine.engine.core import Engine, new_sandbox_id
from wrenn_engine.engine.settings import EngineSettings

__all__ = ["Engine", "EngineSettings", "new_sandbox_id"]
