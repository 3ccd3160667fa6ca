"""Mark where event times are in position order, for audit queries by time.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

From this revision on, an append takes the later of its clock and the last
event's ``recorded_at``, so times never decrease in position order and a time
range can be answered as a range of positions. A log written before may go
back in time (a clock stepped back, hosts whose clocks disagree): the upgrade
finds the last place where it does and records the position before it as
``log_marks['times_ordered_after']``; queries filter the events up to there by
their times, as before. Keeps every event in both directions: the downgrade
drops only the marks.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The position just before the last event whose time is earlier than the
#: time of the event before it (NULL if times never go back).
LAST_DISORDER = """
SELECT max(previous_position) FROM (
    SELECT recorded_at,
        lag(recorded_at) OVER (ORDER BY position) AS previous_time,
        lag(position) OVER (ORDER BY position) AS previous_position
    FROM events
) AS pairs
WHERE recorded_at < previous_time
"""


def upgrade() -> None:
    marks = op.create_table(
        "log_marks",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_log_marks"),
    )
    ordered_after = op.get_bind().execute(sa.text(LAST_DISORDER)).scalar()
    op.bulk_insert(
        marks, [{"name": "times_ordered_after", "position": ordered_after or 0}]
    )


def downgrade() -> None:
    op.drop_table("log_marks")
