"""An index for "who is limited now": the minute table by outcome, then time.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_usage_minute_outcome_ts", "usage_minute", ["outcome", "ts"])


def downgrade() -> None:
    op.drop_index("ix_usage_minute_outcome_ts", table_name="usage_minute")
