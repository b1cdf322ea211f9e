"""The business, without the web. ``app`` (the web), ``jobs`` (the scheduled and
background work) and the CLI all use it; it imports neither of them, nor Flask.

* :mod:`domain.stripe`: the one door to Stripe (gateway, call policy) and Stripe objects
  of any API version read into our own snapshots.
* :mod:`domain.ledger`: the event inbox and its applier, the write rules that turn Stripe
  objects into orders, charges, refunds and disputes, and what each charge still holds.
* :mod:`domain.cases`: duplicate cases: the rule, detection, every status change,
  refunds, and what finance sees and decides.
* :mod:`domain.payments`: the pay endpoint's and Checkout's service, idempotent replays,
  attempts.
* :mod:`domain.orders`, :mod:`domain.alerts`: the orders we know, the alerts we send.

Errors raised here carry a stable ``code`` and a message, never an HTTP status: the web
layer maps codes to answers in one place.
"""
