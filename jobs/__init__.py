"""Scheduled work (reconciliation, backfill, refunds, alerts) as plain functions taking their
dependencies. Never imports Flask. The reconciliation job arrives with its own issue."""
