"""What every CLI command shares: its error, the database URL, times, output.

Times on the command line are ISO 8601 with an explicit UTC offset
(``2024-05-01T12:00:00Z``, ``2024-05-01T14:00:00+02:00``). A time without
an offset is refused: which zone it meant cannot be known, and an audit
query that silently picks one gives wrong answers. Times printed are UTC.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from wrenn_engine import settings
from wrenn_engine.errors import WrennError


class CliError(WrennError):
    """A command-line request that cannot be carried out as given.

    The message says what to do instead; the CLI prints it on one line and
    exits with status 1.
    """


# --- the database ---------------------------------------------------------------------


def db_url(args: argparse.Namespace) -> str | None:
    """``--db``, else ``$WRENN_ENGINE_DB``, else None (the embedded default)."""
    given = getattr(args, "db", None) or os.environ.get("WRENN_ENGINE_DB") or None
    if given:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(given)
        except ArgumentError as exc:
            raise CliError(
                f"--db {given!r} is not a database URL; use e.g. "
                "sqlite:////var/lib/wrenn-engine/engine.db or "
                "postgresql+psycopg://user@host/db"
            ) from exc
    return given


def resolved_db_url(args: argparse.Namespace) -> str:
    """The URL the store will open: the embedded SQLite file when none is given."""
    return db_url(args) or settings.default_db_url()


def is_embedded(args: argparse.Namespace) -> bool:
    return db_url(args) is None


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and ``sqlite://``)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


# --- who is acting --------------------------------------------------------------------


def default_actor() -> str:
    """``cli:<user>``; under sudo the user who ran sudo."""
    user = os.environ.get("SUDO_USER")
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
    return f"cli:{user}"


# --- times ----------------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    """An ISO 8601 time with a UTC offset (argparse ``type``)."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time; write e.g. 2024-05-01T12:00:00Z "
            "or 2024-05-01T14:00:00+02:00"
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no UTC offset; add one (Z for UTC, or e.g. +02:00), "
            "because a time without an offset is ambiguous"
        )
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is outside the years 1 to 9999 once moved to UTC"
        ) from None
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    if value > 2**63 - 1:
        raise argparse.ArgumentTypeError(f"{text} is larger than any position")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def utc_text(value: datetime | str | None) -> str:
    """A time as printed in tables: UTC, milliseconds, ``Z``."""
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


# --- output ---------------------------------------------------------------------------


def out() -> TextIO:
    """Standard output, looked up at call time (tests swap it)."""
    return sys.stdout


def err() -> TextIO:
    return sys.stderr


def emit(line: str = "") -> None:
    print(line, file=out())


def note(line: str) -> None:
    """A line for the person at the terminal, never for a script: stderr."""
    print(line, file=err())


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def dumps(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(value, default=json_default, indent=indent, sort_keys=False)


def emit_json(value: Any) -> None:
    """One JSON document on stdout, indented for people, parseable by tools."""
    emit(dumps(value, indent=2))


def emit_jsonl(value: Any) -> None:
    """One JSON document on one line (``--jsonl`` streams)."""
    out().write(dumps(value) + "\n")
    out().flush()


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()
) -> list[str]:
    """Rows as aligned text columns; ``right`` lists right-aligned columns."""
    cells = [[str(h) for h in headers]] + [
        ["-" if c is None else str(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = []
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            if i in right:
                parts.append(cell.rjust(widths[i]))
            else:
                parts.append(cell if last else cell.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
    return lines


def one_line(text: str) -> str:
    """Collapse whitespace so an error prints on a single line."""
    return " ".join(str(text).split())
