"""A small simulated Stripe for ``reconciler demo`` when no emulator is installed.

A threaded HTTP server on 127.0.0.1 answering the part of Stripe's API the demo and the
reconciliation pass use, in Stripe's shapes: charges (create, retrieve, list), refunds
(create with ``Idempotency-Key`` replay and over-refund refusal, list), an empty disputes
list, and 404 for the Events and PaymentIntents APIs (as the emulators answer). Everything
lives in memory and is gone when the server stops. It is a demo prop, not a test double:
the tests use real emulators and their own doubles.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

JSON = dict[str, Any]


def _id(prefix: str) -> str:
    return f"{prefix}_3Demo{secrets.token_hex(9)}"


class SimulatedStripe:
    """``with SimulatedStripe() as stripe: stripe.base_url``"""

    def __init__(self) -> None:
        self.charges: dict[str, JSON] = {}
        self.refunds: dict[str, JSON] = {}
        self._keys: dict[str, tuple[dict[str, str], int, JSON]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="simulated-stripe", daemon=True)

    def __enter__(self) -> "SimulatedStripe":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- the API -------------------------------------------------------------------------

    def create_charge(self, form: dict[str, str]) -> tuple[int, JSON]:
        amount = int(form.get("amount", "0"))
        currency = form.get("currency", "usd").lower()
        if amount <= 0:
            return 400, _error("invalid_request_error", "Invalid positive integer", "parameter_invalid_integer")
        charge_id = _id("ch")
        created = int(time.time())
        charge = {
            "id": charge_id,
            "object": "charge",
            "amount": amount,
            "amount_captured": amount,
            "amount_refunded": 0,
            "application": None,
            "application_fee": None,
            "application_fee_amount": None,
            "balance_transaction": _id("txn"),
            "billing_details": {"address": {"city": None, "country": None, "line1": None, "line2": None, "postal_code": None, "state": None}, "email": None, "name": None, "phone": None},
            "calculated_statement_descriptor": "DEMO SHOP",
            "captured": True,
            "created": created,
            "currency": currency,
            "customer": form.get("customer"),
            "description": None,
            "disputed": False,
            "failure_balance_transaction": None,
            "failure_code": None,
            "failure_message": None,
            "fraud_details": {},
            "livemode": False,
            "metadata": {k[len("metadata["):-1]: v for k, v in form.items() if k.startswith("metadata[")},
            "on_behalf_of": None,
            "outcome": {"network_status": "approved_by_network", "reason": None, "risk_level": "normal", "risk_score": 32, "seller_message": "Payment complete.", "type": "authorized"},
            "paid": True,
            "payment_intent": None,
            "payment_method": _id("card"),
            "payment_method_details": {
                "card": {
                    "amount_authorized": amount,
                    "brand": "visa",
                    "checks": {"address_line1_check": None, "address_postal_code_check": None, "cvc_check": "pass"},
                    "country": "US",
                    "exp_month": 12,
                    "exp_year": 2030,
                    "fingerprint": "DemoFingerprint01",
                    "funding": "credit",
                    "last4": "4242",
                    "network": "visa",
                    "three_d_secure": None,
                    "wallet": None,
                },
                "type": "card",
            },
            "receipt_email": None,
            "receipt_url": f"https://pay.stripe.com/receipts/{charge_id}",
            "refunded": False,
            "review": None,
            "shipping": None,
            "source_transfer": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": "succeeded",
            "transfer_data": None,
            "transfer_group": None,
        }
        with self._lock:
            self.charges[charge_id] = charge
        return 200, charge

    def charge(self, charge_id: str) -> JSON:
        charge = dict(self.charges[charge_id])
        refunded = sum(r["amount"] for r in self.refunds.values() if r["charge"] == charge_id and r["status"] == "succeeded")
        charge["amount_refunded"] = refunded
        charge["refunded"] = refunded >= charge["amount"]
        return charge

    def create_refund(self, form: dict[str, str], key: str | None) -> tuple[int, JSON]:
        with self._lock:
            if key and key in self._keys:
                params, status, body = self._keys[key]
                if params != form:
                    return 400, _error("idempotency_error", "Keys for idempotent requests can only be used with the same parameters they were first used with.", None)
                return status, body
            status, body = self._refund(form)
            if key:
                self._keys[key] = (form, status, body)
            return status, body

    def _refund(self, form: dict[str, str]) -> tuple[int, JSON]:
        charge_id = form.get("charge", "")
        if charge_id not in self.charges:
            return 404, _error("invalid_request_error", f"No such charge: '{charge_id}'", "resource_missing")
        charge = self.charge(charge_id)
        left = charge["amount"] - charge["amount_refunded"]
        amount = int(form.get("amount", left))
        if left == 0:
            return 400, _error("invalid_request_error", f"Charge {charge_id} has already been refunded.", "charge_already_refunded")
        if amount > left:
            return 400, _error("invalid_request_error", f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})", "amount_too_large")
        refund = {
            "id": _id("re"),
            "object": "refund",
            "amount": amount,
            "balance_transaction": _id("txn"),
            "charge": charge_id,
            "created": int(time.time()),
            "currency": charge["currency"],
            "destination_details": {"card": {"reference_status": "pending", "reference_type": "acquirer_reference_number", "type": "refund"}, "type": "card"},
            "metadata": {k[len("metadata["):-1]: v for k, v in form.items() if k.startswith("metadata[")},
            "payment_intent": None,
            "reason": form.get("reason"),
            "receipt_number": None,
            "source_transfer_reversal": None,
            "status": "succeeded",
            "transfer_reversal": None,
        }
        self.refunds[refund["id"]] = refund
        return 200, refund

    def page(self, items: list[JSON], query: dict[str, list[str]], url: str) -> JSON:
        if "created[gt]" in query:
            items = [o for o in items if o["created"] > int(query["created[gt]"][0])]
        if "charge" in query:
            items = [o for o in items if o.get("charge") == query["charge"][0]]
        items.sort(key=lambda o: (o["created"], o["id"]), reverse=True)
        if "starting_after" in query:
            ids = [o["id"] for o in items]
            if query["starting_after"][0] in ids:
                items = items[ids.index(query["starting_after"][0]) + 1 :]
        limit = int(query.get("limit", ["10"])[0])
        return {"object": "list", "url": url, "has_more": len(items) > limit, "data": items[:limit]}

    # -- HTTP ----------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stripe = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _answer(self, status: int, body: JSON) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", _id("req"))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                url = urlparse(self.path)
                query = parse_qs(url.query)
                path = url.path.rstrip("/")
                if path == "/v1/charges":
                    return self._answer(200, stripe.page([stripe.charge(i) for i in list(stripe.charges)], query, "/v1/charges"))
                if path.startswith("/v1/charges/"):
                    charge_id = path.rsplit("/", 1)[1]
                    if charge_id in stripe.charges:
                        return self._answer(200, stripe.charge(charge_id))
                    return self._answer(404, _error("invalid_request_error", f"No such charge: '{charge_id}'", "resource_missing"))
                if path == "/v1/refunds":
                    return self._answer(200, stripe.page(list(stripe.refunds.values()), query, "/v1/refunds"))
                if path == "/v1/disputes":
                    return self._answer(200, {"object": "list", "url": "/v1/disputes", "has_more": False, "data": []})
                return self._answer(404, _error("invalid_request_error", f"Unrecognized request URL (GET: {path}).", None))

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                path = urlparse(self.path).path.rstrip("/")
                if path == "/v1/charges":
                    return self._answer(*stripe.create_charge(form))
                if path == "/v1/refunds":
                    return self._answer(*stripe.create_refund(form, self.headers.get("Idempotency-Key")))
                return self._answer(404, _error("invalid_request_error", f"Unrecognized request URL (POST: {path}).", None))

        return Handler


def _error(kind: str, message: str, code: str | None) -> JSON:
    error: JSON = {"type": kind, "message": message}
    if code:
        error["code"] = code
    return {"error": error}
