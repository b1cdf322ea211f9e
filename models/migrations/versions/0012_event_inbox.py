"""ingest v2: stripe_events becomes the inbox the applier drains

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

_PENDING = "status IN ('received', 'failed')"


def upgrade() -> None:
    with op.batch_alter_table('stripe_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('applied_at', sa.DateTime(timezone=True), nullable=True))
        # Nothing queries these; every insert on the accept path paid for them.
        batch_op.drop_index('ix_stripe_events_type')
        batch_op.drop_index('ix_stripe_events_object_id')
    # Events stored before the inbox were applied in the transaction that stored them.
    op.execute("UPDATE stripe_events SET status = 'applied', applied_at = received_at WHERE status = 'processed'")
    op.create_index(
        'ix_stripe_events_inbox', 'stripe_events', ['created', 'event_id'], unique=False,
        postgresql_where=sa.text(_PENDING), sqlite_where=sa.text(_PENDING),
    )
    op.create_table('applier_heartbeats',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('beat_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('applied', sa.BigInteger(), nullable=False),
    sa.Column('failed', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_applier_heartbeats'))
    )


def downgrade() -> None:
    op.drop_table('applier_heartbeats')
    op.drop_index('ix_stripe_events_inbox', table_name='stripe_events')
    # An event not applied yet cannot be told from an applied one in the old schema:
    # downgrading with a backlog would lose it, so refuse.
    pending = op.get_bind().execute(sa.text(f"SELECT count(*) FROM stripe_events WHERE {_PENDING}")).scalar()
    if pending:
        raise RuntimeError(f"{pending} events are not applied yet; let the applier drain the inbox first")
    op.execute("UPDATE stripe_events SET status = 'processed' WHERE status = 'applied'")
    with op.batch_alter_table('stripe_events', schema=None) as batch_op:
        batch_op.create_index('ix_stripe_events_object_id', ['object_id'], unique=False)
        batch_op.create_index('ix_stripe_events_type', ['type'], unique=False)
        batch_op.drop_column('applied_at')
        batch_op.drop_column('next_attempt_at')
        batch_op.drop_column('attempts')
