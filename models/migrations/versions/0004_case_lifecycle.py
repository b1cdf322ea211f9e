"""case lifecycle: case kind, the state a dismissal was made for, escalation, attempt action, released authorisations

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
    with op.batch_alter_table('charges', schema=None) as batch_op:
        batch_op.add_column(sa.Column('released', sa.Boolean(), server_default='false', nullable=False))
        batch_op.create_index(
            'ix_charges_unreleased_authorizations', ['order_id'], unique=False,
            sqlite_where=sa.text("status = 'succeeded' AND captured = 0 AND released = 0"),
            postgresql_where=sa.text("status = 'succeeded' AND NOT captured AND NOT released"),
        )
    # An authorisation already released by a refund (API versions before 2025-03-31)
    op.execute("UPDATE charges SET released = true WHERE captured = false AND status = 'succeeded' AND reported_refunded >= amount")


def downgrade() -> None:
    with op.batch_alter_table('charges', schema=None) as batch_op:
        batch_op.drop_index('ix_charges_unreleased_authorizations')
        batch_op.drop_column('released')
    with op.batch_alter_table('refund_attempts', schema=None) as batch_op:
        batch_op.drop_column('action')
    with op.batch_alter_table('duplicate_cases', schema=None) as batch_op:
        batch_op.drop_column('escalation')
        batch_op.drop_column('dismissed_state')
        batch_op.drop_column('kind')
