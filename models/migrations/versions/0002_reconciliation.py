"""reconciliation: duplicate cases, refund attempts, runs, lease, alerts, audit log

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('alerts_sent',
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('channels', sa.JSON(), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_alerts_sent'))
    )
    op.create_table('reconciliation_runs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('full', sa.Boolean(), nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('backfill_from', sa.BigInteger(), nullable=True),
    sa.Column('watermark', sa.BigInteger(), nullable=True),
    sa.Column('counts', sa.JSON(), nullable=False),
    sa.Column('errors', sa.JSON(), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reconciliation_runs'))
    )
    op.create_table('run_leases',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('holder', sa.String(length=255), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_run_leases'))
    )
    op.create_table('duplicate_cases',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('order_id', sa.String(length=255), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('keeper_charge_id', sa.String(length=255), nullable=False),
    sa.Column('order_amount', sa.BigInteger(), nullable=True),
    sa.Column('currency', sa.String(length=3), nullable=True),
    sa.Column('excess', sa.JSON(), nullable=False),
    sa.Column('review_reasons', sa.JSON(), nullable=False),
    sa.Column('automatic', sa.Boolean(), nullable=False),
    sa.Column('decision', sa.String(length=16), nullable=True),
    sa.Column('decided_by', sa.String(length=255), nullable=True),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('failure', sa.Text(), nullable=True),
    sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('opened_by_run_id', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], name=op.f('fk_duplicate_cases_order_id_orders')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_duplicate_cases'))
    )
    with op.batch_alter_table('duplicate_cases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_duplicate_cases_order_id'), ['order_id'], unique=False)
        batch_op.create_index('ix_duplicate_cases_status_opened', ['status', 'opened_at'], unique=False)
        batch_op.create_index('uq_duplicate_cases_active_order', ['order_id'], unique=True, sqlite_where=sa.text("status IN ('open', 'refunding', 'failed')"), postgresql_where=sa.text("status IN ('open', 'refunding', 'failed')"))

    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=255), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('case_id', sa.Integer(), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['duplicate_cases.id'], name=op.f('fk_audit_log_case_id_duplicate_cases')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_case_id'), ['case_id'], unique=False)

    op.create_table('case_charges',
    sa.Column('case_id', sa.Integer(), nullable=False),
    sa.Column('charge_id', sa.String(length=255), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('held', sa.BigInteger(), nullable=False),
    sa.Column('proposed_refund', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['duplicate_cases.id'], name=op.f('fk_case_charges_case_id_duplicate_cases')),
    sa.PrimaryKeyConstraint('case_id', 'charge_id', name=op.f('pk_case_charges'))
    )
    op.create_table('refund_attempts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=False),
    sa.Column('charge_id', sa.String(length=255), nullable=False),
    sa.Column('n', sa.Integer(), nullable=False),
    sa.Column('case_id', sa.Integer(), nullable=True),
    sa.Column('order_id', sa.String(length=255), nullable=True),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('origin', sa.String(length=16), nullable=False),
    sa.Column('requested_by', sa.String(length=255), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('refund_id', sa.String(length=255), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('calls', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['duplicate_cases.id'], name=op.f('fk_refund_attempts_case_id_duplicate_cases')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_refund_attempts')),
    sa.UniqueConstraint('charge_id', 'n', name=op.f('uq_refund_attempts_charge_id')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_refund_attempts_idempotency_key')),
    sa.UniqueConstraint('refund_id', name=op.f('uq_refund_attempts_refund_id'))
    )
    with op.batch_alter_table('refund_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_refund_attempts_case_id'), ['case_id'], unique=False)
        batch_op.create_index('ix_refund_attempts_case_status', ['case_id', 'status'], unique=False)
        batch_op.create_index(batch_op.f('ix_refund_attempts_charge_id'), ['charge_id'], unique=False)

    with op.batch_alter_table('charges', schema=None) as batch_op:
        batch_op.create_index('ix_charges_updated_at', ['updated_at'], unique=False)

    with op.batch_alter_table('disputes', schema=None) as batch_op:
        batch_op.create_index('ix_disputes_updated_at', ['updated_at'], unique=False)

    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.create_index('ix_orders_updated_at', ['updated_at'], unique=False)

    with op.batch_alter_table('refunds', schema=None) as batch_op:
        batch_op.create_index('ix_refunds_updated_at', ['updated_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('refunds', schema=None) as batch_op:
        batch_op.drop_index('ix_refunds_updated_at')

    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.drop_index('ix_orders_updated_at')

    with op.batch_alter_table('disputes', schema=None) as batch_op:
        batch_op.drop_index('ix_disputes_updated_at')

    with op.batch_alter_table('charges', schema=None) as batch_op:
        batch_op.drop_index('ix_charges_updated_at')

    with op.batch_alter_table('refund_attempts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_refund_attempts_charge_id'))
        batch_op.drop_index('ix_refund_attempts_case_status')
        batch_op.drop_index(batch_op.f('ix_refund_attempts_case_id'))

    op.drop_table('refund_attempts')
    op.drop_table('case_charges')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_case_id'))
        batch_op.drop_index(batch_op.f('ix_audit_log_at'))

    op.drop_table('audit_log')
    with op.batch_alter_table('duplicate_cases', schema=None) as batch_op:
        batch_op.drop_index('uq_duplicate_cases_active_order', sqlite_where=sa.text("status IN ('open', 'refunding', 'failed')"), postgresql_where=sa.text("status IN ('open', 'refunding', 'failed')"))
        batch_op.drop_index('ix_duplicate_cases_status_opened')
        batch_op.drop_index(batch_op.f('ix_duplicate_cases_order_id'))

    op.drop_table('duplicate_cases')
    op.drop_table('run_leases')
    op.drop_table('reconciliation_runs')
    op.drop_table('alerts_sent')
