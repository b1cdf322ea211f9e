"""Reconciliation state: duplicate cases, refund attempts, runs, the run lease, alerts sent,
and the audit log.

(Filled in by the reconciliation work.)
"""

from __future__ import annotations
