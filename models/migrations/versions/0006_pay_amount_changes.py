"""pay endpoint: a live PaymentIntent's amount change (update or cancel) in flight

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('payment_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('change_key', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('change_amount', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('change_claimed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('change_count', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('payment_attempts', schema=None) as batch_op:
        batch_op.drop_column('change_count')
        batch_op.drop_column('change_claimed_at')
        batch_op.drop_column('change_amount')
        batch_op.drop_column('change_key')
