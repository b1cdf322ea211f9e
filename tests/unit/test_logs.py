"""Logs never carry secrets, signatures or card numbers, and read well in a terminal."""

from __future__ import annotations

import json
import logging

from app.logs import JsonFormatter, RedactingFilter, TextFormatter


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "t", "levelname": "INFO", "levelno": 20, "msg": msg, "args": args or None})
    for key, value in extra.items():
        setattr(record, key, value)
    RedactingFilter().filter(record)
    return record


def test_secrets_in_messages_and_extras_are_masked() -> None:
    record = _record(
        "key %s secret %s header %s card %s client %s",
        "sk_live_51Habcdef0123456789",
        "whsec_abcDEF123456",
        "t=1700000000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd",
        "4242 4242 4242 4242",
        "pi_3Mabc_secret_XYZ123",
        event_id="evt_1",
        stripe_signature="t=1,v1=abc",
        api_key="sk_test_x",
        note="refund for sk_test_abc123",
    )
    line = JsonFormatter().format(record)
    for leaked in ("51Habcdef", "abcDEF123456", "5257a869", "4242 4242", "XYZ123", "t=1,v1=abc", "sk_test_x", "sk_test_abc123"):
        assert leaked not in line, leaked
    entry = json.loads(line)
    assert entry["event_id"] == "evt_1" and entry["stripe_signature"] == "[redacted]"


def test_ids_and_amounts_are_kept() -> None:
    record = _record("charge %s refunded %d", "ch_3Mabc1234567890123456", 4999, order_id="ord_1", charge_created=1700000000)
    line = TextFormatter().format(record)
    assert "ch_3Mabc1234567890123456" in line and "4999" in line
    assert "order_id=ord_1" in line and "charge_created=1700000000" in line and "INFO" in line
