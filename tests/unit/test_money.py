"""Money is integer minor units plus a currency; zero-decimal currencies are not divided."""

from __future__ import annotations

import pytest

from models.money import MoneyError, check_amount, format_amount, normalise_currency


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        (4999, "usd", "49.99 USD"),
        (5000, "jpy", "5,000 JPY"),
        (1, "krw", "1 KRW"),
        (12340, "kwd", "12.340 KWD"),
        (0, "eur", "0.00 EUR"),
        (123456789, "usd", "1,234,567.89 USD"),
    ],
)
def test_format_amount(amount: int, currency: str, shown: str) -> None:
    assert format_amount(amount, currency) == shown


@pytest.mark.parametrize("amount", [49.99, 5000.0, "4999", True, None, -1, 0, 10**13])
def test_check_amount_rejects_non_integers_and_out_of_range(amount: object) -> None:
    with pytest.raises(MoneyError):
        check_amount(amount, "usd")


def test_three_decimal_currencies_must_end_in_zero() -> None:
    assert check_amount(12340, "bhd") == 12340
    with pytest.raises(MoneyError):
        check_amount(12345, "bhd")


@pytest.mark.parametrize("currency", ["US", "usdd", "", 1, None, "u$d"])
def test_bad_currency(currency: object) -> None:
    with pytest.raises(MoneyError):
        normalise_currency(currency)


def test_currency_is_lower_cased() -> None:
    assert normalise_currency(" JPY ") == "jpy"
