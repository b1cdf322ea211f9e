"""The duplicate rule: which orders hold too much, which charge is the keeper, which charges
are clear duplicates, and when a refund may happen without a person.

Pure functions over plain facts (no database, no Stripe), so the rule is tested as a table
and two passes over the same ledger always reach the same answer.

The rule, as the design states it:

* **Held charges** are captured, successful charges that still hold money (amount minus
  refunds that have not failed; a lost dispute holds nothing).
* A **case** is opened when an order has two or more held charges and, if its total is
  known, they hold more than the total, or when its held charges are in more than one
  currency.
* **Keeper order**: the charge of the order's current PaymentIntent first, then Stripe
  ``created``, then charge id.
* A held charge is a **clear duplicate** when an earlier held charge (in keeper order) has
  the same currency and the same original amount, within the duplicate window.
* A case is **automatic** only when the total is known (or unknown totals are allowed by
  setting), nothing about the order is unusual (partial refunds, open or lost disputes,
  uncaptured authorisations, other currencies, connected accounts), and refunding clear
  duplicates in full, latest first, brings what the order holds *exactly* to its total
  (unknown total: every clear duplicate). Nothing is ever refunded in part automatically.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

OPEN_DISPUTES = frozenset(
    {"warning_needs_response", "warning_under_review", "needs_response", "under_review"}
)


@dataclass(frozen=True, slots=True)
class ChargeFacts:
    """What the rule needs to know about one charge of an order."""

    id: str
    amount: int  # original amount, minor units
    currency: str
    created: int  # Stripe unix seconds
    status: str = "succeeded"
    captured: bool = True
    held: int = 0  # what it still holds (see the ledger's held_amount)
    refunded: int = 0  # refunded out of what it captured
    amount_captured: int = 0
    released: bool = False  # an uncaptured authorisation that has been released/expired
    dispute_status: str | None = None
    account: str | None = None
    payment_intent_id: str | None = None

    @property
    def paid(self) -> bool:
        return self.status == "succeeded" and self.captured

    @property
    def blocks_refund(self) -> bool:
        """Any dispute, even a won one: a disputed charge is never refunded automatically
        (Stripe keeps ``disputed`` true after a win, and the refund path refuses it)."""
        return self.dispute_status is not None


@dataclass(frozen=True, slots=True)
class OrderFacts:
    id: str
    amount: int | None  # the order's total; None while unknown
    currency: str | None
    payment_intent_id: str | None = None


@dataclass(frozen=True, slots=True)
class Assessment:
    """The rule's verdict on one order."""

    needs_case: bool
    keeper_charge_id: str | None = None
    # Held charges in keeper order, with their role: keeper | duplicate | extra
    roles: tuple[tuple[str, str], ...] = ()
    clear_duplicates: tuple[str, ...] = ()
    # currency -> what the order holds above its total (unknown total: above the keeper)
    excess: dict[str, int] = field(default_factory=dict)
    automatic: bool = False
    review_reasons: tuple[str, ...] = ()
    # charge id -> amount to refund: the automatic plan, or for review the suggestion
    proposed_refunds: dict[str, int] = field(default_factory=dict)
    # duplicate (captured money above the total) | authorization (only uncaptured
    # authorisations the order does not need)
    kind: str = "duplicate"
    # uncaptured authorisations the order does not need: charge id -> authorised amount,
    # to release (cancel the PaymentIntent, or refund the bare charge), never to capture
    releases: dict[str, int] = field(default_factory=dict)

    @property
    def proposed_total(self) -> int:
        return sum(self.proposed_refunds.values())


def keeper_order(order: OrderFacts, charges: Iterable[ChargeFacts]) -> list[ChargeFacts]:
    """Charges sorted so the first is the one to keep: the current PaymentIntent's charge,
    then the earliest (Stripe ``created``; ties are normal at one-second resolution), then
    the smallest charge id. Deterministic: two passes always agree."""
    return sorted(
        charges,
        key=lambda c: (
            0 if order.payment_intent_id and c.payment_intent_id == order.payment_intent_id else 1,
            c.created,
            c.id,
        ),
    )


def assess(
    order: OrderFacts,
    charges: Sequence[ChargeFacts],
    *,
    window_seconds: int,
    auto_refund_unknown_total: bool = False,
) -> Assessment:
    """Apply the duplicate rule to one order and all its charges: captured money above
    the total, and uncaptured authorisations the order does not need."""
    captured = _assess_captured(
        order, charges, window_seconds=window_seconds, auto_refund_unknown_total=auto_refund_unknown_total
    )
    extras, clear = _extra_authorizations(order, charges, window_seconds)
    if not extras:
        return captured
    releases = {a.id: a.amount for a in extras}
    auth_roles = tuple((a.id, "authorization") for a in extras)
    if captured.needs_case:
        # Both at once: a person decides; the proposal releases the authorisations too.
        return replace(
            captured,
            roles=captured.roles + auth_roles,
            releases=releases,
            excess=_add(captured.excess, extras),
            automatic=False,
        )
    held = keeper_order(order, [c for c in charges if c.paid and c.held > 0])
    auths = _authorizations(order, charges)
    keeper = held[0] if held else next((a for a in auths if a not in extras), extras[0])
    if keeper in extras:  # (a zero total) the order still keeps one authorisation
        extras = [a for a in extras if a is not keeper]
        clear = [a for a in clear if a is not keeper]
        releases.pop(keeper.id, None)
        auth_roles = tuple((a.id, "authorization") for a in extras)
        if not extras:
            return captured
    reasons = _release_reasons(order, charges, held, auths, extras, clear, auto_refund_unknown_total)
    return Assessment(
        needs_case=True,
        keeper_charge_id=keeper.id,
        roles=((keeper.id, "keeper"),) + tuple((c.id, "extra") for c in held if c.id != keeper.id) + auth_roles,
        clear_duplicates=tuple(a.id for a in clear),
        excess=_add({}, extras),
        automatic=not reasons,
        review_reasons=tuple(reasons),
        kind="authorization",
        releases=releases,
    )


def _release_reasons(
    order: OrderFacts,
    charges: Sequence[ChargeFacts],
    held: Sequence[ChargeFacts],
    auths: Sequence[ChargeFacts],
    extras: Sequence[ChargeFacts],
    clear: Sequence[ChargeFacts],
    auto_refund_unknown_total: bool,
) -> list[str]:
    """Why releasing ``extras`` needs a person (none: the release is automatic)."""
    currencies = sorted({c.currency for c in held} | {a.currency for a in auths})
    foreign = order.amount is not None and order.currency is not None and any(c != order.currency for c in currencies)
    reasons = [
        r
        for r in _unusual(order, charges, sorted({c.currency for c in held}) or currencies, foreign)
        if not r.startswith("uncaptured_authorization")
    ]
    if order.amount is None and not auto_refund_unknown_total:
        reasons.append("total_unknown: the order's total is not known, so no release is automatic")
    for a in extras:
        if a not in clear:
            reasons.append(
                f"authorization_not_clear: {a.id} authorises {a.amount} {a.currency}, and no earlier charge of "
                f"that amount falls within the window"
            )
    return reasons


def _authorizations(order: OrderFacts, charges: Sequence[ChargeFacts]) -> list[ChargeFacts]:
    """Uncaptured authorisations still holding the customer's funds, in keeper order."""
    return keeper_order(order, [c for c in charges if c.status == "succeeded" and not c.captured and not c.released])


def _extra_authorizations(
    order: OrderFacts, charges: Sequence[ChargeFacts], window_seconds: int
) -> tuple[list[ChargeFacts], list[ChargeFacts]]:
    """Authorisations the order does not need, and which of them are clear duplicates.

    An authorisation is needed while what the order holds (captured money, then earlier
    authorisations in keeper order) is below its total; once the order is paid in full,
    every further authorisation is extra (unknown total: everything after the first
    charge). A clear one repeats an earlier charge's currency and amount within the
    window."""
    auths = _authorizations(order, charges)
    if not auths:
        return [], []
    held = keeper_order(order, [c for c in charges if c.paid and c.held > 0])
    extras: list[ChargeFacts] = []
    if order.amount is not None:
        covered = sum(c.held for c in held if c.currency == order.currency)
        paying = bool(held)  # something already stands for the payment
        for a in auths:
            if covered >= order.amount or (a.currency != order.currency and paying):
                extras.append(a)
            else:
                # needed: it completes the total (or, in another currency, it is the
                # payment itself: a person's question, not a duplicate)
                covered += a.amount if a.currency == order.currency else 0
                paying = True
    else:
        have = bool(held)
        for a in auths:
            if have:
                extras.append(a)
            have = True
    earlier = held + [a for a in auths if a not in extras]
    clear = [
        a
        for a in extras
        if any(
            e.currency == a.currency and e.amount == a.amount and abs(a.created - e.created) <= window_seconds
            for e in earlier + extras[: extras.index(a)]
        )
    ]
    return extras, clear


def _add(excess: dict[str, int], authorizations: list[ChargeFacts]) -> dict[str, int]:
    total = dict(excess)
    for a in authorizations:
        total[a.currency] = total.get(a.currency, 0) + a.amount
    return dict(sorted(total.items()))


def _assess_captured(
    order: OrderFacts,
    charges: Sequence[ChargeFacts],
    *,
    window_seconds: int,
    auto_refund_unknown_total: bool,
) -> Assessment:
    held = keeper_order(order, [c for c in charges if c.paid and c.held > 0])
    currencies = sorted({c.currency for c in held})
    total_known = order.amount is not None
    if len(held) < 2:
        return Assessment(needs_case=False)
    mixed = len(currencies) > 1
    foreign = total_known and order.currency is not None and currencies != [order.currency]
    holds = sum(c.held for c in held)
    if order.amount is not None and not mixed and not foreign and holds <= order.amount:
        return Assessment(needs_case=False)

    keeper = held[0]
    roles, clear = _captured_roles(held, window_seconds)
    excess = _excess(order, held, keeper)
    reasons = _unusual(order, charges, currencies, bool(foreign))
    if not total_known and not auto_refund_unknown_total:
        reasons.append("total_unknown: the order's total is not known, so no refund is automatic")
    if not clear:
        reasons.append(
            f"no_clear_duplicate: {len(held)} charges hold {holds} {currencies[0] if len(currencies) == 1 else 'in ' + '/'.join(currencies)}"
            f" but none repeats an earlier charge's amount within the window"
        )

    plan, lands_exactly = _plan(order, held, clear, total_known)
    if clear and total_known and not mixed and not foreign and not lands_exactly:
        after = holds - sum(plan.values())
        reasons.append(
            f"refund_leaves_wrong_total: the order holds {holds}, its total is {order.amount}; "
            f"refunding clear duplicates in full leaves {after} (a full duplicate refund "
            f"cannot land on the total)"
        )
    automatic = not reasons and bool(plan)
    return Assessment(
        needs_case=True,
        keeper_charge_id=keeper.id,
        roles=tuple(roles),
        clear_duplicates=tuple(c.id for c in clear),
        excess=excess,
        automatic=automatic,
        review_reasons=tuple(reasons),
        proposed_refunds=plan,
    )


def _captured_roles(held: Sequence[ChargeFacts], window_seconds: int) -> tuple[list[tuple[str, str]], list[ChargeFacts]]:
    """The role of each charge holding money, the keeper (``held[0]``) first, and the
    clear duplicates: charges repeating an earlier one's amount and currency within the
    window."""
    clear: list[ChargeFacts] = []
    roles: list[tuple[str, str]] = [(held[0].id, "keeper")]
    for index, charge in enumerate(held[1:], start=1):
        earlier_twin = any(
            e.currency == charge.currency
            and e.amount == charge.amount
            and abs(charge.created - e.created) <= window_seconds
            for e in held[:index]
        )
        if earlier_twin:
            clear.append(charge)
        roles.append((charge.id, "duplicate" if earlier_twin else "extra"))
    return roles, clear


def _excess(order: OrderFacts, held: list[ChargeFacts], keeper: ChargeFacts) -> dict[str, int]:
    excess: dict[str, int] = {}
    for charge in held:
        excess[charge.currency] = excess.get(charge.currency, 0) + charge.held
    if order.amount is not None and order.currency in excess:
        excess[order.currency] = max(0, excess[order.currency] - order.amount)
    elif order.amount is None:
        excess[keeper.currency] -= keeper.held
    return {currency: amount for currency, amount in sorted(excess.items()) if amount > 0}


def _unusual(
    order: OrderFacts, charges: Sequence[ChargeFacts], currencies: list[str], foreign: bool
) -> list[str]:
    """Everything that makes a case a person's decision, each with its numbers."""
    reasons: list[str] = []
    if len(currencies) > 1:
        reasons.append(f"mixed_currencies: held charges in {', '.join(currencies)}")
    elif foreign:
        reasons.append(
            f"currency_differs: the order is in {order.currency}, its charges in {currencies[0]}"
        )
    for charge in keeper_order(order, charges):
        if charge.paid and 0 < charge.refunded < charge.amount_captured:
            reasons.append(
                f"partial_refund: {charge.id} has {charge.refunded} of {charge.amount_captured} "
                f"{charge.currency} refunded"
            )
        if charge.dispute_status in OPEN_DISPUTES:
            reasons.append(f"dispute_open: {charge.id} is disputed ({charge.dispute_status})")
        elif charge.dispute_status == "lost":
            reasons.append(f"dispute_lost: {charge.id} lost a dispute")
        if charge.status == "succeeded" and not charge.captured and not charge.released:
            reasons.append(
                f"uncaptured_authorization: {charge.id} authorises {charge.amount} "
                f"{charge.currency} not yet captured"
            )
        if charge.account:
            reasons.append(f"connected_account: {charge.id} is on {charge.account}")
    return reasons


def _plan(
    order: OrderFacts, held: list[ChargeFacts], clear: list[ChargeFacts], total_known: bool
) -> tuple[dict[str, int], bool]:
    """Clear duplicates to refund in full, latest first, never below the total.

    Returns the plan and whether it brings what the order holds exactly to its total (for
    an unknown total: every clear duplicate, which is then "exact" by definition)."""
    refundable = [c for c in reversed(clear) if not c.blocks_refund]
    if not total_known or order.amount is None:  # one test: total_known is "amount is not None"
        return {c.id: c.held for c in refundable}, len(refundable) == len(clear)
    remaining = sum(c.held for c in held if c.currency == order.currency)
    plan: dict[str, int] = {}
    for charge in refundable:
        if charge.currency != order.currency or remaining == order.amount:
            continue
        if remaining - charge.held >= order.amount:
            plan[charge.id] = charge.held
            remaining -= charge.held
    return plan, remaining == order.amount


# -- charges that name no order ("possible duplicate, no order") -------------------------


@dataclass(frozen=True, slots=True)
class UnlinkedChargeFacts:
    """What the unlinked-charges rule needs about one paid charge. The input may hold
    linked charges too (``order_id`` set): they are what tells a repeat purchase apart."""

    id: str
    amount: int
    currency: str
    created: int  # Stripe unix seconds
    fingerprint: str | None = None  # payment_method_details.card.fingerprint
    customer: str | None = None
    description: str | None = None
    order_id: str | None = None
    held: int | None = None  # what it still holds; None: its whole amount

    @property
    def holds(self) -> int:
        return self.amount if self.held is None else self.held


@dataclass(frozen=True, slots=True)
class UnlinkedGroup:
    """Two or more paid charges naming no order, one card (or customer), one amount and
    currency, each within the window of another: possibly one purchase charged twice."""

    charge_ids: tuple[str, ...]  # earliest first (Stripe created, then id)
    amount: int
    currency: str
    # what ties them: ("fingerprint", fp) when they share one card, else ("customer", cus)
    key: tuple[str, str]
    first_created: int
    last_created: int

    @property
    def first_charge_id(self) -> str:
        return self.charge_ids[0]

    @property
    def repeats(self) -> tuple[str, ...]:
        return self.charge_ids[1:]


def _same_payer(a: UnlinkedChargeFacts, b: UnlinkedChargeFacts) -> bool:
    return bool(a.fingerprint and a.fingerprint == b.fingerprint) or bool(a.customer and a.customer == b.customer)


def unlinked_groups(charges: Iterable[UnlinkedChargeFacts], *, window_seconds: int) -> list[UnlinkedGroup]:
    """The groups of the "possible duplicate, no order" rule, earliest first.

    Two paid charges (still holding money) go together when they have the same card
    fingerprint or the same customer, the same amount and currency, and were created at
    most ``window_seconds`` apart; a group is everything so chained. A group opens a case
    only when it has two or more charges and

    * none of them is linked to an order (a charge linked to an order, next to one that
      names none, is a repeat purchase or the order rule's business, not this rule's), and
    * their descriptions do not differ where Stripe gives them (two different
      descriptions are two different purchases; a missing one says nothing).

    Deterministic: the same charges always give the same groups in the same order."""
    held = sorted((c for c in charges if c.holds > 0), key=lambda c: (c.created, c.id))
    parent = {c.id: c.id for c in held}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, a in enumerate(held):
        for b in held[i + 1 :]:
            if b.created - a.created > window_seconds:
                break
            if a.amount == b.amount and a.currency == b.currency and _same_payer(a, b):
                ra, rb = root(a.id), root(b.id)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    members: dict[str, list[UnlinkedChargeFacts]] = {}
    for c in held:
        members.setdefault(root(c.id), []).append(c)
    groups: list[UnlinkedGroup] = []
    for group in members.values():
        if len(group) < 2:
            continue
        if any(c.order_id for c in group):
            continue
        if len({c.description for c in group if c.description}) > 1:
            continue
        first = group[0]
        groups.append(
            UnlinkedGroup(
                charge_ids=tuple(c.id for c in group),
                amount=first.amount,
                currency=first.currency,
                key=_group_key(group),
                first_created=first.created,
                last_created=group[-1].created,
            )
        )
    return sorted(groups, key=lambda g: (g.first_created, g.first_charge_id))


def _group_key(group: Sequence[UnlinkedChargeFacts]) -> tuple[str, str]:
    """What ties a group together: the card every charge shares, else the customer, else
    (chained through both) the first charge's card, else its customer."""
    first = group[0]
    if first.fingerprint and {c.fingerprint for c in group} == {first.fingerprint}:
        return ("fingerprint", first.fingerprint)
    if first.customer and {c.customer for c in group} == {first.customer}:
        return ("customer", first.customer)
    return ("fingerprint", first.fingerprint) if first.fingerprint else ("customer", first.customer or "")
