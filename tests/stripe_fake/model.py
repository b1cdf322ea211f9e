"""The state of the fake Stripe and how it answers a request.

:class:`StripeModel` holds Stripe's objects in their real shapes (built by
:mod:`tests.stripe_payloads`) and answers ``handle(method, url, form, headers)`` with
``(status, body, headers)``; it knows nothing of sockets or of ``responses``. Every method
is safe to call from many threads: state changes happen under :attr:`StripeModel.lock`
(re-entrant), and the only waits (``delay``, a ``slow`` script) happen outside it.
"""

from __future__ import annotations

import collections
import copy
import json
import re
import threading
import time
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import parse_qsl, urlsplit

from tests import stripe_payloads as p

JSON = dict[str, Any]
Answer = tuple[int, JSON, dict[str, str]]  # status, body, extra response headers

# PaymentIntent statuses that allow an amount change or a cancel, in the current names and
# in those before 2019-02-11.
UPDATABLE_AMOUNT = frozenset({"requires_payment_method", "requires_confirmation", "requires_action", "requires_source", "requires_source_action"})
CANCELABLE = UPDATABLE_AMOUNT | {"requires_capture"}
# The writes that scripts (fail_next) can make misbehave.
WRITES = ("create", "update", "cancel", "session_create", "expire", "refund", "charge_create")
# From this API version on, canceling a PaymentIntent no longer refunds its authorisation.
_CANCEL_WITHOUT_REFUND = "2025-03-31"
_SAME_PARAMETERS = "Keys for idempotent requests can only be used with the same parameters they were first used with."


class Headers(Protocol):
    """A request's headers, read case-insensitively (``requests``' and ``http.server``'s)."""

    def get(self, name: str) -> Any: ...


class StripeModel:
    """Stripe's objects and rules, answering requests whatever carries them.

    Objects: ``charges``, ``refunds``, ``disputes``, ``payment_intents`` (also
    ``intents``), ``checkout_sessions`` (also ``sessions``; a session created through the
    API keeps its ``payment_intent_data[metadata]`` as ``_pi_metadata``, never answered)
    and ``undelivered_events``, each a dict by id (events: a list).

    Endpoints: charges (create, retrieve, list), refunds (create, retrieve, list), disputes
    (list), events (list), PaymentIntents (create, retrieve, update ``amount``, cancel,
    list), Checkout Sessions (create, retrieve, expire, list). Anything else is Stripe's 404
    for an unrecognised URL; ``events_api`` / ``checkout_api`` False answer that 404 for
    events / sessions too, as an emulator without them does.

    Lists are newest first with ``created[gt|gte|lt|lte]``, ``starting_after``, ``limit``
    (default 10) and the filters ``charge``, ``payment_intent`` and ``customer``.

    Idempotency-Key on every POST, as Stripe keeps it: the first answer for a key is stored
    (``keys``: key -> (parameters, status, body)) and replayed with ``Idempotent-Replayed:
    true`` for the same endpoint and parameters; other parameters or another endpoint get a
    400 ``idempotency_error``; a key whose first request is still running gets a 409.

    Misbehaviour on demand:

    * ``delay`` seconds before every write is carried out (a slow Stripe makes races visible);
    * ``scripts[write]`` (see :meth:`fail_next`): for the next ``create`` (PaymentIntent),
      ``update``, ``cancel``, ``session_create``, ``expire``, ``refund`` or
      ``charge_create``: ``error``, ``slow``, or ``create_then_error`` /
      ``change_then_error`` (the write happens, the answer is a 5xx, stored for the key);
    * ``fail_refunds_with``: statuses (429, 5xx) for the next refund POSTs, answered in front
      of Stripe (before the key is looked at; nothing stored); ``reject_next_refund``: an
      error code refusing the next refund Stripe would have made;
    * ``fail_list_pages[(listing, page)] = status`` fails that page once (pages count from
      1, the request without ``starting_after``, within ``charges``, ``refunds``,
      ``disputes``, ``events``, ``checkout_sessions``, ``payment_intents``);
      ``on_list(listing, page)`` runs before a page is answered;
      ``hide_refunds_from_lists`` leaves refunds out of their listing;
    * ``clock``: a callable giving Stripe's "now" for what requests create;
      ``before_refund(params)``: called as a refund POST arrives, its result kept in
      ``refund_log``.

    What happened: ``requests`` (method, path) of every request; ``list_requests`` (every
    list URL as sent); ``refund_requests``, ``cancel_requests`` (parsed, with
    ``_idempotency_key``; cancels with ``_intent``); ``refund_log`` (every refund POST with
    its answer); ``creates`` / ``create_requests`` (PaymentIntents made / create POSTs),
    ``session_creates``, ``refund_creates`` (objects made, replays not counted).
    """

    def __init__(self, *, delay: float = 0.0, events_api: bool = True, checkout_api: bool = True) -> None:
        self.lock = threading.RLock()
        self._apis = (events_api, checkout_api)
        self._clear(delay=delay)

    def _clear(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        # The account's API version: how PaymentIntents and sessions are rendered, and what
        # a cancel leaves behind.
        self.api_version = p.CURRENT_API_VERSION
        self.events_api, self.checkout_api = self._apis
        self.charges: dict[str, JSON] = {}
        self.refunds: dict[str, JSON] = {}
        self.disputes: dict[str, JSON] = {}
        self.payment_intents: dict[str, JSON] = {}
        self.checkout_sessions: dict[str, JSON] = {}
        self.undelivered_events: list[JSON] = []
        self.released_authorizations: set[str] = set()
        self.keys: dict[str, tuple[str, int, JSON]] = {}
        self.in_progress: set[str] = set()
        self.creates = 0
        self.create_requests = 0
        self.session_creates = 0
        self.refund_creates = 0
        self.requests: list[tuple[str, str]] = []
        self.list_requests: list[str] = []
        self.refund_requests: list[JSON] = []
        self.cancel_requests: list[JSON] = []
        self.refund_log: list[JSON] = []
        self.scripts: dict[str, collections.deque[dict[str, Any]]] = {write: collections.deque() for write in WRITES}
        self.fail_refunds_with: list[int] = []
        self.reject_next_refund: str | None = None
        self.hide_refunds_from_lists = False
        self.fail_list_pages: dict[tuple[str, int], int] = {}
        self.on_list: Callable[[str, int], None] | None = None
        self.clock: Callable[[], float] | None = None
        self.before_refund: Callable[[JSON], Any] | None = None
        self._list_page: dict[str, int] = {}

    def reset(self, *, delay: float = 0.0) -> None:
        """Forget everything: a new, empty Stripe (the lock stays)."""
        with self.lock:
            self._clear(delay=delay)

    @property
    def intents(self) -> dict[str, JSON]:
        return self.payment_intents

    @property
    def sessions(self) -> dict[str, JSON]:
        return self.checkout_sessions

    @property
    def script(self) -> collections.deque[dict[str, Any]]:
        """The scripts of the PaymentIntent create."""
        return self.scripts["create"]

    # -- seeding and later changes (what happens at Stripe without a request of ours) --------

    def add_charge(self, **fields: Any) -> JSON:
        charge = p.charge(**fields)
        with self.lock:
            self.charges[charge["id"]] = charge
            return self.charge(charge["id"])

    def add_refund(self, charge_id: str, amount: int, **fields: Any) -> JSON:
        with self.lock:
            charge = self.charges[charge_id]
            refund = p.refund(charge=charge_id, amount=amount, currency=charge["currency"], **fields)
            self.refunds[refund["id"]] = refund
            return refund

    def add_dispute(self, charge_id: str, **fields: Any) -> JSON:
        with self.lock:
            charge = self.charges[charge_id]
            dispute = p.dispute(charge=charge_id, amount=charge["amount"], currency=charge["currency"], **fields)
            self.disputes[dispute["id"]] = dispute
            charge["disputed"] = True
            return dispute

    def add_intent(self, **fields: Any) -> JSON:
        """A PaymentIntent that exists at Stripe without any request of ours (by default
        ``requires_payment_method``, in the account's API version)."""
        fields.setdefault("status", "requires_payment_method")
        fields.setdefault("api_version", self.api_version)
        intent = p.payment_intent(**fields)
        with self.lock:
            self.payment_intents[intent["id"]] = intent
        return intent

    def set_status(self, intent_id: str, status: str) -> None:
        with self.lock:
            self.payment_intents[intent_id]["status"] = status

    def add_checkout_session(self, **fields: Any) -> JSON:
        """Seed a session as :func:`tests.stripe_payloads.checkout_session` builds it."""
        fields.setdefault("api_version", self.api_version)
        session = p.checkout_session(**fields)
        with self.lock:
            self.checkout_sessions[session["id"]] = session
        return dict(session)

    def pay_checkout_session(
        self, session_id: str, *, created: int | None = None, async_payment: str | None = None, **charge_fields: Any
    ) -> tuple[JSON, JSON, JSON | None]:
        """The customer pays an open session: its PaymentIntent (reused when the session
        already has one, as before 2022-08-01; carrying the session's
        ``payment_intent_data[metadata]``) and a charge carrying no order metadata. The
        session becomes ``complete``. ``async_payment`` ``"processing"`` leaves it unpaid
        with a pending charge, ``"failed"`` fails the charge (session still complete and
        unpaid, as after ``checkout.session.async_payment_failed``). Returns the session,
        the PaymentIntent and the charge."""
        with self.lock:
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
                metadata=session.get("_pi_metadata"), api_version=self.api_version,
            )
            session.update(
                status="complete", payment_intent=intent_id, url=None,
                payment_status="paid" if async_payment is None else "unpaid",
                customer_details={"address": None, "email": session.get("customer_email") or "jenny.rosen@example.com", "name": None, "phone": None, "tax_exempt": "none", "tax_ids": []},
            )
            return _public(session), self.payment_intents[intent_id], charge

    def complete_session(self, session_id: str) -> JSON:
        """The customer paid: ``complete``/``paid`` with a succeeded PaymentIntent (see
        :meth:`pay_checkout_session`). Returns the session."""
        return self.pay_checkout_session(session_id)[0]

    def expire_session(self, session_id: str) -> None:
        """The session reached its ``expires_at`` (Stripe expires it by itself)."""
        with self.lock:
            self.checkout_sessions[session_id].update(status="expired", url=None)

    def open_sessions(self, order_id: str | None = None) -> list[JSON]:
        with self.lock:
            return [
                _public(s) for s in self.checkout_sessions.values()
                if s["status"] == "open" and (order_id is None or s["client_reference_id"] == order_id)
            ]

    def set_refund_status(self, refund_id: str, status: str, *, failure_reason: str | None = None) -> JSON:
        """A refund moving on at Stripe: pending -> succeeded/failed/canceled, or a
        succeeded refund failing later. Returns the refund as Stripe renders it now."""
        with self.lock:
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
        with self.lock:
            dispute = dict(self.disputes[dispute_id], status=status)
            self.disputes[dispute_id] = dispute
            return dispute

    def add_authorization(self, *, with_intent: bool = False, **fields: Any) -> JSON:
        """An uncaptured authorisation: ``status`` succeeded, ``captured`` false; with
        ``with_intent``, on its own PaymentIntent in ``requires_capture`` (else a bare
        charge)."""
        intent_id = p.new_id("pi") if with_intent else fields.pop("payment_intent", None)
        with self.lock:
            charge = self.add_charge(captured=False, payment_intent=intent_id, **fields)
            if with_intent:
                self.payment_intents[intent_id] = p.payment_intent(
                    id=intent_id, amount=charge["amount"], currency=charge["currency"], status="requires_capture",
                    latest_charge=charge["id"], metadata=fields.get("metadata"), created=charge["created"],
                )
            return charge

    def capture_charge(self, charge_id: str) -> JSON:
        """Capture an authorisation in full (its PaymentIntent, if any, succeeds)."""
        with self.lock:
            charge = self.charges[charge_id]
            charge.update(captured=True, amount_captured=charge["amount"], balance_transaction=p.new_id("txn"))
            if charge.get("payment_intent") in self.payment_intents:
                self.payment_intents[charge["payment_intent"]]["status"] = "succeeded"
            return self.charge(charge_id)

    def release_authorization(self, charge_id: str) -> JSON:
        """Cancel (release) an uncaptured authorisation: Stripe then reports its whole
        amount as refunded, and it stays uncaptured."""
        with self.lock:
            self.released_authorizations.add(charge_id)
            return self.charge(charge_id)

    # -- test controls and reading -----------------------------------------------------------

    def fail_next(self, kind: str, *, on: str = "create", **options: Any) -> None:
        """Misbehave on the next ``on`` write (one of ``WRITES``; ``create`` is the
        PaymentIntent create):

        * ``error``: answer ``status`` with ``error`` (Stripe's error object), changing
          nothing; stored for the key unless ``store=False`` (a 500 from in front of
          Stripe's API, before execution, is not stored);
        * ``create_then_error`` / ``change_then_error``: carry the write out, then answer
          ``status`` (500) and store that answer for the key (Stripe's worst case);
        * ``slow``: take ``seconds`` (longer than the client's timeout), then carry it out
          and store the result as usual.
        """
        with self.lock:
            self.scripts[on].append({"kind": kind, **options})

    def fail_next_refunds(self, n: int, status: int = 500) -> None:
        """The next ``n`` refund POSTs are answered ``status`` (429 or 5xx)."""
        with self.lock:
            self.fail_refunds_with.extend([status] * n)

    def charge(self, charge_id: str) -> JSON:
        """The charge as Stripe renders it now: amount_refunded follows its refunds."""
        with self.lock:
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

    def refunds_of(self, charge_id: str) -> list[JSON]:
        with self.lock:
            return [r for r in self.refunds.values() if r["charge"] == charge_id]

    def count(self, method: str, path_prefix: str) -> int:
        with self.lock:
            return sum(1 for m, path in self.requests if m == method and path.startswith(path_prefix))

    # -- answering a request -------------------------------------------------------------------

    def handle(self, method: str, url: str, form: Mapping[str, str], headers: Headers) -> Answer:
        """Answer one request: ``url`` as the client sent it (path and query string),
        ``form`` the decoded body parameters (``metadata[order_id]`` style keys),
        ``headers`` the request's (``Idempotency-Key``)."""
        path = urlsplit(url).path
        with self.lock:
            self.requests.append((method, path))
        request = _Request(method, url, path, dict(form), headers.get("Idempotency-Key"))
        for route_method, pattern, handler in _ROUTES:
            match = pattern.fullmatch(path.rstrip("/"))
            if route_method == method and match:
                return handler(self, request, *match.groups())
        return _unrecognized(request)

    # -- listings --------------------------------------------------------------------------

    def _list(self, request: "_Request", listing: str) -> Answer:
        with self.lock:
            self.list_requests.append(request.url)
        if (listing == "events" and not self.events_api) or (listing == "checkout_sessions" and not self.checkout_api):
            return _unrecognized(request)
        query = request.query()
        with self.lock:
            page = self._list_page.get(listing, 0) + 1 if "starting_after" in query else 1
            self._list_page[listing] = page
        if self.on_list is not None:
            self.on_list(listing, page)
        with self.lock:
            status = self.fail_list_pages.pop((listing, page), None)
            if status is not None:
                return status, _error("api_error", "Something went wrong on Stripe's end."), {}
            items = self._listed(listing)
        return _page(items, query, f"/v1/{listing.replace('_', '/') if listing == 'checkout_sessions' else listing}")

    def _listed(self, listing: str) -> list[JSON]:
        if listing == "charges":
            return [self.charge(charge_id) for charge_id in self.charges]
        if listing == "refunds":
            return [] if self.hide_refunds_from_lists else [dict(r) for r in self.refunds.values()]
        if listing == "disputes":
            return [dict(d) for d in self.disputes.values()]
        if listing == "events":
            return [dict(e) for e in self.undelivered_events]
        if listing == "payment_intents":
            return [copy.deepcopy(i) for i in self.payment_intents.values()]
        return [_public(s) for s in self.checkout_sessions.values()]

    def _retrieve(self, request: "_Request", object_id: str, store: str) -> Answer:
        if store == "checkout_sessions" and not self.checkout_api:
            return _unrecognized(request)
        with self.lock:
            objects: dict[str, JSON] = getattr(self, store)
            if object_id not in objects:
                kind = {"charges": "charge", "refunds": "refund", "payment_intents": "payment_intent", "checkout_sessions": "checkout.session"}[store]
                return 404, _error("invalid_request_error", f"No such {kind}: '{object_id}'", "resource_missing"), {}
            body = self.charge(object_id) if store == "charges" else _public(objects[object_id])
        return 200, body, {}

    # -- writes under Idempotency-Key ------------------------------------------------------

    def _write(self, write: str, request: "_Request", act: Callable[[], tuple[int, JSON]]) -> Answer:
        """One write under Idempotency-Key (replay, 400 on other parameters or another
        endpoint, 409 while in flight), after ``delay`` and playing the next of
        ``scripts[write]``; ``act`` (called under the lock) carries it out."""
        key = request.key
        fingerprint = json.dumps({"endpoint": f"{request.method} {request.path}", **request.form}, sort_keys=True)
        with self.lock:
            replay = self._claim_key(key, fingerprint)
            if replay is not None:
                return replay
            action: dict[str, Any] = self.scripts[write].popleft() if self.scripts[write] else {"kind": "ok"}
            delay = self.delay
        try:
            pause = float(action.get("seconds", delay)) if action["kind"] == "slow" else delay
            if pause:
                time.sleep(pause)
            store = True
            status: int
            body: JSON
            if action["kind"] == "error":
                status, body = int(action.get("status", 500)), {"error": action.get("error") or {"type": "api_error", "message": "boom"}}
                store = bool(action.get("store", True))
            else:
                with self.lock:
                    status, body = act()
                if action["kind"] in ("create_then_error", "change_then_error") and status == 200:
                    after = "create" if action["kind"] == "create_then_error" else "change"
                    status, body = int(action.get("status", 500)), {"error": {"type": "api_error", "message": f"boom after {after}"}}
            with self.lock:
                if key is not None and store:
                    self.keys[key] = (fingerprint, status, body)
            return status, body, {}
        finally:
            if key is not None:
                with self.lock:
                    self.in_progress.discard(key)

    def _claim_key(self, key: str | None, fingerprint: str) -> Answer | None:
        """Idempotency-Key as Stripe keeps it (caller holds the lock): the stored answer
        for a key seen with these parameters, 400 for other parameters, 409 while its
        first request runs; None when the request is new (the key is then in progress)."""
        if key is None:
            return None
        if key in self.in_progress:
            return 409, _error("idempotency_error", "There is currently another in-progress request using this Idempotent Key."), {}
        if key in self.keys:
            seen, status, body = self.keys[key]
            if seen != fingerprint:
                return 400, _error("idempotency_error", _SAME_PARAMETERS), {}
            return status, body, {"Idempotent-Replayed": "true"}
        self.in_progress.add(key)
        return None

    def _created(self) -> int | None:
        """``created`` for what a request makes: Stripe's clock when one is set (else the
        builders take the time)."""
        return int(self.clock()) if self.clock is not None else None

    # -- charges and refunds ---------------------------------------------------------------

    def _create_charge(self, request: "_Request") -> Answer:
        return self._write("charge_create", request, lambda: self._new_charge(request.form))

    def _new_charge(self, form: JSON) -> tuple[int, JSON]:
        amount = form.get("amount", "")
        if not amount.isdigit() or int(amount) <= 0:
            return 400, _error("invalid_request_error", "Invalid positive integer", "parameter_invalid_integer", param="amount")
        if not form.get("currency"):
            return 400, _error("invalid_request_error", "Missing required param: currency.", "parameter_missing", param="currency")
        charge = p.charge(
            amount=int(amount), currency=form["currency"].lower(), customer=form.get("customer"),
            metadata=_sub(form, "metadata"), api_version=self.api_version, created=self._created(),
        )
        self.charges[charge["id"]] = charge
        return 200, self.charge(charge["id"])

    def _create_refund(self, request: "_Request") -> Answer:
        params, key = request.form, request.key
        context = self.before_refund(dict(params)) if self.before_refund is not None else None
        with self.lock:
            replay = bool(key and key in self.keys)
            creates_before = self.refund_creates
            self.refund_requests.append({**params, "_idempotency_key": key})
            failure = self.fail_refunds_with.pop(0) if self.fail_refunds_with else None
        answer: Answer
        if failure == 429:
            answer = 429, _error("invalid_request_error", "Request rate limit exceeded.", "rate_limit"), {}
        elif failure is not None:
            answer = failure, _error("api_error", "Something went wrong on Stripe's end."), {}
        else:
            answer = self._write("refund", request, lambda: self._new_refund(params))
        status, body, _ = answer
        with self.lock:
            self.refund_log.append(
                {
                    "params": params,
                    "key": key,
                    "replay": replay,
                    "status": status,
                    "error_code": (body.get("error") or {}).get("code") if status >= 400 else None,
                    "error_type": (body.get("error") or {}).get("type") if status >= 400 else None,
                    "created_refund_id": body.get("id") if self.refund_creates > creates_before else None,
                    "context": context,
                }
            )
        return answer

    def _new_refund(self, params: JSON) -> tuple[int, JSON]:
        charge_id = params.get("charge", "")
        if charge_id not in self.charges:
            return 404, _error("invalid_request_error", f"No such charge: '{charge_id}'", "resource_missing")
        if self.reject_next_refund:
            code, self.reject_next_refund = self.reject_next_refund, None
            return 400, _error("invalid_request_error", f"Refund refused ({code}).", code)
        charge = self.charge(charge_id)
        if charge.get("disputed"):
            return 400, _error("invalid_request_error", f"Charge {charge_id} has been charged back; cannot issue a refund.", "charge_disputed")
        left = charge["amount"] - charge["amount_refunded"]
        amount = int(params.get("amount", left))
        if amount > left:
            return 400, _error(
                "invalid_request_error",
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})",
                "amount_too_large" if charge["amount_refunded"] == 0 else "charge_already_refunded",
            )
        refund = p.refund(
            charge=charge_id, amount=amount, currency=charge["currency"], reason=params.get("reason"),
            metadata=_sub(params, "metadata"), created=self._created(),
        )
        self.refunds[refund["id"]] = refund
        self.refund_creates += 1
        return 200, refund

    # -- PaymentIntents --------------------------------------------------------------------

    def _create_intent(self, request: "_Request") -> Answer:
        with self.lock:
            self.create_requests += 1
        return self._write("create", request, lambda: self._new_intent(request.form))

    def _new_intent(self, form: JSON) -> tuple[int, JSON]:
        for required in ("amount", "currency"):
            if required not in form:
                return 400, _error("invalid_request_error", f"Missing required param: {required}.", "parameter_missing", param=required)
        intent = p.payment_intent(
            amount=int(form["amount"]), currency=form["currency"], status="requires_payment_method",
            customer=form.get("customer"), metadata=_sub(form, "metadata"), api_version=self.api_version, created=self._created(),
        )
        self.payment_intents[intent["id"]] = intent
        self.creates += 1
        return 200, copy.deepcopy(intent)

    def _update_intent(self, request: "_Request", intent_id: str) -> Answer:
        return self._write("update", request, lambda: self._change_intent("update", intent_id, request.form))

    def _cancel_intent(self, request: "_Request", intent_id: str) -> Answer:
        with self.lock:
            self.cancel_requests.append({**request.form, "_intent": intent_id, "_idempotency_key": request.key})
        return self._write("cancel", request, lambda: self._change_intent("cancel", intent_id, request.form))

    def _change_intent(self, change: str, intent_id: str, form: JSON) -> tuple[int, JSON]:
        """An amount update, or a cancel: it releases an authorisation; before API version
        2025-03-31 the release also creates a Refund of the authorised amount (so the
        charge shows it as refunded), from then on nothing on the charge changes."""
        intent = self.payment_intents.get(intent_id)
        if intent is None:
            return 404, _error("invalid_request_error", f"No such payment_intent: '{intent_id}'", "resource_missing")
        if change == "update":
            if "amount" in form and intent["status"] not in UPDATABLE_AMOUNT:
                return 400, _error(
                    "invalid_request_error",
                    f"This PaymentIntent's amount could not be updated because it has a status of {intent['status']}.",
                    "payment_intent_unexpected_state",
                )
            if "amount" in form:
                intent["amount"] = int(form["amount"])
            return 200, copy.deepcopy(intent)
        if intent["status"] not in CANCELABLE:
            return 400, _error(
                "invalid_request_error",
                f"You cannot cancel this PaymentIntent because it has a status of {intent['status']}.",
                "payment_intent_unexpected_state",
            )
        intent.update(
            status="canceled", canceled_at=self._created() or int(time.time()),
            cancellation_reason=form.get("cancellation_reason"), amount_capturable=0,
        )
        if self.api_version[:10] < _CANCEL_WITHOUT_REFUND:
            for charge in list(self.charges.values()):
                if charge.get("payment_intent") == intent_id and not charge.get("captured"):
                    refund = p.refund(charge=charge["id"], amount=charge["amount"], currency=charge["currency"], created=self._created())
                    self.refunds[refund["id"]] = refund
        return 200, copy.deepcopy(intent)

    # -- Checkout Sessions -----------------------------------------------------------------

    def _create_session(self, request: "_Request") -> Answer:
        if not self.checkout_api:
            return _unrecognized(request)
        return self._write("session_create", request, lambda: self._new_session(request.form))

    def _new_session(self, params: JSON) -> tuple[int, JSON]:
        for required in ("mode", "success_url"):
            if required not in params:
                return 400, _error("invalid_request_error", f"Missing required param: {required}.", "parameter_missing", param=required)
        if params["mode"] not in ("payment", "setup", "subscription"):
            return 400, _error("invalid_request_error", "Invalid mode: must be one of payment, setup, or subscription", "parameter_invalid_string", param="mode")
        if params["mode"] == "payment" and "line_items[0][price_data][unit_amount]" not in params:
            return 400, _error("invalid_request_error", "You must specify either `line_items` or `prices` in `payment` mode.", "parameter_missing", param="line_items")
        total, currency, i = 0, None, 0
        while f"line_items[{i}][price_data][unit_amount]" in params:
            total += int(params[f"line_items[{i}][price_data][unit_amount]"]) * int(params.get(f"line_items[{i}][quantity]", "1"))
            currency = params.get(f"line_items[{i}][price_data][currency]", currency)
            i += 1
        session = p.checkout_session(
            amount_total=total if params["mode"] == "payment" else None, currency=currency, mode=params["mode"],
            status="open", client_reference_id=params.get("client_reference_id"), metadata=_sub(params, "metadata"),
            customer=params.get("customer"), customer_email=params.get("customer_email"),
            expires_at=int(params["expires_at"]) if params.get("expires_at") else None,
            api_version=self.api_version, created=self._created(),
        )
        session["success_url"] = params["success_url"]
        session["cancel_url"] = params.get("cancel_url")
        session["_pi_metadata"] = _sub(params, "payment_intent_data[metadata]")
        self.checkout_sessions[session["id"]] = session
        self.session_creates += 1
        return 200, _public(session)

    def _expire_session(self, request: "_Request", session_id: str) -> Answer:
        if not self.checkout_api:
            return _unrecognized(request)
        return self._write("expire", request, lambda: self._expired(session_id))

    def _expired(self, session_id: str) -> tuple[int, JSON]:
        session = self.checkout_sessions.get(session_id)
        if session is None:
            return 404, _error("invalid_request_error", f"No such checkout.session: '{session_id}'", "resource_missing")
        if session["status"] != "open":
            return 400, _error(
                "invalid_request_error",
                f"Only Checkout Sessions with a status in [\"open\"] can be expired. This Checkout Session has a status of \"{session['status']}\".",
            )
        session.update(status="expired", url=None)
        return 200, _public(session)


class _Request:
    __slots__ = ("method", "url", "path", "form", "key")

    def __init__(self, method: str, url: str, path: str, form: JSON, key: str | None) -> None:
        self.method, self.url, self.path, self.form, self.key = method, url, path, form, key

    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.url).query, keep_blank_values=True))


def _page(items: list[JSON], query: dict[str, str], url: str) -> Answer:
    """One page of a list, newest first, as Stripe pages it."""
    bounds = {"gt": int.__gt__, "gte": int.__ge__, "lt": int.__lt__, "lte": int.__le__}
    for bound, compare in bounds.items():
        if f"created[{bound}]" in query:
            limit_value = int(query[f"created[{bound}]"])
            items = [o for o in items if compare(int(o["created"]), limit_value)]
    for name in ("charge", "payment_intent", "customer"):
        if query.get(name):
            items = [o for o in items if o.get(name) == query[name]]
    items.sort(key=lambda o: (o["created"], o["id"]), reverse=True)
    if query.get("starting_after"):
        ids = [o["id"] for o in items]
        if query["starting_after"] not in ids:
            return 400, _error("invalid_request_error", f"No such object: '{query['starting_after']}'", "resource_missing", param="starting_after"), {}
        items = items[ids.index(query["starting_after"]) + 1 :]
    limit = int(query.get("limit") or 10)
    return 200, {"object": "list", "url": url, "has_more": len(items) > limit, "data": items[:limit]}, {}


def _unrecognized(request: _Request) -> Answer:
    return 404, _error("invalid_request_error", f"Unrecognized request URL ({request.method}: {request.path})."), {}


def _error(kind: str, message: str, code: str | None = None, *, param: str | None = None) -> JSON:
    """Stripe's error body."""
    error: JSON = {"type": kind, "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    return {"error": error}


def _sub(form: Mapping[str, str], name: str) -> dict[str, str]:
    """``metadata[order_id]=x`` -> ``{"order_id": "x"}`` for ``name`` ``metadata``."""
    prefix = f"{name}["
    return {k[len(prefix) : -1]: v for k, v in form.items() if k.startswith(prefix) and k.endswith("]") and "[" not in k[len(prefix) : -1]}


def _public(obj: JSON) -> JSON:
    """An object as Stripe answers it: a copy, without the fake's own ``_`` keys."""
    return {k: copy.deepcopy(v) for k, v in obj.items() if not k.startswith("_")}


def card_declined() -> JSON:
    """Stripe's error object for a declined card."""
    return {
        "type": "card_error",
        "code": "card_declined",
        "decline_code": "generic_decline",
        "message": "Your card was declined.",
        "doc_url": "https://stripe.com/docs/error-codes/card-declined",
    }


_ID = r"([^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], Callable[..., Answer]]] = [
    ("GET", re.compile(r"/v1/charges"), lambda m, r: m._list(r, "charges")),
    ("POST", re.compile(r"/v1/charges"), StripeModel._create_charge),
    ("GET", re.compile(rf"/v1/charges/{_ID}"), lambda m, r, i: m._retrieve(r, i, "charges")),
    ("GET", re.compile(r"/v1/refunds"), lambda m, r: m._list(r, "refunds")),
    ("POST", re.compile(r"/v1/refunds"), StripeModel._create_refund),
    ("GET", re.compile(rf"/v1/refunds/{_ID}"), lambda m, r, i: m._retrieve(r, i, "refunds")),
    ("GET", re.compile(r"/v1/disputes"), lambda m, r: m._list(r, "disputes")),
    ("GET", re.compile(r"/v1/events"), lambda m, r: m._list(r, "events")),
    ("GET", re.compile(r"/v1/payment_intents"), lambda m, r: m._list(r, "payment_intents")),
    ("POST", re.compile(r"/v1/payment_intents"), StripeModel._create_intent),
    ("GET", re.compile(rf"/v1/payment_intents/{_ID}"), lambda m, r, i: m._retrieve(r, i, "payment_intents")),
    ("POST", re.compile(rf"/v1/payment_intents/{_ID}"), StripeModel._update_intent),
    ("POST", re.compile(rf"/v1/payment_intents/{_ID}/cancel"), StripeModel._cancel_intent),
    ("GET", re.compile(r"/v1/checkout/sessions"), lambda m, r: m._list(r, "checkout_sessions")),
    ("POST", re.compile(r"/v1/checkout/sessions"), StripeModel._create_session),
    ("GET", re.compile(rf"/v1/checkout/sessions/{_ID}"), lambda m, r, i: m._retrieve(r, i, "checkout_sessions")),
    ("POST", re.compile(rf"/v1/checkout/sessions/{_ID}/expire"), StripeModel._expire_session),
]
