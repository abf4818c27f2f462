"""The usage tables: three rollups, the applied windows, the rollup marks.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

KEY_TEXT = ("namespace", "policy", "client", "tier", "endpoint", "outcome", "status")
COUNTERS = ("requests", "tokens", "latency_sum_us", "latency_count", "bytes_in", "bytes_out",
            "latency_max_us")
HISTOGRAM = tuple(f"h{i:02d}" for i in range(36))


def upgrade() -> None:
    # Written out, not imported from schema.py: a revision is what the schema WAS at that
    # revision, whatever schema.py says later (tests/analytics/test_migrations.py checks that
    # head equals schema.py).
    for name in ("minute", "hour", "day"):
        table = f"usage_{name}"
        op.create_table(
            table,
            sa.Column("ts", sa.BigInteger, primary_key=True, autoincrement=False),
            *(sa.Column(k, sa.String(256), primary_key=True) for k in KEY_TEXT),
            *(sa.Column(c, sa.BigInteger, nullable=False) for c in COUNTERS),
            *(sa.Column(c, sa.BigInteger, nullable=True) for c in HISTOGRAM),
        )
        op.create_index(f"ix_{table}_ns_ts", table, ["namespace", "ts"])
        op.create_index(f"ix_{table}_client_ts", table, ["client", "ts"])
        op.create_index(f"ix_{table}_endpoint_ts", table, ["namespace", "endpoint", "ts"])
    op.create_table(
        "usage_applied",
        sa.Column("src", sa.String(256), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("end_s", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_usage_applied_end_s", "usage_applied", ["end_s"])
    op.create_table(
        "usage_rollups",
        sa.Column("target", sa.String(16), primary_key=True),
        sa.Column("done_until", sa.BigInteger, nullable=False),
        sa.Column("runs", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    for table in ("usage_rollups", "usage_applied", "usage_day", "usage_hour", "usage_minute"):
        op.drop_table(table)
