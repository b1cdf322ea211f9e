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


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        (4999, "usd", "49.99 USD"),
        (6500, "USD", "65.00 USD"),
        (5000, "jpy", "5,000 JPY"),
        (49, "jpy", "49 JPY"),
        (12340, "kwd", "12.340 KWD"),
        (5, "kwd", "0.005 KWD"),
        (-4999, "usd", "-49.99 USD"),
    ],
)
def test_format_money_is_the_one_form_and_format_amount_its_old_name(amount: int, currency: str, shown: str) -> None:
    from models.money import format_money

    assert format_money(amount, currency) == shown
    assert format_amount(amount, currency) == shown


@pytest.mark.parametrize("amount", [49.99, 5000.0, True, "4999", None])
def test_format_money_refuses_what_is_not_minor_units(amount: object) -> None:
    from models.money import format_money

    with pytest.raises(TypeError):
        format_money(amount, "usd")  # type: ignore[arg-type]


def test_format_amounts_lists_currencies_in_code_order() -> None:
    from models.money import format_amounts

    assert format_amounts({"usd": 4999, "eur": 500, "jpy": 5000}) == "5.00 EUR, 5,000 JPY, 49.99 USD"
    assert format_amounts({}) == "nothing"


def test_iso_utc_gives_an_offset_to_naive_and_aware_times() -> None:
    from datetime import datetime, timedelta, timezone

    from models import iso_from_unix, iso_utc

    naive = datetime(2026, 12, 2, 6, 21, 21, 518029)
    assert iso_utc(naive) == "2026-12-02T06:21:21.518029+00:00"
    assert iso_utc(naive.replace(tzinfo=timezone.utc)) == "2026-12-02T06:21:21.518029+00:00"
    assert iso_utc(datetime(2026, 12, 2, 8, 21, 21, tzinfo=timezone(timedelta(hours=2)))) == "2026-12-02T06:21:21+00:00"
    assert iso_utc(None) is None
    assert iso_from_unix(0) == "1970-01-01T00:00:00+00:00"
