"""Index events by correlation id, for following one request across sandboxes.

Revision ID: 0002
Revises: 0001
Create Date: 2024-06-15

Keeps every row in both directions: the downgrade drops only the index.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_events_correlation_position", "events", ["correlation_id", "position"]
    )


def downgrade() -> None:
    op.drop_index("ix_events_correlation_position", table_name="events")
