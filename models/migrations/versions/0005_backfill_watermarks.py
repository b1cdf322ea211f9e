"""backfill watermarks: one Stripe ``created`` watermark per backfill listing on each run

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: runs recorded before this revision have only ``watermark``, and the next
    # pass reads it as the watermark of every listing.
    with op.batch_alter_table('reconciliation_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('watermarks', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('reconciliation_runs', schema=None) as batch_op:
        batch_op.drop_column('watermarks')
