"""Errors of the business, which know no HTTP.

A :class:`DomainError` has a stable machine-readable ``code`` and a sentence for a person.
The web layer maps codes to HTTP answers in one table; the CLI prints the message.
"""

from __future__ import annotations


class DomainError(Exception):
    """A request the business refuses, with a stable ``code`` and a readable ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Rejected(DomainError):
    """Input that is not acceptable as sent (malformed, unsigned, too large)."""


class Unavailable(DomainError):
    """Something we depend on is missing or down; the same input may succeed later."""
