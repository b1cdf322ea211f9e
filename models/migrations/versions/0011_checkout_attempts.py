"""checkout endpoint: Checkout Session attempts (one live per order)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

_LIVE = "status IN ('creating', 'unknown', 'open', 'complete')"


def upgrade() -> None:
    op.create_table('checkout_attempts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('order_id', sa.String(length=255), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('success_url', sa.String(length=2048), nullable=False),
    sa.Column('cancel_url', sa.String(length=2048), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.Column('session_id', sa.String(length=255), nullable=True),
    sa.Column('url', sa.Text(), nullable=True),
    sa.Column('payment_status', sa.String(length=32), nullable=True),
    sa.Column('calls', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('expire_key', sa.String(length=255), nullable=True),
    sa.Column('expire_claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('expire_count', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], name=op.f('fk_checkout_attempts_order_id_orders')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_checkout_attempts')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_checkout_attempts_idempotency_key')),
    sa.UniqueConstraint('order_id', 'attempt', name='uq_checkout_attempts_order_attempt'),
    sa.UniqueConstraint('session_id', name=op.f('uq_checkout_attempts_session_id'))
    )
    with op.batch_alter_table('checkout_attempts', schema=None) as batch_op:
        # At most one live Checkout attempt per order: the backstop behind the lock.
        batch_op.create_index(
            'uq_checkout_attempts_one_live_per_order', ['order_id'], unique=True,
            sqlite_where=sa.text(_LIVE), postgresql_where=sa.text(_LIVE),
        )


def downgrade() -> None:
    with op.batch_alter_table('checkout_attempts', schema=None) as batch_op:
        batch_op.drop_index('uq_checkout_attempts_one_live_per_order', sqlite_where=sa.text(_LIVE), postgresql_where=sa.text(_LIVE))
    op.drop_table('checkout_attempts')
