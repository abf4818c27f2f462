"""The near-limit alerts sent, one row per (policy, alert, client, period): their deduplication.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_alerts",
        sa.Column("policy", sa.String(256), primary_key=True),
        sa.Column("alert", sa.String(63), primary_key=True),
        sa.Column("client", sa.String(256), primary_key=True),
        sa.Column("period_start", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("tier", sa.String(256), nullable=False),
        sa.Column("used", sa.BigInteger, nullable=False),
        sa.Column("allowance", sa.BigInteger, nullable=False),
        sa.Column("sent_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_usage_alerts_period_start", "usage_alerts", ["period_start"])


def downgrade() -> None:
    op.drop_index("ix_usage_alerts_period_start", table_name="usage_alerts")
    op.drop_table("usage_alerts")
