"""checkout sessions: the order a Checkout Session names, for its PaymentIntent and charges

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'checkout_sessions',
        sa.Column('id', sa.String(length=255), nullable=False),
        sa.Column('order_id', sa.String(length=255), nullable=True),
        sa.Column('payment_intent_id', sa.String(length=255), nullable=True),
        sa.Column('account', sa.String(length=255), nullable=True),
        sa.Column('livemode', sa.Boolean(), nullable=False),
        sa.Column('mode', sa.String(length=16), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('payment_status', sa.String(length=24), nullable=False),
        sa.Column('payment_failed', sa.Boolean(), server_default='false', nullable=False),
        sa.Column('amount_total', sa.BigInteger(), nullable=True),
        sa.Column('currency', sa.String(length=3), nullable=True),
        sa.Column('client_reference_id', sa.String(length=255), nullable=True),
        sa.Column('payment_link', sa.String(length=255), nullable=True),
        sa.Column('customer', sa.String(length=255), nullable=True),
        sa.Column('created', sa.BigInteger(), nullable=False),
        sa.Column('expires_at', sa.BigInteger(), nullable=True),
        sa.Column('last_event_created', sa.BigInteger(), nullable=False),
        sa.Column('first_seen_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['order_id'], ['orders.id'], name=op.f('fk_checkout_sessions_order_id_orders')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_checkout_sessions')),
    )
    with op.batch_alter_table('checkout_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_checkout_sessions_order_id'), ['order_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_checkout_sessions_payment_intent_id'), ['payment_intent_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('checkout_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_checkout_sessions_payment_intent_id'))
        batch_op.drop_index(batch_op.f('ix_checkout_sessions_order_id'))
    op.drop_table('checkout_sessions')
