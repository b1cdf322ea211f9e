"""The Idempotency-Key header's rules and the request fingerprint (pure functions)."""

from __future__ import annotations

import pytest

from app.errors import status_of
from domain.payments.idempotency import IdempotencyKeyError, fingerprint, validate_key


@pytest.mark.parametrize("key", ["a", "order-42/checkout#1", "k" * 255, "with spaces inside", "~!@#$%^&*()"])
def test_printable_ascii_keys_up_to_255_are_accepted_as_is(key: str) -> None:
    assert validate_key(key) == key


def test_no_header_means_no_key() -> None:
    assert validate_key(None) is None


@pytest.mark.parametrize("key", ["", "   ", "k" * 256, "caf\u00e9", "tab\there", "nul\x00", "new\nline", "\u2603"])
def test_other_keys_are_400(key: str) -> None:
    with pytest.raises(IdempotencyKeyError) as raised:
        validate_key(key)
    assert (status_of(raised.value), raised.value.code) == (400, "invalid_idempotency_key")


def test_fingerprint_ignores_spelling_but_not_meaning() -> None:
    base = fingerprint("POST", "/orders/o1/pay", {"customer": "cus_1", "payment_method": "pm_1"})
    assert fingerprint("post", "/orders/o1/pay", {"payment_method": "pm_1", "customer": "cus_1"}) == base
    assert fingerprint("POST", "/orders/o1/pay", {"customer": "cus_1", "payment_method": "pm_2"}) != base
    assert fingerprint("POST", "/orders/o2/pay", {"customer": "cus_1", "payment_method": "pm_1"}) != base
    assert fingerprint("PUT", "/orders/o1/pay", {"customer": "cus_1", "payment_method": "pm_1"}) != base
    assert fingerprint("POST", "/orders/o1/pay", None) == fingerprint("POST", "/orders/o1/pay", {})
    assert len(base) == 64 and int(base, 16) >= 0
