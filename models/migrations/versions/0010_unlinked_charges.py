"""unlinked charges: card fingerprint and description on charges, indexes to group them

Charges that name no order are grouped by card fingerprint (or customer), amount and
currency in time (the "possible duplicate, no order" review signal, case kind
``unlinked``). Existing rows keep NULL until a later event or backfill reads them again.

Revision ID: 0010
Revises: 0009 (to be rechained after 0009 when it lands)
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('charges', schema=None) as batch_op:
        batch_op.add_column(sa.Column('card_fingerprint', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('description', sa.Text(), nullable=True))
    op.create_index(
        'ix_charges_fingerprint_amount', 'charges', ['card_fingerprint', 'currency', 'amount', 'created'], unique=False
    )
    op.create_index('ix_charges_customer_amount', 'charges', ['customer', 'currency', 'amount', 'created'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_charges_customer_amount', table_name='charges')
    op.drop_index('ix_charges_fingerprint_amount', table_name='charges')
    with op.batch_alter_table('charges', schema=None) as batch_op:
        batch_op.drop_column('description')
        batch_op.drop_column('card_fingerprint')
