"""case lifecycle: case kind, the state a dismissal was made for, escalation, attempt action

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('duplicate_cases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='duplicate', nullable=False))
        batch_op.add_column(sa.Column('dismissed_state', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('escalation', sa.Text(), nullable=True))
    with op.batch_alter_table('refund_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('action', sa.String(length=16), server_default='refund', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('refund_attempts', schema=None) as batch_op:
        batch_op.drop_column('action')
    with op.batch_alter_table('duplicate_cases', schema=None) as batch_op:
        batch_op.drop_column('escalation')
        batch_op.drop_column('dismissed_state')
        batch_op.drop_column('kind')
