"""The finance report: one row per charge of every case opened in a period, as CSV (the
CLI and the page) or JSON, safe to open in a spreadsheet."""

from __future__ import annotations

import csv
import io
import re
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain.cases.views import case_view
from models import DuplicateCase
from models.money import major_units


REPORT_COLUMNS = [
    "case_id",
    "case_status",
    "opened_at",
    "order_id",
    "order_total",
    "order_currency",
    "charge_id",
    "role",
    "charge_created_at",
    "charge_amount",
    "currency",
    "refunded",
    "held",
    "refund_ids",
    "refund_origin",
    "decision",
    "decided_by",
    "decided_at",
    "note",
    "review_reasons",
    "kind",
    # the reasons in words, as the page shows them (added after the columns above, which
    # keep their order)
    "reason_text",
]


def report_rows(session: Session, *, since: datetime, until: datetime | None) -> list[dict[str, str]]:
    """One row per charge of every case opened in ``[since, until)``; amounts in major
    units as decimal strings next to their currency (a spreadsheet reads them as numbers)."""
    where = [DuplicateCase.opened_at >= since]
    if until is not None:
        where.append(DuplicateCase.opened_at < until)
    rows: list[dict[str, str]] = []
    for case in session.scalars(select(DuplicateCase).where(*where).order_by(DuplicateCase.id)):
        view = case_view(session, case.id, compact=True)
        assert view is not None
        for charge in view["charges"]:
            currency = charge["currency"]
            rows.append(
                {
                    "case_id": str(case.id),
                    "case_status": case.status,
                    "opened_at": view["opened_at"] or "",
                    "order_id": case.order_id,
                    "order_total": major_units(view["order_amount"], view["order_currency"]) if view["order_amount"] is not None and view["order_currency"] else "",
                    "order_currency": (view["order_currency"] or "").upper(),
                    "charge_id": charge["id"],
                    "role": charge["role"],
                    "charge_created_at": charge["created_at"] or "",
                    "charge_amount": major_units(charge["amount"], currency),
                    "currency": currency.upper(),
                    "refunded": major_units(charge["refunded_amount"], currency),
                    "held": major_units(charge["held_amount"], currency),
                    "refund_ids": " ".join(r["id"] for r in charge["refunds"]),
                    "refund_origin": " ".join(sorted({r["origin"] for r in charge["refunds"]})),
                    "decision": case.decision or "",
                    "decided_by": case.decided_by or "",
                    "decided_at": view["decided_at"] or "",
                    "note": case.note or "",
                    "review_reasons": "; ".join(case.review_reasons or []),
                    "kind": case.kind,
                    "reason_text": view["reason_text"],
                }
            )
    return rows


_PLAIN_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def spreadsheet_safe(text: str) -> str:
    """A cell starting with = + - @ (or a tab or CR) is a formula to a spreadsheet (CSV
    injection): prefixed with ``'`` so it is shown as text. A plain number is left alone."""
    if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def report_csv(rows: list[dict[str, str]]) -> str:
    """The report as CSV text (header row first), as the CLI prints it and the page serves it."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=REPORT_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    # Every cell, whatever its column: ids and names come from Stripe events and people.
    writer.writerows({key: spreadsheet_safe(str(value)) for key, value in row.items()} for row in rows)
    return out.getvalue()
