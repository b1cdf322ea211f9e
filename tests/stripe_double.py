"""A small Stripe for PaymentIntents, served on 127.0.0.1 by a threaded stdlib HTTP server,
so the real stripe-python SDK talks to it over real sockets from many threads or processes.

It behaves as Stripe does where the pay endpoint depends on it:

* ``POST /v1/payment_intents`` creates a PaymentIntent in Stripe's real shape
  (``tests.stripe_payloads.payment_intent``), after ``delay`` seconds (a slow Stripe makes
  races visible). Idempotency-Key: the first result for a key is stored and replayed for the
  same parameters, errors included; other parameters get a 400 ``idempotency_error``; a key
  whose first request is still running gets a 409.
* ``POST /v1/payment_intents/<id>`` (update; ``amount`` only, refused with a 400
  ``payment_intent_unexpected_state`` unless the status is ``requires_payment_method``,
  ``requires_confirmation`` or ``requires_action``) and
  ``POST /v1/payment_intents/<id>/cancel`` (``cancellation_reason``; refused likewise once
  ``processing``, ``succeeded`` or ``canceled``), both honouring Idempotency-Key as the
  create does (a key is tied to its endpoint and parameters).
* ``GET /v1/payment_intents/<id>`` and ``GET /v1/payment_intents`` (newest first,
  ``created[gt|gte]``, ``customer``, ``limit``, ``starting_after``).

Checkout Sessions (the checkout endpoint), in Stripe's shape (:func:`checkout_session`):

* ``POST /v1/checkout/sessions`` creates an ``open`` session (``cs_test_...``, ``url``,
  ``amount_total`` from its one ``price_data`` line item, ``client_reference_id``,
  ``metadata``, ``expires_at``, ``payment_intent`` null until paid), honouring
  Idempotency-Key as the PaymentIntent create does (``scripts["session_create"]``);
* ``GET /v1/checkout/sessions/<id>``; ``GET /v1/checkout/sessions`` (newest first);
* ``POST /v1/checkout/sessions/<id>/expire``: 400 unless the session is ``open``
  (``scripts["expire"]``).

``session_creates`` counts sessions actually created. :meth:`complete_session` and
:meth:`expire_session` change a session as a customer paying or its timeout would.

``creates`` counts PaymentIntents actually created; ``create_requests`` counts every POST
to the create endpoint (replays included). ``script`` queues misbehaviour for the next
create requests, ``scripts["update"]`` and ``scripts["cancel"]`` for the next updates and
cancels (see :meth:`fail_next`).
"""

from __future__ import annotations

import collections
import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import stripe

from tests import stripe_payloads as p

API_KEY = "sk_test_unit"
# Stripe's rules, in the current names and in those before 2019-02-11.
UPDATABLE_AMOUNT = frozenset({"requires_payment_method", "requires_confirmation", "requires_action", "requires_source", "requires_source_action"})
CANCELABLE = UPDATABLE_AMOUNT | {"requires_capture"}


class StripeDouble:
    def __init__(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        # The API version PaymentIntents are rendered in (an account pinned to an old one).
        self.api_version = p.CURRENT_API_VERSION
        self.lock = threading.Lock()
        self.intents: dict[str, dict[str, Any]] = {}
        self.creates = 0
        self.create_requests = 0
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.keys: dict[str, tuple[str, int, dict[str, Any]]] = {}  # key -> (params, status, body)
        self.in_progress: set[str] = set()
        self.script: collections.deque[dict[str, Any]] = collections.deque()
        self.scripts: dict[str, collections.deque[dict[str, Any]]] = {
            "create": self.script, "update": collections.deque(), "cancel": collections.deque(),
            "session_create": collections.deque(), "expire": collections.deque(),
        }
        self.sessions: dict[str, dict[str, Any]] = {}
        self.session_creates = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "StripeDouble":
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                double._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                double._handle(self, "POST")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.request_queue_size = 128
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "StripeDouble":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def reset(self, *, delay: float = 0.0) -> None:
        with self.lock:
            self.delay = delay
            self.api_version = p.CURRENT_API_VERSION
            self.intents.clear()
            self.sessions.clear()
            self.session_creates = 0
            self.creates = 0
            self.create_requests = 0
            self.requests.clear()
            self.keys.clear()
            self.in_progress.clear()
            for script in self.scripts.values():
                script.clear()

    def client(self, *, timeout: float = 10.0, max_network_retries: int = 0) -> stripe.StripeClient:
        return stripe.StripeClient(
            API_KEY,
            base_addresses={"api": self.base_url},
            http_client=stripe.RequestsClient(timeout=timeout),
            max_network_retries=max_network_retries,
        )

    # -- test controls -----------------------------------------------------------------------

    def fail_next(self, kind: str, *, on: str = "create", **options: Any) -> None:
        """Misbehave on the next create (``on="update"`` / ``"cancel"``: update, cancel)
        request:

        * ``error``: answer ``status`` with ``error`` (Stripe's error object), creating
          nothing; stored for the key unless ``store=False`` (a 500 from in front of
          Stripe's API, before execution, is not stored);
        * ``create_then_error``: create the PaymentIntent, then answer ``status`` (500) and
          store that answer for the key (Stripe's worst case);
        * ``slow``: take ``seconds`` (longer than the client's timeout), then create and
          store the result as usual.
        """
        self.scripts[on].append({"kind": kind, **options})

    def add_intent(self, **fields: Any) -> dict[str, Any]:
        """A PaymentIntent that exists at Stripe without any request of ours."""
        fields.setdefault("status", "requires_payment_method")
        fields.setdefault("api_version", self.api_version)
        intent = p.payment_intent(**fields)
        with self.lock:
            self.intents[intent["id"]] = intent
        return intent

    def set_status(self, intent_id: str, status: str) -> None:
        with self.lock:
            self.intents[intent_id]["status"] = status

    def complete_session(self, session_id: str) -> dict[str, Any]:
        """The customer paid: ``complete``/``paid`` with a succeeded PaymentIntent."""
        with self.lock:
            session = self.sessions[session_id]
            intent = p.payment_intent(
                amount=session["amount_total"], currency=session["currency"], status="succeeded",
                metadata=session["_pi_metadata"], api_version=self.api_version,
            )
            self.intents[intent["id"]] = intent
            session.update(status="complete", payment_status="paid", payment_intent=intent["id"])
            return _public(session)

    def expire_session(self, session_id: str) -> None:
        """The session reached its ``expires_at`` (Stripe expires it by itself)."""
        with self.lock:
            self.sessions[session_id].update(status="expired", url=None)

    def open_sessions(self, order_id: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                _public(s) for s in self.sessions.values()
                if s["status"] == "open" and (order_id is None or s["client_reference_id"] == order_id)
            ]

    def count(self, method: str, path_prefix: str) -> int:
        with self.lock:
            return sum(1 for m, path in self.requests if m == method and path.startswith(path_prefix))

    # -- HTTP --------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw_body = handler.rfile.read(length).decode() if length else ""
        form = _nested(parse_qsl(raw_body, keep_blank_values=True)) if length else {}
        query = _nested(parse_qsl(url.query, keep_blank_values=True))
        with self.lock:
            self.requests.append((method, url.path))
        parts = [part for part in url.path.split("/") if part]
        status, body, headers = 404, _error("invalid_request_error", "Unrecognized request URL", code="resource_missing"), {}
        if parts[:3] == ["v1", "checkout", "sessions"]:
            key = handler.headers.get("Idempotency-Key")
            if method == "POST" and len(parts) == 3:
                form = _deep_nested(parse_qsl(raw_body, keep_blank_values=True))
                status, body, headers = self._session_call("session_create", key, form, lambda: self._create_session(form))
            elif method == "GET" and len(parts) == 3:
                with self.lock:
                    sessions = sorted(self.sessions.values(), key=lambda s: (s["created"], s["id"]), reverse=True)
                status, body = 200, {"object": "list", "data": [_public(s) for s in sessions[:int(query.get("limit") or 10)]],
                                     "has_more": len(sessions) > int(query.get("limit") or 10), "url": "/v1/checkout/sessions"}
            elif method == "GET" and len(parts) == 4:
                status, body = self._retrieve_session(parts[3])
            elif method == "POST" and len(parts) == 5 and parts[4] == "expire":
                status, body, headers = self._session_call(
                    "expire", key, {"endpoint": f"expire {parts[3]}", **form}, lambda: self._expire_session(parts[3])
                )
        elif parts[:2] == ["v1", "payment_intents"]:
            if method == "POST" and len(parts) == 2:
                status, body, headers = self._create(form, handler.headers.get("Idempotency-Key"))
            elif method == "GET" and len(parts) == 2:
                status, body = 200, self._list(query)
            elif method == "GET" and len(parts) == 3:
                status, body = self._retrieve(parts[2])
            elif method == "POST" and len(parts) == 3:
                status, body, headers = self._change("update", parts[2], form, handler.headers.get("Idempotency-Key"))
            elif method == "POST" and len(parts) == 4 and parts[3] == "cancel":
                status, body, headers = self._change("cancel", parts[2], form, handler.headers.get("Idempotency-Key"))
        payload = json.dumps(body).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.send_header("Request-Id", p.new_id("req"))
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def _create(self, form: dict[str, Any], key: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
        params = json.dumps(form, sort_keys=True)
        with self.lock:
            self.create_requests += 1
            replay = self._claim_key(key, params)
            if replay is not None:
                return replay
            action = self.script.popleft() if self.script else {"kind": "ok"}
            delay = self.delay
        try:
            time.sleep(action.get("seconds", delay) if action["kind"] == "slow" else delay)
            store = True
            if action["kind"] == "error":
                status, body = action.get("status", 500), {"error": action.get("error") or {"type": "api_error", "message": "boom"}}
                store = action.get("store", True)
            else:
                intent = p.payment_intent(
                    amount=int(form["amount"]),
                    currency=form["currency"],
                    status="requires_payment_method",
                    customer=form.get("customer"),
                    metadata=form.get("metadata") or {},
                    api_version=self.api_version,
                )
                with self.lock:
                    self.intents[intent["id"]] = intent
                    self.creates += 1
                status, body = 200, intent
                if action["kind"] == "create_then_error":
                    status, body = action.get("status", 500), {"error": {"type": "api_error", "message": "boom after create"}}
            self._store_key(key, params, status, body, store)
            return status, body, {}
        finally:
            self._release_key(key)

    def _list(self, query: dict[str, Any]) -> dict[str, Any]:
        created = query.get("created") or {}
        with self.lock:
            intents = sorted(self.intents.values(), key=lambda i: (i["created"], i["id"]), reverse=True)
        if "gt" in created:
            intents = [i for i in intents if i["created"] > int(created["gt"])]
        if "gte" in created:
            intents = [i for i in intents if i["created"] >= int(created["gte"])]
        if query.get("customer"):
            intents = [i for i in intents if i["customer"] == query["customer"]]
        if query.get("starting_after"):
            ids = [i["id"] for i in intents]
            intents = intents[ids.index(query["starting_after"]) + 1 :]
        limit = int(query.get("limit") or 10)
        return {"object": "list", "data": intents[:limit], "has_more": len(intents) > limit, "url": "/v1/payment_intents"}

    def _retrieve(self, intent_id: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            intent = self.intents.get(intent_id)
        if intent is None:
            return 404, _error("invalid_request_error", f"No such payment_intent: '{intent_id}'", code="resource_missing")
        return 200, intent

    def _claim_key(self, key: str | None, params: str) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        """Idempotency-Key as Stripe keeps it (caller holds the lock): the stored answer
        for a key seen with these parameters, 400 for other parameters, 409 while its
        first request runs; None when the request is new (the key is then in progress)."""
        if key is None:
            return None
        if key in self.in_progress:
            return 409, _error("idempotency_error", "There is currently another in-progress request using this Idempotent Key."), {}
        if key in self.keys:
            stored_params, status, body = self.keys[key]
            if stored_params != params:
                return 400, _error("idempotency_error", "Keys for idempotent requests can only be used with the same parameters they were first used with."), {}
            return status, body, {"Idempotent-Replayed": "true"}
        self.in_progress.add(key)
        return None

    def _store_key(self, key: str | None, params: str, status: int, body: dict[str, Any], store: bool) -> None:
        with self.lock:
            if key is not None and store:
                self.keys[key] = (params, status, body)

    def _release_key(self, key: str | None) -> None:
        with self.lock:
            if key is not None:
                self.in_progress.discard(key)

    def _change(self, kind: str, intent_id: str, form: dict[str, Any], key: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
        """An update (``amount``) or a cancel, under Idempotency-Key as Stripe does."""
        return self._scripted_call(
            kind, key, {"endpoint": f"{kind} {intent_id}", **form},
            lambda: self._apply_change(kind, intent_id, form), then_error=("change_then_error", "boom after change"),
        )

    def _apply_change(self, kind: str, intent_id: str, form: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            intent = self.intents.get(intent_id)
            if intent is None:
                return 404, _error("invalid_request_error", f"No such payment_intent: '{intent_id}'", code="resource_missing")
            if kind == "update":
                if "amount" in form and intent["status"] not in UPDATABLE_AMOUNT:
                    return 400, _error(
                        "invalid_request_error",
                        f"This PaymentIntent's amount could not be updated because it has a status of {intent['status']}.",
                        code="payment_intent_unexpected_state",
                    )
                if "amount" in form:
                    intent["amount"] = int(form["amount"])
                return 200, copy.deepcopy(intent)
            if intent["status"] not in CANCELABLE:
                return 400, _error(
                    "invalid_request_error",
                    f"You cannot cancel this PaymentIntent because it has a status of {intent['status']}.",
                    code="payment_intent_unexpected_state",
                )
            intent["status"] = "canceled"
            intent["canceled_at"] = int(time.time())
            intent["cancellation_reason"] = form.get("cancellation_reason")
            return 200, copy.deepcopy(intent)

    # -- Checkout Sessions -------------------------------------------------------------------

    def _session_call(self, kind: str, key: str | None, form: dict[str, Any], act: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        """A session create or expire under Idempotency-Key, with ``scripts[kind]``."""
        return self._scripted_call(kind, key, {"endpoint": kind, **form}, act, then_error=("create_then_error", "boom after create"))

    def _scripted_call(
        self, kind: str, key: str | None, fingerprint: dict[str, Any], act: Any, *, then_error: tuple[str, str]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """One write under Idempotency-Key (replay, 400 on other parameters, 409 while in
        flight), playing the next of ``scripts[kind]``: ``slow``, ``error`` (not stored with
        ``store=False``), or ``then_error[0]`` (the write happens, the answer is a 5xx)."""
        params = json.dumps(fingerprint, sort_keys=True)
        with self.lock:
            replay = self._claim_key(key, params)
            if replay is not None:
                return replay
            action = self.scripts[kind].popleft() if self.scripts[kind] else {"kind": "ok"}
            delay = self.delay
        try:
            time.sleep(action.get("seconds", delay) if action["kind"] == "slow" else delay)
            store = True
            if action["kind"] == "error":
                status, body = action.get("status", 500), {"error": action.get("error") or {"type": "api_error", "message": "boom"}}
                store = action.get("store", True)
            else:
                status, body = act()
                if action["kind"] == then_error[0] and status == 200:
                    status, body = action.get("status", 500), {"error": {"type": "api_error", "message": then_error[1]}}
            self._store_key(key, params, status, body, store)
            return status, body, {}
        finally:
            self._release_key(key)

    def _create_session(self, form: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        items = form.get("line_items") or {}
        item = items.get("0") if isinstance(items, dict) else None
        if form.get("mode") != "payment" or not item or "price_data" not in item or not form.get("success_url"):
            return 400, _error("invalid_request_error", "Missing required param: line_items[0][price_data], mode or success_url.",
                               code="parameter_missing")
        price = item["price_data"]
        session = checkout_session(
            amount_total=int(price["unit_amount"]) * int(item.get("quantity") or 1),
            currency=price["currency"],
            client_reference_id=form.get("client_reference_id"),
            metadata=form.get("metadata") or {},
            success_url=form["success_url"],
            cancel_url=form.get("cancel_url"),
            expires_at=int(form["expires_at"]) if form.get("expires_at") else None,
        )
        session["_pi_metadata"] = (form.get("payment_intent_data") or {}).get("metadata") or {}
        with self.lock:
            self.sessions[session["id"]] = session
            self.session_creates += 1
        return 200, _public(session)

    def _retrieve_session(self, session_id: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                return 404, _error("invalid_request_error", f"No such checkout.session: '{session_id}'", code="resource_missing")
            return 200, _public(session)

    def _expire_session(self, session_id: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                return 404, _error("invalid_request_error", f"No such checkout.session: '{session_id}'", code="resource_missing")
            if session["status"] != "open":
                return 400, _error(
                    "invalid_request_error",
                    f"Only Checkout Sessions with a status in [\"open\"] can be expired. This Checkout Session has a status of {session['status']}.",
                )
            session.update(status="expired", url=None)
            return 200, _public(session)


def checkout_session(
    *,
    amount_total: int,
    currency: str,
    client_reference_id: str | None = None,
    metadata: dict[str, str] | None = None,
    success_url: str = "https://shop.example/success",
    cancel_url: str | None = None,
    expires_at: int | None = None,
    status: str = "open",
) -> dict[str, Any]:
    """A Checkout Session (``"object": "checkout.session"``, mode payment) as Stripe
    returns it."""
    session_id = p.new_id("cs_test")
    created = int(time.time())
    return {
        "id": session_id,
        "object": "checkout.session",
        "after_expiration": None,
        "allow_promotion_codes": None,
        "amount_subtotal": amount_total,
        "amount_total": amount_total,
        "automatic_tax": {"enabled": False, "liability": None, "status": None},
        "billing_address_collection": None,
        "cancel_url": cancel_url,
        "client_reference_id": client_reference_id,
        "consent": None,
        "created": created,
        "currency": currency,
        "customer": None,
        "customer_creation": "if_required",
        "customer_details": None,
        "customer_email": None,
        "expires_at": expires_at or created + 24 * 3600,
        "invoice": None,
        "livemode": False,
        "locale": None,
        "metadata": dict(metadata or {}),
        "mode": "payment",
        "payment_intent": None,
        "payment_link": None,
        "payment_method_types": ["card"],
        "payment_status": "unpaid",
        "recovered_from": None,
        "status": status,
        "submit_type": None,
        "subscription": None,
        "success_url": success_url,
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted",
        "url": f"https://checkout.stripe.com/c/pay/{session_id}#fidkdWxOYHwnPyd1blpxYHZxWjA0",
    }


def _public(session: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in session.items() if not k.startswith("_")}


def _deep_nested(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``line_items[0][price_data][currency]=usd`` -> nested dicts (list indexes as keys)."""
    result: dict[str, Any] = {}
    for name, value in pairs:
        head, _, rest = name.partition("[")
        keys = [head] + ([k for k in rest.rstrip("]").split("][")] if rest else [])
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return result


def card_declined() -> dict[str, Any]:
    """Stripe's error object for a declined card."""
    return {
        "type": "card_error",
        "code": "card_declined",
        "decline_code": "generic_decline",
        "message": "Your card was declined.",
        "doc_url": "https://stripe.com/docs/error-codes/card-declined",
    }


def _error(kind: str, message: str, *, code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "message": message}
    if code:
        error["code"] = code
    return {"error": error}


def _nested(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``metadata[order_id]=x`` -> ``{"metadata": {"order_id": "x"}}`` (one level, as needed)."""
    result: dict[str, Any] = {}
    for name, value in pairs:
        if "[" in name and name.endswith("]"):
            outer, inner = name[:-1].split("[", 1)
            result.setdefault(outer, {})[inner] = value
        else:
            result[name] = value
    return result
