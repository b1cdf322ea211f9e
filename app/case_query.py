"""The review queue's query string (``status``, ``currency``, ``from``, ``until``,
``reason``, ``amount_min``, ``amount_max``, ``sort``, ``dir``, ``page``, ``per_page``)
read into a :class:`~domain.cases.views.CaseFilter`, for the page and the JSON API."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from typing import Any

from domain.bounds import DateParamError, parse_day
from domain.cases.reasons import REASON_KINDS
from domain.cases.review import CaseActionError
from domain.cases.views import SORT_KEYS, CaseFilter
from models import CASE_STATUSES

MAX_AMOUNT_FILTER = Decimal("1000000000000")
_MAJOR_FILTER = re.compile(r"^\d{1,13}(\.\d{1,3})?$")


def _major_param(args: dict[str, Any], name: str) -> Decimal | None:
    text = (args.get(name) or "").strip().replace(" ", "")
    if not text:
        return None
    if not _MAJOR_FILTER.match(text):
        raise CaseActionError("invalid_amount", f"{name} is an amount such as 49.99 (major units, no sign or grouping)")
    value = Decimal(text)
    if value > MAX_AMOUNT_FILTER:
        raise CaseActionError("invalid_amount", f"{name} is too large")
    return value


def parse_filter(args: dict[str, Any], *, default_per_page: int = 25) -> CaseFilter:
    """Validate filter parameters from a query string; :class:`CaseActionError` 400 if bad."""
    status = (args.get("status") or "").strip() or None
    if status is not None and status not in CASE_STATUSES:
        raise CaseActionError("invalid_status", f"status must be one of {', '.join(CASE_STATUSES)}")
    currency = (args.get("currency") or "").strip().lower() or None
    if currency is not None and (len(currency) != 3 or not currency.isascii() or not currency.isalpha()):
        raise CaseActionError("invalid_currency", "currency is a three-letter ISO code")
    dates = {}
    for name in ("from", "until"):
        try:
            day = parse_day(args.get(name), name)
        except DateParamError as exc:
            raise CaseActionError(exc.code, exc.message) from None
        if day is not None:
            dates[name] = day
    try:
        page = int(args.get("page") or 1)
        per_page = int(args.get("per_page") or default_per_page)
    except ValueError:
        raise CaseActionError("invalid_page", "page and per_page are whole numbers") from None
    if not (1 <= page <= 100_000 and 1 <= per_page <= 200):
        raise CaseActionError("invalid_page", "page >= 1 and 1 <= per_page <= 200")
    until = dates.get("until")
    if until is not None:
        until = until + timedelta(days=1)  # "until" is inclusive: the whole day
    if "from" in dates and until is not None and dates["from"] >= until:
        raise CaseActionError("invalid_date", "from must be on or before until")
    reason = (args.get("reason") or "").strip() or None
    if reason is not None and reason not in REASON_KINDS:
        raise CaseActionError("invalid_reason", f"reason must be one of {', '.join(REASON_KINDS)}")
    amount_min, amount_max = _major_param(args, "amount_min"), _major_param(args, "amount_max")
    if amount_min is not None and amount_max is not None and amount_min > amount_max:
        raise CaseActionError("invalid_amount", "amount_min must not be above amount_max")
    sort = (args.get("sort") or "").strip() or None
    if sort is not None and sort not in SORT_KEYS:
        raise CaseActionError("invalid_sort", f"sort must be one of {', '.join(SORT_KEYS)}")
    direction = (args.get("dir") or "asc").strip()
    if direction not in ("asc", "desc"):
        raise CaseActionError("invalid_sort", "dir is asc or desc")
    return CaseFilter(
        status, currency, dates.get("from"), until, page, per_page,
        reason=reason, amount_min=amount_min, amount_max=amount_max, sort=sort, descending=direction == "desc",
    )
