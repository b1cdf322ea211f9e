"""Bounds of client input, checked before anything reaches the database or date
arithmetic: an id fits the INTEGER columns (PostgreSQL refuses anything larger with an
error), a day stays within what date arithmetic can take.

* :data:`MAX_ID`: 2^31 - 1, the largest PostgreSQL INTEGER, the type of every id column.
* :func:`parse_day`: a ``YYYY-MM-DD`` value between :data:`MIN_DAY` and :data:`MAX_DAY`
  (an inclusive "until" adds a day, which 9999-12-31 cannot take), else
  :class:`DateParamError` (code ``invalid_date``).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from domain.errors import DomainError

MAX_ID = 2**31 - 1
MIN_DAY = datetime(1970, 1, 1, tzinfo=timezone.utc)
MAX_DAY = datetime(9998, 12, 31, tzinfo=timezone.utc)
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


class DateParamError(DomainError, ValueError):
    """A date parameter the service cannot use (code ``invalid_date``)."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_date", message)


def parse_day(raw: str | None, name: str, *, required: bool = False) -> datetime | None:
    """The UTC midnight of ``raw`` (``YYYY-MM-DD``), None when empty and not required."""
    text = (raw or "").strip()
    if not text:
        if required:
            raise DateParamError(f"{name} is required: a date YYYY-MM-DD")
        return None
    try:
        if not _DAY.fullmatch(text):
            raise ValueError(text)
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError:
        raise DateParamError(f"{name} must be a date YYYY-MM-DD") from None
    if not MIN_DAY <= day <= MAX_DAY:
        raise DateParamError(
            f"{name} must be between {MIN_DAY.date().isoformat()} and {MAX_DAY.date().isoformat()}"
        )
    return day
