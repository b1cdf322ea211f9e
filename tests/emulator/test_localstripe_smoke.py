"""Smoke test: the real stripe-python SDK (16.x) against the localstripe emulator
(1.15.10) running as a separate process on 127.0.0.1 (see ``tests/emulator``).

What works, and is tested below:

(a) ``payment_intents.create(payment_method="pm_card_visa", confirm=True, metadata=...)``
    returns ``status="succeeded"`` at once; ``latest_charge`` is an *embedded Charge
    object* (not an id) and the deprecated ``charges`` list (one item) is present too.
    Retrieve gives the same.
(b) ``charges.create(source="pm_card_visa")`` and ``refunds.create(charge=..., amount=...)``
    work; the charge then shows the refund in its embedded ``refunds`` list,
    ``amount_refunded`` and ``refunded``. Refunding by ``payment_intent`` works too.
(c) ``charges.list(created={"gt": N})`` filters by creation time.
(d) A webhook registered with ``POST /_config/webhooks/<id>`` receives a
    ``payment_intent.succeeded`` event about 1 s later, with a ``Stripe-Signature``
    (``t=<event.created>,v1=<hmac>``) that ``stripe.Webhook.construct_event`` accepts.

What localstripe does NOT do like Stripe (pinned by the ``test_quirk_*`` tests, so an
upgrade that changes them shows up):

* PaymentIntent metadata is not copied onto its charge: the charge's ``metadata`` is ``{}``.
* ``pm_card_visa`` is materialised as a new ``pm_...`` PaymentMethod on every use: the
  charge's ``payment_method`` is that new id while the PI keeps ``"pm_card_visa"``.
* Charges have no ``amount_captured``, ``payment_method_details``, ``outcome``,
  ``receipt_url``, ``billing_details``; PIs have no ``amount_received``; refunds no ``reason``.
* Refunds are not capped: a refund without ``amount`` refunds the whole charge again
  even after partial refunds, and ``amount_refunded`` can exceed ``amount``.
* ``charges.list`` returns oldest first (Stripe: newest first), and of the ``created``
  filters only ``gt`` is implemented: ``gte``/``lt``/``lte`` or a bare int give HTTP 500.
* Events carry ``api_version = "2017-08-15"`` whatever the client sends. The only
  events for this flow are ``payment_intent.succeeded`` / ``payment_intent.payment_failed``:
  no ``charge.succeeded``, ``charge.refunded``, ``refund.*`` or ``payment_intent.created``;
  ``charges.create`` and ``refunds.create`` emit no event at all.
* ``DELETE /_config/data`` empties the store but keeps the registered webhooks.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
import requests
import stripe

from tests.emulator import LocalStripe

pytestmark = pytest.mark.e2e

API_KEY = "sk_test_localstripe_smoke"
WEBHOOK_SECRET = "whsec_localstripe_smoke_0123456789"


@pytest.fixture(scope="module")
def localstripe() -> Iterator[LocalStripe]:
    with LocalStripe() as ls:
        yield ls


@pytest.fixture
def emulator(localstripe: LocalStripe) -> LocalStripe:
    localstripe.flush()
    return localstripe


@pytest.fixture
def client(emulator: LocalStripe) -> Iterator[stripe.StripeClient]:
    session = requests.Session()
    session.trust_env = False  # never send 127.0.0.1 traffic through an env proxy
    yield stripe.StripeClient(
        API_KEY,
        base_addresses={"api": emulator.base_url},
        http_client=stripe.RequestsClient(session=session),
        max_network_retries=0,
    )
    session.close()


class _Receiver:
    """A tiny HTTP server on 127.0.0.1 that queues every POST it gets."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.put(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stripe/webhook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def wait_for(self, event_type: str, object_id: str, timeout: float = 10.0) -> tuple[dict[str, str], bytes]:
        """The first delivery of ``event_type`` about ``object_id``. Others are skipped:
        localstripe sends each event ~1 s late to the webhooks registered *then*, so
        events from earlier tests can still arrive here."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {event_type} webhook for {object_id} within {timeout} s")
            try:
                headers, body = self.received.get(timeout=remaining)
            except queue.Empty:
                continue
            event = json.loads(body)
            if event["type"] == event_type and event["data"]["object"].get("id") == object_id:
                return headers, body


def _confirmed_pi(client: stripe.StripeClient, **extra: object) -> stripe.PaymentIntent:
    return client.v1.payment_intents.create(
        params={
            "amount": 1999,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
            "metadata": {"order_id": "ord_1"},
            **extra,  # type: ignore[typeddict-item]
        }
    )


# -- (a) PaymentIntent -------------------------------------------------------------


def test_payment_intent_confirmed_with_pm_card_visa(client: stripe.StripeClient) -> None:
    pi = _confirmed_pi(client)
    assert pi.id.startswith("pi_")
    assert pi.status == "succeeded"
    assert pi.metadata.to_dict() == {"order_id": "ord_1"}
    assert pi.amount == 1999 and pi.currency == "usd"

    fetched = client.v1.payment_intents.retrieve(pi.id)
    assert fetched.status == "succeeded"
    assert fetched.metadata["order_id"] == "ord_1"

    charge = fetched.latest_charge
    assert isinstance(charge, stripe.Charge)  # embedded object, not an id
    assert charge.id.startswith("ch_")
    assert charge.payment_intent == pi.id
    assert charge.status == "succeeded" and charge.paid and charge.captured
    assert charge.amount == 1999 and charge.currency == "usd"
    assert charge.balance_transaction.startswith("txn_")

    # The pre-2022-11-15 `charges` list is there as well, holding the same charge.
    legacy = fetched["charges"]
    assert legacy["object"] == "list"
    assert [c["id"] for c in legacy["data"]] == [charge.id]

    # The charge can be fetched on its own.
    assert client.v1.charges.retrieve(charge.id).payment_intent == pi.id


def test_quirk_pi_metadata_not_on_charge_and_pm_card_visa_rematerialised(
    client: stripe.StripeClient,
) -> None:
    pi = _confirmed_pi(client)
    charge = pi.latest_charge
    assert isinstance(charge, stripe.Charge)
    assert charge.metadata.to_dict() == {}  # real Stripe would have {"order_id": "ord_1"}
    assert pi.payment_method == "pm_card_visa"
    assert charge.payment_method.startswith("pm_") and charge.payment_method != "pm_card_visa"
    for missing in ("amount_captured", "payment_method_details", "outcome", "receipt_url"):
        assert missing not in charge
    assert "amount_received" not in pi


# -- (b) Charge and Refund ---------------------------------------------------------


def test_charge_and_refund(client: stripe.StripeClient) -> None:
    charge = client.v1.charges.create(
        params={"amount": 5000, "currency": "eur", "source": "pm_card_visa", "metadata": {"order_id": "ord_2"}}
    )
    assert charge.id.startswith("ch_")
    assert charge.status == "succeeded" and charge.paid and charge.captured
    assert charge.payment_intent is None
    assert charge.metadata.to_dict() == {"order_id": "ord_2"}
    assert charge.amount_refunded == 0 and charge.refunded is False
    assert charge.refunds is not None and charge.refunds.data == []

    refund = client.v1.refunds.create(params={"charge": charge.id, "amount": 1500})
    assert refund.id.startswith("re_")
    assert refund.status == "succeeded"
    assert refund.charge == charge.id and refund.amount == 1500 and refund.currency == "eur"

    after = client.v1.charges.retrieve(charge.id)
    assert after.amount_refunded == 1500 and after.refunded is False
    assert after.refunds is not None
    assert [r.id for r in after.refunds.data] == [refund.id]

    rest = client.v1.refunds.create(params={"charge": charge.id, "amount": 3500})
    assert rest.amount == 3500
    done = client.v1.charges.retrieve(charge.id)
    assert done.amount_refunded == 5000 and done.refunded is True

    listed = client.v1.refunds.list(params={"charge": charge.id})
    assert {r.id for r in listed.data} == {refund.id, rest.id}


def test_quirk_refunds_are_not_capped(client: stripe.StripeClient) -> None:
    charge = client.v1.charges.create(params={"amount": 5000, "currency": "usd", "source": "pm_card_visa"})
    client.v1.refunds.create(params={"charge": charge.id, "amount": 1500})
    # Stripe would refund the 3500 left; localstripe refunds the full amount again...
    again = client.v1.refunds.create(params={"charge": charge.id})
    assert again.amount == 5000
    # ...and accepts refunding more than was charged.
    assert client.v1.charges.retrieve(charge.id).amount_refunded == 6500


def test_refund_by_payment_intent(client: stripe.StripeClient) -> None:
    pi = _confirmed_pi(client)
    refund = client.v1.refunds.create(params={"payment_intent": pi.id})
    assert refund.payment_intent == pi.id
    assert isinstance(pi.latest_charge, stripe.Charge)
    assert refund.charge == pi.latest_charge.id
    assert refund.amount == 1999
    assert client.v1.charges.retrieve(refund.charge).refunded is True


# -- (c) listing charges by creation time ------------------------------------------


def test_list_charges_created_gt(client: stripe.StripeClient) -> None:
    old = client.v1.charges.create(params={"amount": 100, "currency": "usd", "source": "pm_card_visa"})
    time.sleep(1.1)  # `created` has one-second resolution
    new = [
        client.v1.charges.create(params={"amount": 200 + i, "currency": "usd", "source": "pm_card_visa"})
        for i in range(3)
    ]
    pi_charge = _confirmed_pi(client).latest_charge
    assert isinstance(pi_charge, stripe.Charge)

    listed = client.v1.charges.list(params={"created": {"gt": old.created}})
    ids = [c.id for c in listed.data]
    assert old.id not in ids
    assert set(ids) == {c.id for c in new} | {pi_charge.id}

    everything = client.v1.charges.list(params={"limit": 100})
    assert {c.id for c in everything.data} == set(ids) | {old.id}

    # Paging with limit/starting_after works.
    page1 = client.v1.charges.list(params={"created": {"gt": old.created}, "limit": 2})
    assert len(page1.data) == 2 and page1.has_more
    page2 = client.v1.charges.list(
        params={"created": {"gt": old.created}, "limit": 2, "starting_after": page1.data[-1].id}
    )
    assert {c.id for c in page1.data} | {c.id for c in page2.data} == set(ids)


def test_quirk_charges_list_order_and_unimplemented_created_filters(client: stripe.StripeClient) -> None:
    first = client.v1.charges.create(params={"amount": 100, "currency": "usd", "source": "pm_card_visa"})
    second = client.v1.charges.create(params={"amount": 200, "currency": "usd", "source": "pm_card_visa"})
    assert [c.id for c in client.v1.charges.list().data] == [first.id, second.id]  # oldest first
    for op in ("gte", "lt", "lte"):
        with pytest.raises(stripe.APIError) as info:
            client.v1.charges.list(params={"created": {op: first.created}})
        assert info.value.http_status == 500


# -- (d) signed webhooks -----------------------------------------------------------


def test_webhook_payment_intent_succeeded_is_signed(emulator: LocalStripe, client: stripe.StripeClient) -> None:
    with _Receiver() as receiver:
        emulator.register_webhook("smoke", receiver.url, WEBHOOK_SECRET, events=["payment_intent.succeeded"])
        try:
            pi = _confirmed_pi(client)
            headers, body = receiver.wait_for("payment_intent.succeeded", pi.id)
        finally:
            # Point the (unremovable) webhook at an event nobody emits.
            emulator.register_webhook("smoke", receiver.url, WEBHOOK_SECRET, events=["none.none"])

    signature = headers["stripe-signature"]
    assert signature.startswith("t=") and ",v1=" in signature
    event = stripe.Webhook.construct_event(body.decode(), signature, WEBHOOK_SECRET)
    assert event.type == "payment_intent.succeeded"
    assert event.id.startswith("evt_")
    assert event.api_version == "2017-08-15"
    obj = event.data.object
    assert obj["id"] == pi.id
    assert obj["status"] == "succeeded"
    assert obj["metadata"].to_dict() == {"order_id": "ord_1"}
    assert obj["latest_charge"]["id"] == pi.latest_charge.id  # embedded charge here too

    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body.decode(), signature, "whsec_wrong")

    # The same event is in the emulator's event list.
    assert event.id in {e.id for e in client.v1.events.list(params={"type": "payment_intent.succeeded"}).data}


def test_quirk_only_payment_intent_events(emulator: LocalStripe, client: stripe.StripeClient) -> None:
    pi = _confirmed_pi(client)
    charge = client.v1.charges.create(params={"amount": 300, "currency": "usd", "source": "pm_card_visa"})
    client.v1.refunds.create(params={"charge": charge.id})
    client.v1.refunds.create(params={"payment_intent": pi.id})
    events = client.v1.events.list(params={"limit": 100}).data
    assert [e.type for e in events] == ["payment_intent.succeeded"]
    assert {e.api_version for e in events} == {"2017-08-15"}
