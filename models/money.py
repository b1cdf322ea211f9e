"""Money: integer minor units plus an ISO 4217 currency code, never floats.

Stripe expresses every amount in the currency's smallest unit. Most currencies have two
decimals (4999 USD is 49.99), the zero-decimal ones have none (5000 JPY is 5000), and the
three-decimal ones (BHD, JOD, KWD, OMR, TND) have three, with Stripe requiring the last
digit to be 0. This module is the one place that knows it.
"""

from __future__ import annotations

import re
from decimal import Decimal

ZERO_DECIMAL = frozenset(
    "bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split()
)
THREE_DECIMAL = frozenset("bhd jod kwd omr tnd".split())
# Stripe caps a single amount at 8 digits for most currencies (12 for a few); we accept up
# to 12 so that a valid Stripe amount is never rejected, and nothing absurd is stored.
MAX_AMOUNT = 999_999_999_999
_CURRENCY = re.compile(r"^[a-z]{3}\Z")


class MoneyError(ValueError):
    """An amount or currency that cannot be money."""


def normalise_currency(currency: object) -> str:
    """Lower-case three-letter code, as Stripe returns it; raise :class:`MoneyError` otherwise."""
    if not isinstance(currency, str) or not _CURRENCY.match(currency.strip().lower()):
        raise MoneyError("currency must be a three-letter ISO code")
    return currency.strip().lower()


def check_amount(amount: object, currency: str, *, allow_zero: bool = False) -> int:
    """Return ``amount`` if it is a valid minor-unit integer for ``currency``.

    ``bool`` is rejected even though it is an ``int`` subclass, and so is every float:
    a float amount is a bug upstream, not something to round.
    """
    amount = check_minor_units(amount)
    if amount == 0 and not allow_zero:
        raise MoneyError("amount must be positive")
    if currency in THREE_DECIMAL and amount % 10 != 0:
        raise MoneyError(f"{currency.upper()} amounts must end in 0 (Stripe rounds to 2 decimals)")
    return amount


def check_minor_units(amount: object) -> int:
    """Return ``amount`` if it is a non-negative integer within range; no currency rules."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise MoneyError("amount must be an integer in the currency's minor unit")
    if amount < 0 or amount > MAX_AMOUNT:
        raise MoneyError("amount is out of range")
    return amount


def decimals(currency: str) -> int:
    if currency in ZERO_DECIMAL:
        return 0
    if currency in THREE_DECIMAL:
        return 3
    return 2


def major_units(amount: int, currency: str) -> str:
    """``4999, "usd"`` -> ``"49.99"``; ``5000, "jpy"`` -> ``"5000"``: a plain decimal string
    (no grouping, no currency), as a spreadsheet reads a number. Never a float."""
    places = decimals(currency)
    return f"{Decimal(amount).scaleb(-places):.{places}f}"


def format_money(amount_minor: int, currency: str) -> str:
    """The one human form of money, used by the page, the API's ``*_display`` fields, the
    CLI, reason texts and alerts: major units with the currency's own decimals, thousands
    grouped, the ISO code in capitals. ``4999, "usd"`` -> ``"49.99 USD"``; ``5000, "jpy"``
    -> ``"5,000 JPY"``; ``12340, "kwd"`` -> ``"12.340 KWD"``. Decimal arithmetic; a float
    (or a bool) is a bug upstream and raises :class:`TypeError` instead of being rounded."""
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, (int, Decimal)) or (
        isinstance(amount_minor, Decimal) and amount_minor != amount_minor.to_integral_value()
    ):
        # (an integral Decimal is what a database SUM of minor units may come back as)
        raise TypeError(f"money is an integer in minor units, not {amount_minor!r}")
    places = decimals(currency.lower())
    value = Decimal(amount_minor).scaleb(-places)
    return f"{value:,.{places}f} {currency.upper()}"


def format_amount(amount: int, currency: str) -> str:
    """The older name of :func:`format_money` (same text)."""
    return format_money(amount, currency)


def format_amounts(amounts: dict[str, int], *, empty: str = "nothing") -> str:
    """Several currencies, each in :func:`format_money` form, by currency code:
    ``{"usd": 4999, "eur": 500}`` -> ``"5.00 EUR, 49.99 USD"``."""
    return ", ".join(format_money(amount, currency) for currency, amount in sorted(amounts.items())) or empty
