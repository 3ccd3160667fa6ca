"""The event log, command ids and the projections.

Revision ID: 0001
Revises:
Create Date: 2024-06-01

Written by hand and frozen: later changes go into new revisions, never here.
Types are spelled out (not imported from ``wrenn_engine.store.schema``) so
that this revision keeps producing the same schema when the code moves on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("position", POSITION, primary_key=True, autoincrement=True),
        sa.Column("stream_id", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("type", sa.String(128), nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("host_id", sa.String(255), nullable=True),
        sa.Column("command_id", sa.String(255), nullable=True),
        sa.Column("correlation_id", sa.String(255), nullable=True),
        sa.Column("causation_id", sa.String(255), nullable=True),
        sa.Column("recorded_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("position", name="pk_events"),
        sa.UniqueConstraint("stream_id", "version", name="uq_events_stream_version"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_events_type_position", "events", ["type", "position"])
    op.create_index("ix_events_actor_position", "events", ["actor", "position"])
    op.create_index("ix_events_host_position", "events", ["host_id", "position"])
    op.create_index("ix_events_recorded_at", "events", ["recorded_at"])

    op.create_table(
        "commands",
        sa.Column("command_id", sa.String(255), nullable=False),
        sa.Column("stream_id", sa.String(128), nullable=False),
        sa.Column("command", sa.String(128), nullable=False),
        sa.Column("first_position", sa.BigInteger, nullable=False),
        sa.Column("last_position", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("command_id", name="pk_commands"),
    )
    op.create_index("ix_commands_stream_id", "commands", ["stream_id"])

    op.create_table(
        "sandboxes",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("host_id", sa.String(255), nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", TIME, nullable=True),
        sa.Column("updated_at", TIME, nullable=True),
        sa.Column("config_summary", JSON, nullable=False),
        sa.Column("snapshot", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sandboxes"),
    )
    op.create_index("ix_sandboxes_state", "sandboxes", ["state"])
    op.create_index("ix_sandboxes_host_id", "sandboxes", ["host_id"])

    op.create_table(
        "network_slots",
        sa.Column("host_id", sa.String(255), nullable=False),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("sandbox_id", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("host_id", "slot", name="pk_network_slots"),
        sa.ForeignKeyConstraint(
            ["sandbox_id"], ["sandboxes.id"], name="fk_network_slots_sandbox"
        ),
    )
    op.create_index("ix_network_slots_sandbox_id", "network_slots", ["sandbox_id"])

    op.create_table(
        "resources",
        sa.Column("sandbox_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("host_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("sandbox_id", "kind", "name", name="pk_resources"),
        sa.ForeignKeyConstraint(
            ["sandbox_id"], ["sandboxes.id"], name="fk_resources_sandbox"
        ),
    )
    op.create_index("ix_resources_host_id", "resources", ["host_id"])


def downgrade() -> None:
    op.drop_table("resources")
    op.drop_table("network_slots")
    op.drop_table("sandboxes")
    op.drop_table("commands")
    op.drop_table("events")
