"""The fake Stripe behind ``responses``: the real stripe-python SDK sends its requests to
``API`` (never reached) and ``responses`` hands each to the model in the calling thread."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from tests.stripe_fake.model import StripeModel

if TYPE_CHECKING:  # only a type here: serving the fake over HTTP does not need responses
    import responses

API = "http://127.0.0.1:9"  # never reached: responses answers first


def answer_through(mock: "responses.RequestsMock", model: StripeModel, base: str = API) -> None:
    """Let ``model`` answer every request ``mock`` intercepts under ``base``/v1/."""

    def callback(request: Any) -> tuple[int, dict[str, str], str]:
        raw = request.body.decode() if isinstance(request.body, bytes) else request.body or ""
        status, body, headers = model.handle(request.method, request.url, dict(parse_qsl(raw, keep_blank_values=True)), request.headers)
        return status, headers, json.dumps(body)

    pattern = re.compile(rf"{re.escape(base)}/v1/.*")
    for method in ("GET", "POST", "DELETE"):
        mock.add_callback(method, pattern, callback, content_type="application/json")


class FakeStripe(StripeModel):
    """``FakeStripe(mock)``: a fresh fake Stripe answering at ``API`` through ``mock``."""

    def __init__(self, mock: "responses.RequestsMock", base: str = API) -> None:
        super().__init__()
        self.base = base
        answer_through(mock, self, base)
