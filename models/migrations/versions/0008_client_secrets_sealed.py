"""client secrets at rest: sealed column on payment_attempts, clear ones dropped

PaymentIntent client_secrets were kept in clear in ``payment_attempts.client_secret`` and
in the stored replies of ``idempotency_keys``. The column becomes
``client_secret_sealed`` (written by the app, sealed with a key derived from
SECRET_KEY); the clear values are dropped, not carried over: a migration does not hold
SECRET_KEY, and the pay endpoint reads a missing client_secret again from Stripe. Stored
replies keep their shape with ``client_secret`` set to null, which the replay fills in
from Stripe.

Downgrade restores the column empty (secrets are not decrypted back into clear).

Revision ID: 0008
Revises: 0007 (to be rebased onto 0007 when it lands)
Create Date: 2026-12-01
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

_keys = sa.table(
    'idempotency_keys',
    sa.column('id', sa.Integer()),
    sa.column('response_body', sa.Text()),
)


def upgrade() -> None:
    with op.batch_alter_table('payment_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('client_secret_sealed', sa.String(length=512), nullable=True))
        batch_op.drop_column('client_secret')
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(_keys.c.id, _keys.c.response_body).where(_keys.c.response_body.like('%client_secret%'))
    ).all()
    for row_id, body in rows:
        try:
            reply = json.loads(body)
        except ValueError:
            continue
        if isinstance(reply, dict) and isinstance(reply.get('client_secret'), str):
            reply['client_secret'] = None
            connection.execute(
                sa.update(_keys).where(_keys.c.id == row_id).values(response_body=json.dumps(reply))
            )


def downgrade() -> None:
    with op.batch_alter_table('payment_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('client_secret', sa.String(length=512), nullable=True))
        batch_op.drop_column('client_secret_sealed')
