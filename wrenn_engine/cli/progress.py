"""The engine's log lines on stderr while a command works."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from wrenn_engine.cli.common import err


class _ProgressHandler(logging.Handler):
    """Prints the engine's log lines on stderr, looked up at emit time."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.levelno >= logging.WARNING:
                text = f"{record.levelname.lower()}: {text}"
            print(f"  {text}", file=err(), flush=True)
        except Exception:
            self.handleError(record)


@contextmanager
def progress(verbose: bool, debug: bool, tty_info: bool = True) -> Iterator[None]:
    """Show the engine's step lines on stderr when it is a terminal.

    Always shows warnings; info lines ("sandbox X: start: vm.boot done") with
    ``--verbose``, or when stderr is a TTY and ``tty_info``; everything with
    ``--debug``.
    """
    logger = logging.getLogger("wrenn_engine")
    if debug:
        level = logging.DEBUG
    elif verbose or (tty_info and _isatty(err())):
        level = logging.INFO
    else:
        level = logging.WARNING
    handler = _ProgressHandler(level)
    saved_level, saved_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate


def _isatty(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):
        return False
