"""The business, without the web: the ledger of Stripe objects and its event inbox.

Nothing here imports Flask; the web app (``app``), the jobs (``jobs``) and the CLI all use
it. Errors raised here carry a stable ``code`` and a message, never an HTTP status: the web
layer maps codes to answers in one place.
"""
