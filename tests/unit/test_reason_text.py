"""Case reasons in words: every reason the rule, detection and the refund path write reads
as a sentence with amounts in major units and the currency code in capitals, for
zero-decimal (JPY), three-decimal (KWD) and two-decimal (USD) currencies alike; a closed
case never asks anyone to decide."""

from __future__ import annotations

import re

import pytest

from domain.cases.reasons import REASON_KINDS, ReasonContext, case_reason_text, explain, reason_code, reason_sentence, reason_sentences
from domain.cases.rules import ChargeFacts, OrderFacts, assess

WINDOW = 600
# (currency, a charge, another amount, how each is written in major units)
CURRENCIES = [
    ("usd", 4999, 1501, {4999: "49.99 USD", 1501: "15.01 USD", 6500: "65.00 USD", 9998: "99.98 USD"}),
    ("jpy", 5000, 1500, {5000: "5,000 JPY", 1500: "1,500 JPY", 6500: "6,500 JPY", 10000: "10,000 JPY"}),
    ("kwd", 12340, 1500, {12340: "12.340 KWD", 1500: "1.500 KWD", 13840: "13.840 KWD", 24680: "24.680 KWD"}),
]


def paid(charge_id: str, amount: int, currency: str, created: int, **more) -> ChargeFacts:  # type: ignore[no-untyped-def]
    return ChargeFacts(charge_id, amount, currency, created, held=amount, amount_captured=amount, **more)


def no_minor_units(text: str, *amounts: int) -> None:
    """None of the raw minor-unit numbers (nor a lower-case currency code) is left."""
    for amount in amounts:
        assert not re.search(rf"(?<![\d.,]){amount}(?![\d.,])", text), (amount, text)
    assert not re.search(r"\b(usd|jpy|kwd|eur)\b", text), text


@pytest.mark.parametrize("currency, first, other, shown", CURRENCIES, ids=[c[0] for c in CURRENCIES])
def test_no_clear_duplicate_with_an_unknown_total(currency, first, other, shown) -> None:  # type: ignore[no-untyped-def]
    verdict = assess(OrderFacts("o", None, None), [paid("ch_1", first, currency, 100), paid("ch_2", other, currency, 110)], window_seconds=WINDOW)
    text = case_reason_text(
        status="open", kind="duplicate", automatic=verdict.automatic, review_reasons=verdict.review_reasons,
        currency=None, order_amount=None,
    )
    total = shown[first + other] if first + other in shown else None
    assert text == (
        "The order's total is not known, so no refund is made automatically. "
        f"2 charges hold {total} but none repeats another; a person must decide."
    )
    no_minor_units(text, first + other)


def test_the_example_sentence() -> None:
    reason = "no_clear_duplicate: 2 charges hold 6500 usd but none repeats an earlier charge's amount within the window"
    assert reason_sentence(reason) == "2 charges hold 65.00 USD but none repeats another; a person must decide."


@pytest.mark.parametrize("currency, first, other, shown", CURRENCIES, ids=[c[0] for c in CURRENCIES])
def test_refund_that_cannot_land_on_the_total(currency, first, other, shown) -> None:  # type: ignore[no-untyped-def]
    charges = [paid("ch_1", first, currency, 100), paid("ch_2", first, currency, 105), paid("ch_3", other, currency, 110)]
    verdict = assess(OrderFacts("o", first, currency), charges, window_seconds=WINDOW)
    (reason,) = verdict.review_reasons
    assert reason_code(reason) == "refund_leaves_wrong_total"
    text = reason_sentence(reason, ReasonContext(currency=currency))
    holds, after = 2 * first + other, first + other
    assert text.startswith(f"The order holds ")
    assert f"against a total of {shown[first]}" in text and "; a person must decide." in text
    no_minor_units(text, holds, first, after)


@pytest.mark.parametrize("currency, first, other, shown", CURRENCIES, ids=[c[0] for c in CURRENCIES])
def test_a_clear_duplicate_says_what_approving_refunds_and_a_closed_one_asks_nothing(currency, first, other, shown) -> None:  # type: ignore[no-untyped-def]
    verdict = assess(OrderFacts("o", first, currency), [paid("ch_1", first, currency, 100), paid("ch_2", first, currency, 105)], window_seconds=WINDOW)
    assert verdict.automatic and verdict.review_reasons == ()
    common = dict(kind="duplicate", automatic=True, review_reasons=(), currency=currency, order_amount=first, proposed={currency: first})
    assert case_reason_text(status="open", **common) == (
        f"Clear duplicate: refunding {shown[first]} leaves the order holding its total of {shown[first]}; ready to approve."
    )
    for status in ("refunding", "refunded", "dismissed"):
        closed = case_reason_text(status=status, **common)
        assert "ready to approve" not in closed and "decide" not in closed and "Open case" not in closed
        assert closed == f"Clear duplicate: {shown[first]} charged above the order's total of {shown[first]}."


@pytest.mark.parametrize("currency, first, other, shown", CURRENCIES, ids=[c[0] for c in CURRENCIES])
def test_every_reason_the_rule_writes_reads_in_major_units(currency, first, other, shown) -> None:  # type: ignore[no-untyped-def]
    """Partial refunds, disputes, authorisations, accounts, currencies: each code has its
    words, none leaves a raw amount or a lower-case code behind."""
    charges = [
        paid("ch_1", first, currency, 100),
        ChargeFacts("ch_2", first, currency, 105, held=first - other, amount_captured=first, refunded=other),
        paid("ch_3", first, "eur", 110, dispute_status="needs_response", account="acct_1"),
        ChargeFacts("ch_4", other, currency, 120, captured=False),
    ]
    verdict = assess(OrderFacts("o", first, currency), charges, window_seconds=WINDOW)
    codes = {reason_code(r) for r in verdict.review_reasons}
    assert {"mixed_currencies", "partial_refund", "dispute_open", "connected_account", "uncaptured_authorization"} <= codes
    sentences = reason_sentences(verdict.review_reasons, ReasonContext(currency=currency))
    text = " ".join(sentences)
    assert f"Charge ch_2 already has {shown[other]} of {shown[first]} refunded." in text
    assert f"Charge ch_4 authorises {shown[other]} that is not captured yet" in text
    assert "Charge ch_3 is disputed (needs response), so it is never refunded here." in text
    assert "Charge ch_3 is on the connected account acct_1." in text
    assert f"more than one currency (EUR and {currency.upper()})" in text
    assert sentences[-1].endswith("; a person must decide.") and sum("a person must decide" in s for s in sentences) == 1
    for reason, sentence in zip(verdict.review_reasons, sentences):
        assert not sentence.startswith(reason_code(reason) or "~"), sentence
    no_minor_units(text, first, other)


def test_authorisation_and_currency_reasons() -> None:
    assert reason_sentence(
        "authorization_not_clear: ch_a authorises 5000 jpy, and no earlier charge of that amount falls within the window",
        ReasonContext(active=False),
    ) == "The authorisation ch_a of 5,000 JPY repeats no earlier charge within the window."
    assert reason_sentence("currency_differs: the order is in usd, its charges in kwd", ReasonContext(active=False)) == (
        "The order is priced in USD but was charged in KWD."
    )
    assert reason_sentence("total_unknown: the order's total is not known, so no release is automatic", ReasonContext(active=False)) == (
        "The order's total is not known, so no release is made automatically."
    )
    assert reason_sentence(
        "no_clear_duplicate: 2 charges hold 9999 in jpy/usd but none repeats an earlier charge's amount within the window",
        ReasonContext(active=False),
    ) == "2 charges hold money in JPY and USD but none repeats another."


def test_escalations_and_returns_to_review_split_into_sentences() -> None:
    text = (
        "refund_skipped: ch_x: the charge holds 0.000 KWD at Stripe; the attempt wanted 12.340 KWD; "
        "still_over_total: after its refunds the order still holds 12.340 KWD more than it should"
    )
    assert explain(text) == [
        "The refund on ch_x was not sent: the charge holds 0.000 KWD at Stripe; the attempt wanted 12.340 KWD.",
        "After its refunds the order still holds 12.340 KWD more than it should; a person must decide.",
    ]
    assert reason_sentence("sent_to_person: " + text).startswith("Sent back to a person. The refund on ch_x was not sent")


def test_free_text_and_unknown_shapes_are_kept_as_written() -> None:
    assert reason_sentence("something odd happened", ReasonContext(active=False)) == "Something odd happened."
    assert reason_sentence("new_code: whatever the detail says") == "Whatever the detail says; a person must decide."
    # a known code whose detail lost its shape (an older row): the detail, without the code
    assert reason_sentence("refund_leaves_wrong_total: the order holds 10, its total is 5; refunding clear duplicates in full leaves 5") == (
        "The order holds 10, its total is 5; refunding clear duplicates in full leaves 5; a person must decide."
    )


def test_the_filter_offers_every_code_the_rule_writes() -> None:
    for code in ("no_clear_duplicate", "total_unknown", "refund_leaves_wrong_total", "mixed_currencies", "currency_differs",
                 "partial_refund", "dispute_open", "dispute_lost", "uncaptured_authorization", "authorization_not_clear",
                 "connected_account", "refund_skipped", "still_over_total", "sent_to_person", "unlinked_charges"):
        assert code in REASON_KINDS
    assert next(iter(REASON_KINDS)) == "clear"
