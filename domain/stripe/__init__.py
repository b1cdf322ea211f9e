"""Stripe: :mod:`domain.stripe.gateway` is the only module that imports ``stripe``; every
call to Stripe goes through it. :mod:`domain.stripe.shapes` reads Stripe objects of any API
version into typed snapshots; :mod:`domain.stripe.ratelimit` is the limiter the gateway
paces every request with."""
