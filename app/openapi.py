"""The OpenAPI 3.0 document of the JSON API and the pay and checkout endpoints, served at
``/api/openapi.json`` and driven by the fuzz test (tests/integration/test_openapi_fuzz.py),
which fails when an answer is a 5xx, has a status not listed here, or a body that does not
match its schema. Keep it next to the routes: a new route needs an entry (the test checks
every API route is described).

Bodies are described by the fields clients rely on (``required``); more may appear.
"""

from __future__ import annotations

from typing import Any

from domain.cases.views import SORT_KEYS
from domain.cases.reasons import REASON_KINDS

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad request (error code says what)",
        401: "No valid bearer token",
        403: "The token's scope does not cover this operation (`insufficient_scope`)",
        404: "Not found",
        409: "Conflict with the current state",
        413: "Body too large",
        415: "Unsupported media type",
        422: "Understood but refused",
        429: "Too many requests",
        503: "Stripe or the database did not answer; retrying is safe",
    }
    return {str(code): _json(_ERROR, text[code]) for code in codes}


_CASE_ID = {
    "name": "case_id",
    "in": "path",
    "required": True,
    "description": "A case id; a number beyond 2^31 - 1 (the id column's range) is simply not found (404).",
    "schema": {"type": "integer", "minimum": 0},
    "examples": {"a case": {"value": 1}, "beyond 2^31": {"value": 2**31}, "beyond 2^63": {"value": 2**64}},
}
_BULK_APPROVE: dict[str, Any] = {
    "post": {
        "operationId": "approveCases",
        "summary": "Approve several cases' proposals, each on its own (scope finance)",
        "description": (
            "Only open cases of clear duplicates whose proposal is a full refund are approved; "
            "each through the same phased refund and audit entry as approving it alone. "
            "Other cases are refused with the reason and left unchanged."
        ),
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["ids"],
                        "properties": {
                            "ids": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1, "maxItems": 100},
                            "note": {"type": "string", "maxLength": 2000},
                        },
                    }
                }
            },
        },
        "responses": {
            "200": {
                "description": "One result per case: refunded, approved, refused (code, message) or not_started",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["results", "counts"],
                            "properties": {
                                "results": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["case_id", "result", "message"],
                                        "properties": {
                                            "case_id": {"type": "integer"},
                                            "result": {"type": "string", "enum": ["refunded", "approved", "refused", "not_started"]},
                                            "message": {"type": "string"},
                                        },
                                    },
                                },
                                "counts": {"type": "object"},
                            },
                        }
                    }
                },
            },
            **_errors(400, 401, 403, 413, 422),
        },
    }
}

_NOTE_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "note": {"type": "string", "maxLength": 2000},
                    "refunds": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"charge_id": {"type": "string"}, "amount": {"type": "integer"}},
                            "required": ["charge_id", "amount"],
                        },
                    },
                },
            }
        }
    },
}


def openapi_document() -> dict[str, Any]:
    object_ = {"type": "object"}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Stripe reconciler API",
            "version": "1",
            "description": (
                "Orders, the pay endpoint and duplicate cases. Every operation needs "
                "`Authorization: Bearer <token>` with a scope that covers it (pay, finance, read); "
                "a valid token with another scope gets 403 `insufficient_scope`. Errors are "
                '`{"error": "<code>", "message": "..."}`.'
            ),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                },
                "Order": {
                    "type": "object",
                    "required": ["id", "status", "charges", "totals"],
                    "properties": {
                        "id": {"type": "string"},
                        "amount": {"type": "integer", "nullable": True},
                        "currency": {"type": "string", "nullable": True},
                        "status": {"type": "string"},
                        "charges": {"type": "array", "items": object_},
                        "totals": object_,
                    },
                },
                "Case": {
                    "type": "object",
                    "required": ["id", "status", "order_id", "charges"],
                    "properties": {
                        "id": {"type": "integer"},
                        "status": {"type": "string", "enum": ["open", "refunding", "refunded", "dismissed", "failed"]},
                        "order_id": {"type": "string"},
                        "kind": {
                            "type": "string",
                            "enum": ["duplicate", "authorization", "unlinked"],
                            "description": "unlinked: possible duplicate, no order (review only, never refunded by the service; order_id is a synthetic ~unlinked:... id)",
                        },
                        "charges": {"type": "array", "items": object_},
                        "review_reasons": {"type": "array", "items": {"type": "string"},
                                           "description": "Why a person must decide: `code: detail` (minor units)"},
                        "reasons": {"type": "array", "items": object_,
                                    "description": "Each review reason as {code, text}: the text in words, amounts in major units"},
                        "reason_text": {"type": "string",
                                        "description": "Why the case exists and what is left to do, in words (amounts as `65.00 USD`)"},
                        "opened_at": {"type": "string", "format": "date-time"},
                    },
                },
                "PaymentIntent": {
                    "type": "object",
                    "required": ["id", "client_secret", "status", "amount", "currency", "order_id", "attempt", "created"],
                    "properties": {
                        "id": {"type": "string"},
                        "client_secret": {"type": "string"},
                        "status": {"type": "string"},
                        "amount": {"type": "integer"},
                        "currency": {"type": "string"},
                        "order_id": {"type": "string"},
                        "attempt": {"type": "integer"},
                        "created": {"type": "boolean"},
                    },
                },
                "CheckoutSession": {
                    "type": "object",
                    "required": ["id", "url", "status", "amount", "currency", "order_id", "attempt", "expires_at", "created"],
                    "properties": {
                        "id": {"type": "string"},
                        "url": {"type": "string"},
                        "status": {"type": "string", "enum": ["open"]},
                        "amount": {"type": "integer"},
                        "currency": {"type": "string"},
                        "order_id": {"type": "string"},
                        "attempt": {"type": "integer"},
                        "expires_at": {"type": "integer"},
                        "created": {"type": "boolean"},
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/orders": {
                "post": {
                    "operationId": "upsertOrder",
                    "summary": "Create or update an order (scope pay)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["id", "amount", "currency"],
                                    "properties": {
                                        "id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.:#/-]{0,254}$"},
                                        "amount": {"type": "integer", "minimum": 0},
                                        "currency": {"type": "string", "pattern": "^[a-z]{3}$"},
                                        "customer": {"type": "string", "nullable": True},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Order"}, "Updated"),
                        "201": _json({"$ref": "#/components/schemas/Order"}, "Created"),
                        **_errors(400, 401, 403, 409, 413, 422),
                    },
                }
            },
            "/api/orders/{order_id}": {
                "get": {
                    "operationId": "getOrder",
                    "summary": "An order with its charges, refunds and totals (scope pay or read)",
                    "parameters": [{"name": "order_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": _json({"$ref": "#/components/schemas/Order"}, "The order"), **_errors(401, 403, 404)},
                }
            },
            "/api/events/{event_id}": {
                "get": {
                    "operationId": "getEvent",
                    "summary": "A received event's status (scope read)",
                    "parameters": [{"name": "event_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": _json(object_, "The event"), **_errors(401, 403, 404)},
                }
            },
            "/api/events": {
                "get": {
                    "operationId": "listFailedEvents",
                    "summary": "Events that failed to apply (scope read)",
                    "parameters": [
                        {"name": "status", "in": "query", "required": True, "schema": {"type": "string", "enum": ["failed"]}}
                    ],
                    "responses": {
                        "200": _json({"type": "object", "required": ["data"], "properties": {"data": {"type": "array"}}}, "Failures"),
                        **_errors(400, 401, 403),
                    },
                }
            },
            "/api/duplicates": {
                "get": {
                    "operationId": "listCases",
                    "summary": "Duplicate cases, open and failed first (scope finance or read)",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string", "enum": ["open", "refunding", "refunded", "dismissed", "failed"]}},
                        {"name": "currency", "in": "query", "schema": {"type": "string", "pattern": "^[a-z]{3}$"}},
                        {"name": "from", "in": "query", "schema": {"type": "string", "format": "date"},
                         "description": "Opened on or after (UTC), 1970-01-01 to 9998-12-31; 400 `invalid_date` otherwise"},
                        {"name": "until", "in": "query", "schema": {"type": "string", "format": "date"},
                         "examples": {"a day": {"value": "2026-01-31"}, "the calendar's last": {"value": "9999-12-31"}},
                         "description": "Opened on or before (UTC, inclusive), same range"},
                        {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100000}},
                        {"name": "per_page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                        {"name": "reason", "in": "query", "schema": {"type": "string", "enum": list(REASON_KINDS)},
                         "description": "Cases with a reason of this code; `clear`: clear duplicates, nothing for a person to weigh"},
                        {"name": "amount_min", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,13}(\\.[0-9]{1,3})?$"},
                         "description": "Excess at least this, in major units (49.99), in the currency filtered on or any"},
                        {"name": "amount_max", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,13}(\\.[0-9]{1,3})?$"},
                         "description": "Excess at most this, in major units"},
                        {"name": "sort", "in": "query", "schema": {"type": "string", "enum": list(SORT_KEYS)},
                         "description": "Sort by this column (default: open and failed first, newest first)"},
                        {"name": "dir", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}},
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["cases", "total", "page", "per_page", "totals"],
                                "properties": {
                                    "cases": {"type": "array", "items": object_},
                                    "total": {"type": "integer"},
                                    "page": {"type": "integer"},
                                    "per_page": {"type": "integer"},
                                    "totals": object_,
                                    "unlinked": {
                                        "type": "object",
                                        "description": "Possible duplicates with no order, counted apart (not in totals): count, active, held per currency",
                                    },
                                },
                            },
                            "A page of cases",
                        ),
                        **_errors(400, 401, 403),
                    },
                }
            },
            "/api/duplicates/{case_id}": {
                "get": {
                    "operationId": "getCase",
                    "summary": "One case (scope finance or read)",
                    "parameters": [_CASE_ID],
                    "responses": {"200": _json({"$ref": "#/components/schemas/Case"}, "The case"), **_errors(401, 403, 404)},
                }
            },
            "/api/duplicates/{case_id}/refund": {
                "post": {
                    "operationId": "refundCase",
                    "summary": "Approve the proposal (no body) or refund chosen charges (scope finance)",
                    "parameters": [_CASE_ID],
                    "requestBody": _NOTE_BODY,
                    "responses": {
                        "200": _json(
                            {"type": "object", "required": ["case", "outcomes"],
                             "properties": {"case": {"$ref": "#/components/schemas/Case"}, "outcomes": {"type": "array"}}},
                            "Approved; outcomes per refund",
                        ),
                        **_errors(400, 401, 403, 404, 409, 413, 422),
                    },
                }
            },
            "/api/duplicates/approve": _BULK_APPROVE,
            "/api/cases/approve": _BULK_APPROVE,
            "/api/duplicates/{case_id}/dismiss": {
                "post": {
                    "operationId": "dismissCase",
                    "summary": "Dismiss a case with a note (scope finance)",
                    "parameters": [_CASE_ID],
                    "requestBody": _NOTE_BODY,
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Case"}, "Dismissed"),
                        **_errors(400, 401, 403, 404, 409, 413, 422),
                    },
                }
            },
            "/api/runs": {
                "get": {
                    "operationId": "listRuns",
                    "summary": "Reconciliation passes (scope finance or read)",
                    "responses": {
                        "200": _json({"type": "object", "required": ["data"], "properties": {"data": {"type": "array"}}}, "Passes"),
                        **_errors(401, 403),
                    },
                }
            },
            "/orders/{order_id}/pay": {
                "post": {
                    "operationId": "payOrder",
                    "summary": "The order's one payable PaymentIntent (scope pay)",
                    "parameters": [
                        {"name": "order_id", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "Idempotency-Key", "in": "header", "required": False,
                         "schema": {"type": "string", "minLength": 1, "maxLength": 255}},
                    ],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "payment_method": {"type": "string", "pattern": r"^(pm|card|src)_[A-Za-z0-9_]{1,250}$"},
                                        "customer": {"type": "string", "pattern": r"^cus_[A-Za-z0-9_]{1,250}$"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/PaymentIntent"}, "The existing PaymentIntent"),
                        "201": _json({"$ref": "#/components/schemas/PaymentIntent"}, "Created now"),
                        **_errors(400, 401, 403, 404, 409, 413, 422, 503),
                        "402": _json(_ERROR, "Stripe declined the payment"),
                    },
                }
            },
            "/orders/{order_id}/checkout": {
                "post": {
                    "operationId": "checkoutOrder",
                    "summary": "The order's one open Stripe Checkout Session URL (scope pay); "
                               "`replace: true` expires the open one first and creates the next",
                    "parameters": [{"name": "order_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "replace": {"type": "boolean"},
                                        "success_url": {"type": "string", "pattern": r"^https?://[^\s/?#]+[^\s]{0,2000}$"},
                                        "cancel_url": {"type": "string", "pattern": r"^https?://[^\s/?#]+[^\s]{0,2000}$"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/CheckoutSession"}, "The open session"),
                        "201": _json({"$ref": "#/components/schemas/CheckoutSession"}, "Created now"),
                        **_errors(400, 401, 403, 404, 409, 413, 422, 503),
                    },
                }
            },
        },
    }
