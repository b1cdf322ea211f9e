"""Errors of the business, which know no HTTP.

A :class:`DomainError` has a stable machine-readable ``code``, a sentence for a person, a
:class:`Kind` saying what sort of refusal it is, and optional ``details`` (the field at
fault, Stripe's own code, how many seconds to wait). The web layer turns kinds (and a few
codes) into HTTP answers in one table, ``app/errors.py``; the CLI prints the message.

The areas raise their own subclasses (:class:`~domain.cases.review.CaseActionError`,
:class:`~domain.payments.service.PayError`, ...) so a caller may catch one area's
refusals; every one of them is a :class:`DomainError`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    """What sort of refusal an error is; the one thing an answer's status depends on."""

    #: Input that is malformed or out of bounds as sent (a bad parameter, an unsigned body).
    INVALID = "invalid"
    #: Well-formed input that the business declines (an amount above what a charge holds).
    REFUSED = "refused"
    #: The thing named does not exist.
    NOT_FOUND = "not_found"
    #: The current state forbids it (already paid, case not open); it may change.
    CONFLICT = "conflict"
    #: The card or payment method was declined.
    DECLINED = "declined"
    #: Something we depend on is missing or down; the same request may succeed later.
    UNAVAILABLE = "unavailable"


class DomainError(Exception):
    """A request the business refuses, with a stable ``code`` and a readable ``message``."""

    default_kind: Kind = Kind.INVALID

    def __init__(self, code: str, message: str, *, kind: Kind | None = None, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.kind = kind or self.default_kind
        self.details = details


class Rejected(DomainError):
    """Input that is not acceptable as sent (malformed, unsigned, too large)."""


class Unavailable(DomainError):
    """Something we depend on is missing or down; the same input may succeed later."""

    default_kind = Kind.UNAVAILABLE
