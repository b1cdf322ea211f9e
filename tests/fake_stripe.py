"""A stateful Stripe double behind `responses`: the real stripe-python SDK talks HTTP to
it. Charges, refunds, disputes, PaymentIntents and undelivered events in Stripe's real
shapes (built by tests.stripe_payloads); lists newest first with ``created[gt]`` and
``starting_after`` paging; refunds honour ``Idempotency-Key`` (replay, 400 on other
parameters) and reject over-refunds and disputed charges as Stripe does; failures can be
queued (``fail_refunds_with``) to play 429s and 500s, and a listing can fail on a given
page (``fail_list_pages``) or run code before a page is answered (``on_list``: the world
changing while a backfill reads, a slow answer moving a test clock).

Checkout Sessions (``/v1/checkout/sessions``): create (``mode``, ``success_url``,
``line_items`` with ``price_data``, ``client_reference_id``, ``metadata``,
``payment_intent_data[metadata]``, ``customer``; Idempotency-Key replayed), retrieve, list
(``created[gt]``, ``starting_after``, ``payment_intent``), expire (open sessions only), with
Stripe's 400/404 errors; ``pay_checkout_session`` plays the customer paying one (a
PaymentIntent and its charge appear); ``checkout_api = False`` answers 404 as an emulator
without sessions does.

For the property tests, additively: later state changes (``set_refund_status``,
``set_dispute_status``, ``capture_charge``, ``release_authorization``), uncaptured
authorisations (``add_authorization``), ``fail_next_refunds``, an optional ``clock`` for
the ``created`` of refunds it makes, and ``refund_log``: every refund POST with its answer
and whatever ``before_refund(params)`` returned when it arrived.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

import responses

from tests import stripe_payloads as p

API = "http://127.0.0.1:9"  # never reached: responses answers first

JSON = dict[str, Any]


class FakeStripe:
    def __init__(self, mock: responses.RequestsMock, base: str = API) -> None:
        self.base = base
        self.charges: dict[str, JSON] = {}
        self.refunds: dict[str, JSON] = {}
        self.disputes: dict[str, JSON] = {}
        self.payment_intents: dict[str, JSON] = {}
        self.undelivered_events: list[JSON] = []
        self.events_api = True
        self.checkout_sessions: dict[str, JSON] = {}
        self.checkout_api = True
        self.refund_creates = 0  # refunds actually created (not replays)
        self.refund_requests: list[JSON] = []  # every POST /v1/refunds, parsed
        self.cancel_requests: list[JSON] = []  # every POST /v1/payment_intents/<id>/cancel
        self.api_version = p.CURRENT_API_VERSION  # the account's: decides what a cancel leaves behind
        self.list_requests: list[str] = []  # every list URL
        self.fail_refunds_with: list[int] = []  # statuses for the next refund POSTs
        self.reject_next_refund: str | None = None  # an error code for the next create
        self.hide_refunds_from_lists = False  # eventual consistency
        # Listings: "charges", "refunds", "disputes", "events"; pages count from 1 (the
        # request without starting_after) within each listing.
        self.fail_list_pages: dict[tuple[str, int], int] = {}  # (listing, page) -> status, once
        self.on_list: Callable[[str, int], None] | None = None  # (listing, page), before answering
        self._list_page: dict[str, int] = {}
        self._idempotency: dict[str, tuple[JSON, int, JSON]] = {}
        # Additions for the property tests (tests/property); unused, they change nothing.
        self.clock: Any = None  # a callable giving Stripe's "now" for refunds it creates
        self.before_refund: Any = None  # called with the parsed params before a refund POST is answered
        self.refund_log: list[JSON] = []  # every refund POST with its answer (see _create_refund)
        self.released_authorizations: set[str] = set()
        b = re.escape(base)
        mock.add_callback("GET", re.compile(rf"{b}/v1/charges(\?.*)?$"), self._list("charges"))
        mock.add_callback("GET", re.compile(rf"{b}/v1/charges/[^/?]+$"), self._retrieve_charge)
        mock.add_callback("GET", re.compile(rf"{b}/v1/refunds(\?.*)?$"), self._list("refunds"))
        mock.add_callback("POST", re.compile(rf"{b}/v1/refunds$"), self._create_refund)
        mock.add_callback("GET", re.compile(rf"{b}/v1/refunds/[^/?]+$"), self._retrieve_refund)
        mock.add_callback("GET", re.compile(rf"{b}/v1/disputes(\?.*)?$"), self._list("disputes"))
        mock.add_callback("GET", re.compile(rf"{b}/v1/events(\?.*)?$"), self._list_events)
        mock.add_callback("GET", re.compile(rf"{b}/v1/payment_intents/[^/?]+$"), self._retrieve_intent)
        mock.add_callback("GET", re.compile(rf"{b}/v1/checkout/sessions(\?.*)?$"), self._list_checkout_sessions)
        mock.add_callback("POST", re.compile(rf"{b}/v1/checkout/sessions$"), self._create_checkout_session)
        mock.add_callback("GET", re.compile(rf"{b}/v1/checkout/sessions/[^/?]+$"), self._retrieve_checkout_session)
        mock.add_callback("POST", re.compile(rf"{b}/v1/checkout/sessions/[^/?]+/expire$"), self._expire_checkout_session)
        mock.add_callback("POST", re.compile(rf"{b}/v1/payment_intents/[^/?]+/cancel$"), self._cancel_intent)

    # -- seeding ---------------------------------------------------------------------------

    def add_charge(self, **fields: Any) -> JSON:
        charge = p.charge(**fields)
        self.charges[charge["id"]] = charge
        return self.charge(charge["id"])

    def add_refund(self, charge_id: str, amount: int, **fields: Any) -> JSON:
        charge = self.charges[charge_id]
        refund = p.refund(charge=charge_id, amount=amount, currency=charge["currency"], **fields)
        self.refunds[refund["id"]] = refund
        return refund

    def add_dispute(self, charge_id: str, **fields: Any) -> JSON:
        charge = self.charges[charge_id]
        dispute = p.dispute(charge=charge_id, amount=charge["amount"], currency=charge["currency"], **fields)
        self.disputes[dispute["id"]] = dispute
        charge["disputed"] = True
        return dispute

    def add_checkout_session(self, **fields: Any) -> JSON:
        """Seed a session as :func:`tests.stripe_payloads.checkout_session` builds it."""
        fields.setdefault("api_version", self.api_version)
        session = p.checkout_session(**fields)
        self.checkout_sessions[session["id"]] = session
        return dict(session)

    def pay_checkout_session(
        self, session_id: str, *, created: int | None = None, async_payment: str | None = None, **charge_fields: Any
    ) -> tuple[JSON, JSON, JSON | None]:
        """The customer pays an open session: its PaymentIntent (reused when the session
        already has one, as before 2022-08-01) and a charge carrying no order metadata. The
        session becomes ``complete``. ``async_payment`` ``"processing"`` leaves it unpaid
        with a pending charge, ``"failed"`` fails the charge (session still complete and
        unpaid, as after ``checkout.session.async_payment_failed``). Returns the session,
        the PaymentIntent and the charge."""
        session = self.checkout_sessions[session_id]
        if session["status"] != "open":
            raise ValueError(f"session {session_id} is {session['status']}")
        intent_id = session.get("payment_intent") or p.new_id("pi")
        charge_status = {"processing": "pending", "failed": "failed", None: "succeeded"}[async_payment]
        charge = self.add_charge(
            amount=session["amount_total"], currency=session["currency"], payment_intent=intent_id,
            status=charge_status, customer=session.get("customer"), created=created, **charge_fields,
        )
        intent_status = {"processing": "processing", "failed": "requires_payment_method", None: "succeeded"}[async_payment]
        self.payment_intents[intent_id] = p.payment_intent(
            id=intent_id, amount=session["amount_total"], currency=session["currency"], status=intent_status,
            latest_charge=charge["id"], customer=session.get("customer"), created=charge["created"],
            api_version=self.api_version,
        )
        session.update(
            status="complete", payment_intent=intent_id, url=None,
            payment_status="paid" if async_payment is None else "unpaid",
            customer_details={"address": None, "email": session.get("customer_email") or "jenny.rosen@example.com", "name": None, "phone": None, "tax_exempt": "none", "tax_ids": []},
        )
        return dict(session), self.payment_intents[intent_id], charge

    def charge(self, charge_id: str) -> JSON:
        """The charge as Stripe renders it now: amount_refunded follows its refunds."""
        charge = dict(self.charges[charge_id])
        refunded = sum(
            r["amount"]
            for r in self.refunds.values()
            if r["charge"] == charge_id and r["status"] in ("pending", "succeeded", "requires_action")
        )
        if charge_id in self.released_authorizations:
            refunded = charge["amount"]  # Stripe reports a released authorisation as refunded
        charge["amount_refunded"] = refunded
        charge["refunded"] = refunded >= charge["amount"]
        return charge

    # -- later state changes (additions for the property tests) ----------------------------

    def set_refund_status(self, refund_id: str, status: str, *, failure_reason: str | None = None) -> JSON:
        """A refund moving on at Stripe: pending -> succeeded/failed/canceled, or a
        succeeded refund failing later. Returns the refund as Stripe renders it now."""
        refund = dict(self.refunds[refund_id], status=status)
        if status == "failed":
            refund["failure_reason"] = failure_reason or "expired_or_canceled_card"
            refund["failure_balance_transaction"] = p.new_id("txn")
        if status in ("failed", "canceled"):
            refund["destination_details"] = {**refund["destination_details"], "card": {**refund["destination_details"]["card"], "reference_status": "unavailable"}}
        self.refunds[refund_id] = refund
        return refund

    def set_dispute_status(self, dispute_id: str, status: str) -> JSON:
        """A dispute moving on (under_review, won, lost, ...). The charge stays ``disputed``,
        as at Stripe, whatever the outcome."""
        dispute = dict(self.disputes[dispute_id], status=status)
        self.disputes[dispute_id] = dispute
        return dispute

    def add_authorization(self, *, with_intent: bool = False, **fields: Any) -> JSON:
        """An uncaptured authorisation: ``status`` succeeded, ``captured`` false; with
        ``with_intent``, on its own PaymentIntent in ``requires_capture`` (else a bare
        charge)."""
        intent_id = p.new_id("pi") if with_intent else fields.pop("payment_intent", None)
        charge = self.add_charge(captured=False, payment_intent=intent_id, **fields)
        if with_intent:
            self.payment_intents[intent_id] = p.payment_intent(
                id=intent_id, amount=charge["amount"], currency=charge["currency"], status="requires_capture",
                latest_charge=charge["id"], metadata=fields.get("metadata"), created=charge["created"],
            )
        return charge

    def capture_charge(self, charge_id: str) -> JSON:
        """Capture an authorisation in full (its PaymentIntent, if any, succeeds)."""
        charge = self.charges[charge_id]
        charge.update(captured=True, amount_captured=charge["amount"], balance_transaction=p.new_id("txn"))
        if charge.get("payment_intent") in self.payment_intents:
            self.payment_intents[charge["payment_intent"]]["status"] = "succeeded"
        return self.charge(charge_id)

    def release_authorization(self, charge_id: str) -> JSON:
        """Cancel (release) an uncaptured authorisation: Stripe then reports its whole
        amount as refunded, and it stays uncaptured."""
        self.released_authorizations.add(charge_id)
        return self.charge(charge_id)

    def fail_next_refunds(self, n: int, status: int = 500) -> None:
        """The next ``n`` refund POSTs are answered ``status`` (429 or 5xx)."""
        self.fail_refunds_with.extend([status] * n)

    def refunds_of(self, charge_id: str) -> list[JSON]:
        return [r for r in self.refunds.values() if r["charge"] == charge_id]

    # -- handlers --------------------------------------------------------------------------

    def _list(self, kind: str):  # type: ignore[no-untyped-def]
        def handler(request):  # type: ignore[no-untyped-def]
            self.list_requests.append(request.url)
            failure = self._before_list(kind, request)
            if failure is not None:
                return failure
            query = parse_qs(urlparse(request.url).query)
            store = {"charges": self.charges, "refunds": self.refunds, "disputes": self.disputes}[kind]
            items = [self.charge(i) if kind == "charges" else o for i, o in store.items()]
            if kind == "refunds" and self.hide_refunds_from_lists:
                items = []
            if "charge" in query:
                items = [o for o in items if o.get("charge") == query["charge"][0]]
            return self._page(items, query, f"/v1/{kind}")

        return handler

    def _before_list(self, kind: str, request):  # type: ignore[no-untyped-def]
        query = parse_qs(urlparse(request.url).query)
        page = self._list_page.get(kind, 0) + 1 if "starting_after" in query else 1
        self._list_page[kind] = page
        if self.on_list is not None:
            self.on_list(kind, page)
        status = self.fail_list_pages.pop((kind, page), None)
        if status is None:
            return None
        return _error(status, "api_error", "Something went wrong on Stripe's end.", None)

    def _page(self, items: list[JSON], query: dict[str, list[str]], url: str) -> tuple[int, dict, str]:
        if "created[gt]" in query:
            items = [o for o in items if o["created"] > int(query["created[gt]"][0])]
        items.sort(key=lambda o: (o["created"], o["id"]), reverse=True)  # newest first
        if "starting_after" in query:
            ids = [o["id"] for o in items]
            items = items[ids.index(query["starting_after"][0]) + 1 :]
        limit = int(query.get("limit", ["10"])[0])
        body = {"object": "list", "url": url, "has_more": len(items) > limit, "data": items[:limit]}
        return 200, {}, json.dumps(body)

    def _list_events(self, request):  # type: ignore[no-untyped-def]
        self.list_requests.append(request.url)
        if not self.events_api:
            return _error(404, "invalid_request_error", "Unrecognized request URL (GET: /v1/events).", None)
        failure = self._before_list("events", request)
        if failure is not None:
            return failure
        query = parse_qs(urlparse(request.url).query)
        return self._page(list(self.undelivered_events), query, "/v1/events")

    # -- Checkout Sessions -------------------------------------------------------------------

    def _checkout_unavailable(self, request):  # type: ignore[no-untyped-def]
        path = urlparse(request.url).path
        return _error(404, "invalid_request_error", f"Unrecognized request URL ({request.method}: {path}).", None)

    def _list_checkout_sessions(self, request):  # type: ignore[no-untyped-def]
        self.list_requests.append(request.url)
        if not self.checkout_api:
            return self._checkout_unavailable(request)
        failure = self._before_list("checkout_sessions", request)
        if failure is not None:
            return failure
        query = parse_qs(urlparse(request.url).query)
        items = [dict(o) for o in self.checkout_sessions.values()]
        if "payment_intent" in query:
            items = [o for o in items if o.get("payment_intent") == query["payment_intent"][0]]
        return self._page(items, query, "/v1/checkout/sessions")

    def _retrieve_checkout_session(self, request):  # type: ignore[no-untyped-def]
        if not self.checkout_api:
            return self._checkout_unavailable(request)
        session_id = urlparse(request.url).path.rsplit("/", 1)[1]
        if session_id not in self.checkout_sessions:
            return _error(404, "invalid_request_error", f"No such checkout.session: '{session_id}'", "resource_missing")
        return 200, {}, json.dumps(self.checkout_sessions[session_id])

    def _create_checkout_session(self, request):  # type: ignore[no-untyped-def]
        if not self.checkout_api:
            return self._checkout_unavailable(request)
        raw = request.body if isinstance(request.body, str) else (request.body or b"").decode()
        params = {k: v[0] for k, v in parse_qs(raw).items()}
        key = request.headers.get("Idempotency-Key")
        if key and key in self._idempotency:
            seen, status, body = self._idempotency[key]
            if seen != params:
                return _error(400, "idempotency_error", "Keys for idempotent requests can only be used with the same parameters they were first used with.", None)
            return status, {"Idempotent-Replayed": "true"}, json.dumps(body)
        status, body = self._new_checkout_session(params)
        if key:
            self._idempotency[key] = (params, status, body)
        return status, {}, json.dumps(body)

    def _new_checkout_session(self, params: JSON) -> tuple[int, JSON]:
        for required in ("mode", "success_url"):
            if required not in params:
                return 400, _error_body("invalid_request_error", f"Missing required param: {required}.", "parameter_missing", param=required)
        if params["mode"] not in ("payment", "setup", "subscription"):
            return 400, _error_body("invalid_request_error", f"Invalid mode: must be one of payment, setup, or subscription", "parameter_invalid_string", param="mode")
        if params["mode"] == "payment" and "line_items[0][price_data][unit_amount]" not in params:
            return 400, _error_body("invalid_request_error", "You must specify either `line_items` or `prices` in `payment` mode.", "parameter_missing", param="line_items")
        total, currency, i = 0, None, 0
        while f"line_items[{i}][price_data][unit_amount]" in params:
            total += int(params[f"line_items[{i}][price_data][unit_amount]"]) * int(params.get(f"line_items[{i}][quantity]", "1"))
            currency = params.get(f"line_items[{i}][price_data][currency]", currency)
            i += 1
        metadata = {k[len("metadata["):-1]: v for k, v in params.items() if k.startswith("metadata[")}
        created = {"created": int(self.clock())} if self.clock is not None else {}
        session = p.checkout_session(
            amount_total=total if params["mode"] == "payment" else None, currency=currency, mode=params["mode"],
            status="open", client_reference_id=params.get("client_reference_id"), metadata=metadata,
            customer=params.get("customer"), customer_email=params.get("customer_email"),
            api_version=self.api_version, **created,
        )
        session["success_url"] = params["success_url"]
        session["cancel_url"] = params.get("cancel_url")
        self.checkout_sessions[session["id"]] = session
        return 200, dict(session)

    def _expire_checkout_session(self, request):  # type: ignore[no-untyped-def]
        if not self.checkout_api:
            return self._checkout_unavailable(request)
        session_id = urlparse(request.url).path.rstrip("/").split("/")[-2]
        if session_id not in self.checkout_sessions:
            return _error(404, "invalid_request_error", f"No such checkout.session: '{session_id}'", "resource_missing")
        session = self.checkout_sessions[session_id]
        if session["status"] != "open":
            return 400, {}, json.dumps(_error_body(
                "invalid_request_error",
                f"Only Checkout Sessions with a status in [\"open\"] can be expired. This Checkout Session has a status of \"{session['status']}\".",
                None,
            ))
        session.update(status="expired", url=None)
        return 200, {}, json.dumps(session)

    def _retrieve_charge(self, request):  # type: ignore[no-untyped-def]
        charge_id = urlparse(request.url).path.rsplit("/", 1)[1]
        if charge_id not in self.charges:
            return _error(404, "invalid_request_error", f"No such charge: '{charge_id}'", "resource_missing")
        return 200, {}, json.dumps(self.charge(charge_id))

    def _retrieve_refund(self, request):  # type: ignore[no-untyped-def]
        refund_id = urlparse(request.url).path.rsplit("/", 1)[1]
        if refund_id not in self.refunds:
            return _error(404, "invalid_request_error", f"No such refund: '{refund_id}'", "resource_missing")
        return 200, {}, json.dumps(self.refunds[refund_id])

    def _retrieve_intent(self, request):  # type: ignore[no-untyped-def]
        intent_id = urlparse(request.url).path.rsplit("/", 1)[1]
        if intent_id not in self.payment_intents:
            return _error(404, "invalid_request_error", f"No such payment_intent: '{intent_id}'", "resource_missing")
        return 200, {}, json.dumps(self.payment_intents[intent_id])

    def _cancel_intent(self, request):  # type: ignore[no-untyped-def]
        """POST /v1/payment_intents/<id>/cancel: releases an authorisation. Before API
        version 2025-03-31 the release also creates a Refund of the authorised amount (so
        the charge shows it as refunded); from then on nothing on the charge changes."""
        intent_id = urlparse(request.url).path.rstrip("/").split("/")[-2]
        params = {k: v[0] for k, v in parse_qs(request.body if isinstance(request.body, str) else (request.body or b"").decode()).items()}
        key = request.headers.get("Idempotency-Key")
        self.cancel_requests.append({**params, "_intent": intent_id, "_idempotency_key": key})
        if key and key in self._idempotency:
            seen, status, body = self._idempotency[key]
            return status, {"Idempotent-Replayed": "true"}, json.dumps(body)
        if intent_id not in self.payment_intents:
            return _error(404, "invalid_request_error", f"No such payment_intent: '{intent_id}'", "resource_missing")
        intent = self.payment_intents[intent_id]
        if intent["status"] not in ("requires_payment_method", "requires_capture", "requires_confirmation", "requires_action"):
            status, body = 400, _error_body("invalid_request_error", f"You cannot cancel this PaymentIntent because it has a status of {intent['status']}.", "payment_intent_unexpected_state")
        else:
            intent.update(status="canceled", cancellation_reason=params.get("cancellation_reason"), amount_capturable=0)
            for charge in self.charges.values():
                if charge.get("payment_intent") == intent_id and not charge.get("captured") and self.api_version[:10] < "2025-03-31":
                    refund = p.refund(charge=charge["id"], amount=charge["amount"], currency=charge["currency"])
                    self.refunds[refund["id"]] = refund
            status, body = 200, dict(intent)
        if key:
            self._idempotency[key] = (params, status, body)
        return status, {}, json.dumps(body)

    def _create_refund(self, request):  # type: ignore[no-untyped-def]
        params = {k: v[0] for k, v in parse_qs(request.body if isinstance(request.body, str) else request.body.decode()).items()}
        key = request.headers.get("Idempotency-Key")
        context = self.before_refund(dict(params)) if self.before_refund is not None else None
        replay = bool(key and key in self._idempotency)
        creates_before = self.refund_creates
        status, headers, body = self._answer_refund(request, params, key)
        answer = json.loads(body)
        self.refund_log.append(
            {
                "params": params,
                "key": key,
                "replay": replay,
                "status": status,
                "error_code": (answer.get("error") or {}).get("code") if status >= 400 else None,
                "error_type": (answer.get("error") or {}).get("type") if status >= 400 else None,
                "created_refund_id": answer.get("id") if self.refund_creates > creates_before else None,
                "context": context,
            }
        )
        return status, headers, body

    def _answer_refund(self, request, params: JSON, key: str | None):  # type: ignore[no-untyped-def]
        self.refund_requests.append({**params, "_idempotency_key": key})
        if self.fail_refunds_with:
            status = self.fail_refunds_with.pop(0)
            if status == 429:
                return _error(429, "invalid_request_error", "Request rate limit exceeded.", "rate_limit")
            return _error(status, "api_error", "Something went wrong on Stripe's end.", None)
        if key and key in self._idempotency:
            seen, status, body = self._idempotency[key]
            if seen != params:
                return _error(400, "idempotency_error", "Keys for idempotent requests can only be used with the same parameters they were first used with.", None)
            return status, {"Idempotent-Replayed": "true"}, json.dumps(body)
        status, body = self._refund(params)
        if key:
            self._idempotency[key] = (params, status, body)
        return status, {}, json.dumps(body)

    def _refund(self, params: JSON) -> tuple[int, JSON]:
        charge_id = params["charge"]
        if charge_id not in self.charges:
            return 404, _error_body("invalid_request_error", f"No such charge: '{charge_id}'", "resource_missing")
        if self.reject_next_refund:
            code, self.reject_next_refund = self.reject_next_refund, None
            return 400, _error_body("invalid_request_error", f"Refund refused ({code}).", code)
        charge = self.charge(charge_id)
        if charge.get("disputed"):
            return 400, _error_body("invalid_request_error", f"Charge {charge_id} has been charged back; cannot issue a refund.", "charge_disputed")
        amount = int(params.get("amount", charge["amount"] - charge["amount_refunded"]))
        left = charge["amount"] - charge["amount_refunded"]
        if amount > left:
            return 400, _error_body(
                "invalid_request_error",
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})",
                "amount_too_large" if charge["amount_refunded"] == 0 else "charge_already_refunded",
            )
        metadata = {k[len("metadata[") : -1]: v for k, v in params.items() if k.startswith("metadata[")}
        created = {"created": int(self.clock())} if self.clock is not None else {}
        refund = p.refund(charge=charge_id, amount=amount, currency=charge["currency"], reason=params.get("reason"), metadata=metadata, **created)
        self.refunds[refund["id"]] = refund
        self.refund_creates += 1
        return 200, refund


def _error_body(kind: str, message: str, code: str | None, *, param: str | None = None) -> JSON:
    error: JSON = {"type": kind, "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    return {"error": error}


def _error(status: int, kind: str, message: str, code: str | None) -> tuple[int, dict, str]:
    return status, {}, json.dumps(_error_body(kind, message, code))
