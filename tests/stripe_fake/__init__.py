"""One fake Stripe for the tests and for ``reconciler demo``.

* :class:`StripeModel` (model.py): Stripe's objects in their real shapes (built by
  :mod:`tests.stripe_payloads`), Idempotency-Key storage and replay, listings and pages,
  Stripe's error answers, and the controls to seed it, change it behind the service's back
  and make it misbehave. It answers ``handle(method, url, form, headers)`` with
  ``(status, body, headers)`` and is safe to use from many threads.
* Two thin transports over it:

  - :class:`FakeStripe` (responses_adapter.py): ``FakeStripe(mock)`` answers, through a
    ``responses.RequestsMock``, everything the SDK sends to ``API``; what most integration
    tests and the property tests use (the ``stripe_api`` fixture).
  - :class:`StripeServer` (http_server.py): the model on a real socket on 127.0.0.1, for
    many threads and processes; :class:`StripeDouble` is a model with its own server (the
    ``stripe_double`` fixture of the pay and checkout tests), and ``reconciler demo``
    serves a model with it when no emulator is installed.

This package lives under tests/ and is not part of the installed wheel.
"""

from tests.stripe_fake.http_server import API_KEY, StripeDouble, StripeServer
from tests.stripe_fake.model import StripeModel, card_declined
from tests.stripe_fake.responses_adapter import API, FakeStripe, answer_through

__all__ = ["API", "API_KEY", "FakeStripe", "StripeDouble", "StripeModel", "StripeServer", "answer_through", "card_declined"]
