"""A webhook body read into an :class:`EventEnvelope`: the parts of a Stripe event that the
inbox stores and the applier dispatches on, validated.

Guarantee: :func:`parse_envelope` either returns an envelope whose every field has the
type and bounds the schema needs, or raises :class:`EnvelopeError`; it never touches the
database.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from domain.errors import Rejected
from domain.stripe.shapes import MAX_TIMESTAMP

_EVENT_ID = re.compile(r"^evt_[A-Za-z0-9_]{1,250}\Z")
_EVENT_TYPE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+){1,5}\Z")


class EnvelopeError(Rejected):
    """The body is not a Stripe event we can store (codes: invalid_json, not_an_event,
    invalid_event)."""


@dataclass(frozen=True, slots=True)
class EventEnvelope:
    """The parts of a Stripe event the inbox and the handlers need, validated."""

    id: str
    type: str
    created: int
    livemode: bool
    account: str | None
    api_version: str | None
    object: Mapping[str, Any]

    @property
    def object_id(self) -> str | None:
        """``data.object.id`` when it fits the column, else None."""
        object_id = self.object.get("id")
        return object_id if isinstance(object_id, str) and len(object_id) <= 255 else None


def parse_envelope(payload: bytes | str) -> EventEnvelope:
    """Parse and validate a Stripe event envelope; :class:`EnvelopeError` otherwise."""
    try:
        # orjson: a third of json's time on a 3 kB event, and every event is parsed twice
        # (accept, apply). Stricter, too: a lone surrogate or a NaN is invalid JSON here.
        document = orjson.loads(payload)
    except (ValueError, RecursionError):
        raise EnvelopeError("invalid_json", "The body is not valid JSON.") from None
    if not isinstance(document, dict):
        raise EnvelopeError("not_an_event", "The body is not a JSON object.")
    raw = payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass")
    if b"\\u0000" in raw:
        # PostgreSQL text cannot hold NUL; no Stripe field we store carries one.
        raise EnvelopeError("invalid_event", "The event contains a NUL character.")
    if document.get("object") != "event":
        raise EnvelopeError("not_an_event", 'The body is not a Stripe event (object != "event").')
    event_id = document.get("id")
    if not isinstance(event_id, str) or not _EVENT_ID.match(event_id):
        raise EnvelopeError("invalid_event", "The event has no valid id.")
    event_type = document.get("type")
    if not isinstance(event_type, str) or len(event_type) > 100 or not _EVENT_TYPE.match(event_type):
        raise EnvelopeError("invalid_event", "The event has no valid type.")
    data = document.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise EnvelopeError("invalid_event", "The event has no data.object.")
    created = document.get("created")
    if isinstance(created, bool) or not isinstance(created, int) or not 0 <= created <= MAX_TIMESTAMP:
        raise EnvelopeError("invalid_event", "The event has no valid created time.")
    livemode = document.get("livemode")
    if not isinstance(livemode, bool):
        raise EnvelopeError("invalid_event", "The event has no livemode flag.")
    account = document.get("account")
    if account is not None and (not isinstance(account, str) or not account.startswith("acct_") or len(account) > 255):
        raise EnvelopeError("invalid_event", "The event's account is not a Stripe account id.")
    api_version = document.get("api_version")
    if api_version is not None and (not isinstance(api_version, str) or len(api_version) > 64):
        raise EnvelopeError("invalid_event", "The event's api_version is not a string.")
    return EventEnvelope(
        id=event_id,
        type=event_type,
        created=created,
        livemode=livemode,
        account=account,
        api_version=api_version,
        object=data["object"],
    )
