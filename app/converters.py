"""Bounded converters for client input: a URL id and a query-string date never reach the
database or date arithmetic out of range (no 500 on ``/api/duplicates/99999999999999999999``
or ``?until=9999-12-31``).

* :class:`BoundedIntConverter`: Werkzeug's ``int`` converter capped at 2^31 - 1, the
  largest PostgreSQL INTEGER, the type of every id column here (SQLite would take 2^63 - 1,
  PostgreSQL refuses anything above its column's range with an error). A bigger id does
  not match the route: 404, like any unknown id. :func:`register` installs it under its own name ``id`` and in place of
  ``int``, so every ``<int:...>`` rule of the app is bounded too.
* :func:`parse_day`: a ``YYYY-MM-DD`` query value between :data:`MIN_DAY` and
  :data:`MAX_DAY` (an inclusive "until" adds a day, which 9999-12-31 cannot take), else
  :class:`DateParamError` (a 400 with ``invalid_date``).

No Flask here (Werkzeug's routing only). The bounds themselves (:data:`MAX_ID`,
:func:`parse_day`) are the domain's (:mod:`domain.bounds`): services check them too.
"""

from __future__ import annotations

from typing import Any

from werkzeug.routing import IntegerConverter, Map

from domain.bounds import MAX_ID, DateParamError, parse_day

__all__ = ["MAX_ID", "BoundedIntConverter", "DateParamError", "guard_query_dates", "parse_day", "register"]

class BoundedIntConverter(IntegerConverter):
    """``int`` with ``max`` defaulting to :data:`MAX_ID` (an explicit smaller max wins)."""

    def __init__(self, map: Map, *args: Any, **kwargs: Any) -> None:
        max_value = kwargs.get("max")
        kwargs["max"] = MAX_ID if max_value is None else min(int(max_value), MAX_ID)
        super().__init__(map, *args, **kwargs)


def register(url_map: Map) -> None:
    """Before any rule is added (rules pick their converter when added)."""
    url_map.converters["id"] = BoundedIntConverter
    url_map.converters["int"] = BoundedIntConverter


#: Date query parameters read by routes that parse them themselves, checked here first
#: (the review page's CSV report adds a day to ``until``: 9999-12-31 overflowed into a 500).
GUARDED_DATE_PARAMS: dict[str, tuple[str, ...]] = {"review.report": ("since", "until")}


def guard_query_dates(app: Any) -> None:
    """A ``before_request`` that answers 400 for an out-of-range date parameter of the
    endpoints in :data:`GUARDED_DATE_PARAMS` (the blueprint's own error page renders it)."""
    from flask import abort, request

    @app.before_request
    def _bounded_query_dates() -> None:
        for name in GUARDED_DATE_PARAMS.get(request.endpoint or "", ()):
            if (request.args.get(name) or "").strip():
                try:
                    parse_day(request.args.get(name), name)
                except DateParamError as exc:
                    abort(400, description=str(exc))
