"""JSON errors for machines: ``{"error": code, "message": ...}`` with a 4xx/5xx status."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from domain.errors import DomainError, Kind

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


# The one place where the business's refusals become answers: a domain error's kind
# decides its status, except for the few codes listed in CODE_STATUS.
KIND_STATUS: dict[Kind, int] = {
    Kind.INVALID: 400,
    Kind.REFUSED: 422,
    Kind.NOT_FOUND: 404,
    Kind.CONFLICT: 409,
    Kind.DECLINED: 402,
    Kind.UNAVAILABLE: 503,
}
CODE_STATUS: dict[str, int] = {
    "payload_too_large": 413,
}


def status_of(exc: DomainError) -> int:
    """The HTTP status answering ``exc``."""
    return CODE_STATUS.get(exc.code, KIND_STATUS[exc.kind])


def domain_error_response(exc: DomainError) -> tuple[Response, int]:
    """``{"error": code, "message": ..., **details}`` with :func:`status_of`; a
    ``retry_after`` detail becomes the ``Retry-After`` header instead."""
    details = {k: v for k, v in exc.details.items() if k != "retry_after"}
    response, status = error_response(status_of(exc), exc.code, exc.message, **details)
    if "retry_after" in exc.details:
        response.headers["Retry-After"] = str(exc.details["retry_after"])
    return response, status


def error_response(http_status: int, code: str, message: str, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message, **extra}), http_status


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        status = exc.code or 500
        response, _ = error_response(status, _HTTP_CODES.get(status, "http_error"), exc.description or exc.name)
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response, status

    @app.errorhandler(DomainError)
    def _domain_error(exc: DomainError):  # type: ignore[no-untyped-def]
        return domain_error_response(exc)

    @app.errorhandler(OperationalError)
    def _database_unavailable(exc: OperationalError):  # type: ignore[no-untyped-def]
        # The database is down or dropped the connection (the pool is refreshed): the
        # client may retry; nothing it sent was wrong.
        log.warning("database unavailable: %s", type(exc.orig).__name__ if exc.orig else exc)
        return error_response(503, "database_unavailable", "The database is not reachable right now; retry shortly.")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("unhandled error")
        return error_response(500, "internal_error", "Something went wrong on our side.")
