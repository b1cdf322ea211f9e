"""Structured logs: one JSON object a line in production, a readable line in a terminal.

Records carry ids (event, order, charge, case) through ``extra=``. Never card data,
signatures or secrets: a filter on the handler masks secret-looking values in messages
and in extras (API keys, webhook secrets, client secrets, ``Stripe-Signature`` values,
card numbers) and drops extras whose name says they are secret, whatever a caller logs.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

_SECRET_PATTERNS = [
    (re.compile(r"\b(sk|rk)_(live|test)_[A-Za-z0-9_]+"), r"\1_\2_[redacted]"),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=_-]+"), "whsec_[redacted]"),
    (re.compile(r"\b(pi|seti)_[A-Za-z0-9]+_secret_[A-Za-z0-9]+"), r"\1_[client secret redacted]"),
    (re.compile(r"\bv[01]=[0-9a-fA-F]{16,}"), "v1=[redacted]"),
    (re.compile(r"\b(?:\d[ -]?){13,19}\b"), "[number redacted]"),
]
_SECRET_KEYS = re.compile(r"secret|password|signature|authorization|api_key|token|card_number|cvc|^number$", re.I)


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Masks secrets in the message, its arguments and the extras of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        for key in [k for k in vars(record) if k not in _STANDARD]:
            value = getattr(record, key)
            if _SECRET_KEYS.search(key):
                setattr(record, key, "[redacted]")
            elif isinstance(value, str):
                setattr(record, key, redact(value))
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``12:03:04 INFO  app.services.ingest: event processed  event_id=evt_1 order_id=o_1``"""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, timezone.utc).strftime("%H:%M:%S")
        extras = "  ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{when} {record.levelname:<5} {record.name}: {record.getMessage()}" + (f"  {extras}" if extras else "")
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def configure_logging(level: str, fmt: str = "auto") -> None:
    """``fmt``: ``json``, ``text``, or ``auto`` (text on a terminal, JSON otherwise)."""
    handler = logging.StreamHandler()
    use_text = fmt == "text" or (fmt == "auto" and sys.stderr.isatty())
    handler.setFormatter(TextFormatter() if use_text else JsonFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Alembic announces every plugin it loads at INFO; keep its migration lines only.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # stripe-python logs every request it sends at INFO (hundreds in a backfill): only its
    # warnings and errors, unless the whole service logs at DEBUG.
    logging.getLogger("stripe").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
