"""Case reasons in words: the one place a reason code becomes a sentence.

The rule (domain/cases/rules.py), detection (domain/cases/detection.py) and the refund path
(domain/cases/refunds.py) store a case's reasons as ``"code: detail"`` strings, the detail
carrying the numbers as the rule saw them (minor units, lower-case currency codes). Those
strings stay as they are (the API's ``review_reasons``, the audit log); this module turns
them into sentences for people, with every amount in major units and the currency code in
capitals through :func:`models.money.format_money`:

    no_clear_duplicate: 2 charges hold 6500 usd but none repeats an earlier charge's ...
    -> "2 charges hold 65.00 USD but none repeats another; a person must decide."

The page, the JSON API (``reason_text``), the CLI, the CSV report and the alerts all use
:func:`case_reason_text` / :func:`reason_sentences`, so they say the same thing. A reason
whose detail does not have the shape its code is known by (an older row, a new producer)
is still shown: its detail as written, without the code. Pure functions, no database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from models.money import format_money

_CODE = re.compile(r"^(?P<code>[a-z][a-z_]*): (?P<detail>.*)\Z", re.S)
# Where a text made of several reasons (an escalation) splits: "; " before the next code.
_NEXT_REASON = re.compile(r"; (?=[a-z][a-z_]*: )")

# Reason kinds a person can filter the queue by, in the order the page lists them. The
# first is not a code: a case with no reason is a clear duplicate the rule could refund.
REASON_KINDS: dict[str, str] = {
    "clear": "Clear duplicate (full refund proposed)",
    "no_clear_duplicate": "No charge repeats another",
    "total_unknown": "Order total unknown",
    "refund_leaves_wrong_total": "Refund would not land on the total",
    "mixed_currencies": "Charges in several currencies",
    "currency_differs": "Charged in another currency",
    "partial_refund": "Already partly refunded",
    "dispute_open": "Disputed charge",
    "dispute_lost": "Lost dispute",
    "uncaptured_authorization": "Uncaptured authorisation",
    "authorization_not_clear": "Authorisation not a clear duplicate",
    "connected_account": "Connected account",
    "refund_skipped": "A refund was not sent",
    "still_over_total": "Still over the total after refunds",
    "sent_to_person": "Sent back to a person",
    "unlinked_charges": "Possible duplicate, no order",
}

_ACTIVE_STATUSES = frozenset({"open", "failed"})


@dataclass(frozen=True, slots=True)
class ReasonContext:
    """What a sentence may need beyond its own detail: the order's currency (some details
    carry amounts without one) and whether a person still has to decide the case."""

    currency: str | None = None
    active: bool = True


def reason_code(reason: str) -> str | None:
    """``"no_clear_duplicate: ..."`` -> ``"no_clear_duplicate"``; None for free text."""
    match = _CODE.match(reason or "")
    return match.group("code") if match else None


def _money(amount: str, currency: str | None) -> str | None:
    if currency is None or not re.fullmatch(r"-?\d{1,15}", amount) or not re.fullmatch(r"[a-zA-Z]{3}", currency):
        return None
    return format_money(int(amount), currency.lower())


def _codes(text: str) -> str:
    """``"usd, eur"`` or ``"usd/eur"`` -> ``"USD and EUR"``."""
    codes = [c.upper() for c in re.split(r"[,/ ]+", text.strip()) if c]
    return codes[0] if len(codes) == 1 else ", ".join(codes[:-1]) + " and " + codes[-1]


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".;")
    return text[:1].upper() + text[1:] if text else text


# Each: (pattern the detail has, how to say it). A builder returns None when it cannot
# say it with the numbers it has (then the detail is shown as written).
_Builder = Callable[[re.Match[str], ReasonContext], "str | None"]
_SHAPES: dict[str, list[tuple[re.Pattern[str], _Builder]]] = {}


def _shape(code: str, pattern: str) -> Callable[[_Builder], _Builder]:
    def register(builder: _Builder) -> _Builder:
        _SHAPES.setdefault(code, []).append((re.compile(pattern, re.S), builder))
        return builder

    return register


@_shape("no_clear_duplicate", r"^(?P<n>\d+) charges hold (?P<amount>\d+) (?P<cur>[a-z]{3}) but none repeats")
def _no_clear(m: re.Match[str], ctx: ReasonContext) -> str | None:
    money = _money(m["amount"], m["cur"])
    return money and f"{m['n']} charges hold {money} but none repeats another"


@_shape("no_clear_duplicate", r"^(?P<n>\d+) charges hold \d+ in (?P<curs>[a-z/]+) but none repeats")
def _no_clear_mixed(m: re.Match[str], ctx: ReasonContext) -> str | None:
    return f"{m['n']} charges hold money in {_codes(m['curs'])} but none repeats another"


@_shape("total_unknown", r"(?P<what>refund|release)")
def _total_unknown(m: re.Match[str], ctx: ReasonContext) -> str | None:
    return f"The order's total is not known, so no {m['what']} is made automatically"


@_shape(
    "refund_leaves_wrong_total",
    r"^the order holds (?P<holds>\d+), its total is (?P<total>\d+); refunding clear duplicates in full leaves (?P<after>-?\d+)",
)
def _wrong_total(m: re.Match[str], ctx: ReasonContext) -> str | None:
    holds, total, after = (_money(m[k], ctx.currency) for k in ("holds", "total", "after"))
    if holds is None or total is None or after is None:
        return None
    return (
        f"The order holds {holds} against a total of {total}; refunding the repeated charges in full "
        f"would leave {after}, not the total"
    )


@_shape("mixed_currencies", r"^held charges in (?P<curs>[a-z, ]+)$")
def _mixed(m: re.Match[str], ctx: ReasonContext) -> str | None:
    return f"The order's charges are in more than one currency ({_codes(m['curs'])})"


@_shape("currency_differs", r"^the order is in (?P<order>[a-z]{3}), its charges in (?P<charged>[a-z]{3})")
def _currency_differs(m: re.Match[str], ctx: ReasonContext) -> str | None:
    return f"The order is priced in {m['order'].upper()} but was charged in {m['charged'].upper()}"


@_shape("partial_refund", r"^(?P<id>\S+) has (?P<refunded>\d+) of (?P<captured>\d+) (?P<cur>[a-z]{3}) refunded")
def _partial(m: re.Match[str], ctx: ReasonContext) -> str | None:
    refunded, captured = _money(m["refunded"], m["cur"]), _money(m["captured"], m["cur"])
    return f"Charge {m['id']} already has {refunded} of {captured} refunded"


@_shape("dispute_open", r"^(?P<id>\S+) is disputed \((?P<status>[a-z_]+)\)")
def _dispute_open(m: re.Match[str], ctx: ReasonContext) -> str | None:
    return f"Charge {m['id']} is disputed ({m['status'].replace('_', ' ')}), so it is never refunded here"


@_shape("dispute_lost", r"^(?P<id>\S+) lost a dispute")
def _dispute_lost(m: re.Match[str], ctx: ReasonContext) -> str | None:
    return f"Charge {m['id']} lost a dispute"


@_shape("uncaptured_authorization", r"^(?P<id>\S+) authorises (?P<amount>\d+) (?P<cur>[a-z]{3}) not yet captured")
def _uncaptured(m: re.Match[str], ctx: ReasonContext) -> str | None:
    return f"Charge {m['id']} authorises {_money(m['amount'], m['cur'])} that is not captured yet"


@_shape("authorization_not_clear", r"^(?P<id>\S+) authorises (?P<amount>\d+) (?P<cur>[a-z]{3}), and no earlier charge")
def _auth_not_clear(m: re.Match[str], ctx: ReasonContext) -> str | None:
    return f"The authorisation {m['id']} of {_money(m['amount'], m['cur'])} repeats no earlier charge within the window"


@_shape("connected_account", r"^(?P<id>\S+) is on (?P<account>\S+)$")
def _connected(m: re.Match[str], ctx: ReasonContext) -> str | None:
    return f"Charge {m['id']} is on the connected account {m['account']}"


@_shape("refund_skipped", r"^(?P<id>(?:ch|py)_\S+): (?P<why>.+)$")
def _skipped(m: re.Match[str], ctx: ReasonContext) -> str | None:
    return f"The refund on {m['id']} was not sent: {m['why'].rstrip('.')}"


@_shape("sent_to_person", r"^(?P<why>.+)$")
def _sent_to_person(m: re.Match[str], ctx: ReasonContext) -> str | None:
    return "Sent back to a person. " + " ".join(explain(m["why"], ctx, tail=False))


@_shape("reopened", r"^a settled case's order holds too much again")
def _reopened_plan(m: re.Match[str], ctx: ReasonContext) -> str | None:
    return "A settled case's order holds too much again"


def explain(text: str, context: ReasonContext | None = None, *, tail: bool = True) -> list[str]:
    """A text that may hold several reasons (an escalation, a return to review: ``"code:
    detail; code: detail"``) as sentences; free text is kept as written."""
    parts = [part for part in _NEXT_REASON.split(text or "") if part.strip()]
    return [reason_sentence(part, context, tail=tail and i == len(parts) - 1) for i, part in enumerate(parts)]


def reason_sentence(reason: str, context: ReasonContext | None = None, *, tail: bool = True) -> str:
    """One stored reason as a sentence (ends with a full stop). With ``tail`` and an
    active case the sentence ends with "; a person must decide"."""
    ctx = context or ReasonContext()
    match = _CODE.match(reason or "")
    text: str | None = None
    if match:
        code, detail = match.group("code"), match.group("detail")
        for pattern, builder in _SHAPES.get(code, []):
            found = pattern.search(detail)
            if found:
                text = builder(found, ctx)
                if text:
                    break
        if text is None:
            text = _sentence(detail)
    else:
        text = _sentence(reason or "")
    text = text.rstrip(".; ")
    if tail and ctx.active:
        text += "; a person must decide"
    return text + "."


def reason_sentences(reasons: Iterable[str], context: ReasonContext | None = None) -> list[str]:
    """Every reason as a sentence; only the last one says that a person must decide."""
    reasons = [r for r in reasons if r and r.strip()]
    return [reason_sentence(r, context, tail=i == len(reasons) - 1) for i, r in enumerate(reasons)]


def case_reason_text(
    *,
    status: str,
    kind: str,
    automatic: bool,
    review_reasons: Iterable[str],
    currency: str | None,
    order_amount: int | None,
    proposed: Mapping[str, int] | None = None,
) -> str:
    """Why the case exists and what is left to do, in sentences, for any status.

    An open case of clear duplicates says what approving refunds; a case with reasons says
    them, and that a person must decide while it is open or failed. A closed case
    (refunding, refunded, dismissed) never asks anyone to decide."""
    ctx = ReasonContext(currency=currency, active=status in _ACTIVE_STATUSES)
    reasons = [r for r in review_reasons if r and r.strip()]
    if reasons:
        return " ".join(reason_sentences(reasons, ctx))
    return _clear_text(kind=kind, status=status, currency=currency, order_amount=order_amount, proposed=dict(proposed or {}))


def _clear_text(*, kind: str, status: str, currency: str | None, order_amount: int | None, proposed: dict[str, int]) -> str:
    what = "release" if kind == "authorization" else "refund"
    amount = ", ".join(format_money(a, c) for c, a in sorted(proposed.items()))
    if not amount:
        return "Clear duplicate."
    if order_amount is not None and currency:
        after = f"leaves the order holding its total of {format_money(order_amount, currency)}"
        if kind == "authorization":
            after = f"leaves the order paid ({format_money(order_amount, currency)})"
    else:
        after = "leaves the first charge"
    if status not in ("open", "failed"):
        # decided (or being refunded): what the rule found, not what to do
        over = f"the order's total of {format_money(order_amount, currency)}" if order_amount is not None and currency else "the first charge"
        return f"Clear duplicate: {amount} {'authorised' if what == 'release' else 'charged'} above {over}."
    text = f"Clear duplicate: {'releasing' if what == 'release' else 'refunding'} {amount} {after}"
    if status == "open":
        text += "; ready to approve"
    return text + "."

