"""The Stripe gateway: the only module in the project that imports ``stripe``.

Two jobs:

* :func:`verify_webhook` checks a ``Stripe-Signature`` header with stripe-python's own
  verifier against every configured secret (never a home-made HMAC).
* :class:`StripeGateway` wraps an injected ``stripe.StripeClient`` and returns plain
  ``dict`` data, so nothing else handles SDK objects (which are not dicts: ``.get`` on them
  raises) and tests can swap the client or intercept its ``requests`` traffic with
  ``responses``.

SDK errors are translated into :class:`GatewayError` subclasses that say what the caller
may do next (retry later, back off, give up), so no caller needs to import ``stripe``.

The call policy lives here, for every caller (the pay and checkout endpoints, finance
approvals, the reconciliation pass and its backfill):

* **Pacing.** Every HTTP request, each page of a listing and each retry included, first
  takes a token from the gateway's :class:`~domain.stripe.ratelimit.RateLimiter`
  (``STRIPE_RATE_LIMIT`` per second), one limiter shared by every caller of a gateway
  and of the views :meth:`StripeGateway.with_policy` and :meth:`StripeGateway.patient`
  make of it.
* **Retries.** One loop, :meth:`StripeGateway._call`: a logical call makes at most
  :attr:`RetryPolicy.tries` HTTP requests. The SDK never retries on its own (every
  request is sent with ``max_network_retries=0``), so the tries never multiply. Retried:
  a connection error the SDK marks retryable, 409, 5xx, and whatever Stripe answers with
  ``Stripe-Should-Retry: true``; never what it answers with ``Stripe-Should-Retry: false``;
  a 429 only under a patient policy. Between tries: 0.5 s doubling up to 8 s, +-20 %.
* **Idempotency.** Every write carries our own ``Idempotency-Key`` (built from a row of
  ours, never random), and every try of a call sends the same one: Stripe replays the
  first result, so a retried refund can never become a second refund.

The budgets: a gateway built from the settings makes ``1 + STRIPE_MAX_NETWORK_RETRIES``
tries per call and does not wait out a 429 (a web request must not sleep for long); the
refund path of a job (a reconciliation pass, an approval from the command line) uses
:meth:`StripeGateway.patient`: :data:`PATIENT_TRIES` tries, a 429 included.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Sequence, TypedDict

import stripe

from config import Settings
from domain.stripe.ratelimit import RateLimiter

if TYPE_CHECKING:  # the SDK's request shapes, for the type checker only
    from stripe import RequestOptions
    from stripe.params import (
        ChargeListParams,
        DisputeListParams,
        EventListParams,
        PaymentIntentCancelParams,
        PaymentIntentCreateParams,
        PaymentIntentListParams,
        RefundCreateParams,
        RefundListParams,
    )
    from stripe.params.checkout import SessionCreateParams, SessionListParams

log = logging.getLogger(__name__)

# (connect, read) seconds. Stripe answers in well under a second; a hung socket must not
# hold a web worker or the nightly job for the SDK's default 80 s.
HTTP_TIMEOUT = (5.0, 30.0)


class WebhookSignatureError(Exception):
    """The webhook's signature does not verify; ``code`` is the JSON error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def verify_webhook(
    payload: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    tolerance: int,
    now: float | None = None,
) -> None:
    """Raise :class:`WebhookSignatureError` unless ``header`` signs ``payload`` with one of
    ``secrets`` at a time within ``tolerance`` seconds of now.

    Several secrets are tried so a rotated secret and its successor both verify while
    Stripe switches over. stripe-python rejects only timestamps too far in the past; one
    too far in the future is rejected here as well, since it can only come from a broken
    clock or a forged header.
    """
    if not header or not header.strip():
        raise WebhookSignatureError("missing_signature", "The Stripe-Signature header is missing.")
    timestamp = _signature_timestamp(header)
    if timestamp is None:
        raise WebhookSignatureError(
            "malformed_signature", "The Stripe-Signature header has no valid t= timestamp."
        )
    failures: list[str] = []
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, tolerance)
        except stripe.SignatureVerificationError as exc:
            failures.append(str(exc))
            continue
        except (TypeError, ValueError):
            # e.g. a non-ASCII v1 value makes hmac.compare_digest raise TypeError
            raise WebhookSignatureError("malformed_signature", "The Stripe-Signature header is not ASCII hex.") from None
        current = time.time() if now is None else now
        if timestamp > current + tolerance:
            raise WebhookSignatureError(
                "timestamp_outside_tolerance", "The signature timestamp is in the future."
            )
        return
    # The SDK checks the signature before the timestamp, so a tolerance failure from any
    # secret means that secret signed it: the most useful thing to report.
    message = " ".join(failures)
    if "Timestamp outside the tolerance zone" in message:
        raise WebhookSignatureError(
            "timestamp_outside_tolerance",
            f"The signature timestamp is more than {tolerance} s old.",
        )
    if "No signatures found with expected scheme" in message or "Unable to extract" in message:
        raise WebhookSignatureError(
            "malformed_signature", "The Stripe-Signature header has no v1 signature."
        )
    raise WebhookSignatureError(
        "signature_mismatch", "No v1 signature matches the payload for any configured secret."
    )


def _signature_timestamp(header: str) -> int | None:
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            return int(value) if value.isdigit() and len(value) <= 12 else None
    return None


class GatewayError(Exception):
    """A Stripe call failed. Subclasses say what to do about it; ``code`` and
    ``http_status`` are Stripe's, when it answered."""

    retryable = False
    #: The PaymentIntent Stripe created anyway, on a refusal of
    #: :meth:`StripeGateway.create_payment_intent`; None otherwise.
    payment_intent: dict[str, Any] | None = None

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


class StripeUnavailable(GatewayError):
    """Network failure or a Stripe 5xx after the gateway's retries: try again later."""

    retryable = True


class StripeRateLimited(GatewayError):
    """429: back off. Retried only by a patient gateway, or when Stripe says so."""

    retryable = True


class StripeNotFound(GatewayError):
    """The object does not exist (in this mode, on this account)."""


class StripeRejected(GatewayError):
    """Stripe refused the request (invalid parameters, idempotency conflict, auth)."""


class StripeNotConfigured(GatewayError):
    """No STRIPE_API_KEY: calls to Stripe are not possible in this deployment."""


def build_stripe_client(settings: Settings) -> stripe.StripeClient | None:
    """The real client for ``settings``, or ``None`` when no API key is configured.

    Uses the ``requests`` HTTP client explicitly (so ``responses`` intercepts it in tests),
    points the SDK at ``STRIPE_API_BASE`` when set (an emulator), and sets
    ``max_network_retries`` explicitly, for a request that names none. The gateway names
    0 on every request it sends and retries itself (``1 + STRIPE_MAX_NETWORK_RETRIES``
    tries, see the module docstring), so the two never add up.
    """
    if settings.stripe_api_key is None:
        return None
    return stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else {},
        http_client=stripe.RequestsClient(timeout=HTTP_TIMEOUT),
        max_network_retries=settings.stripe_max_network_retries,
    )


#: HTTP tries of one call of a patient gateway (:meth:`StripeGateway.patient`).
PATIENT_TRIES = 3


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the gateway retries one logical call (see the module docstring)."""

    #: HTTP requests at most for one call, the first one included.
    tries: int = 1
    #: Wait out a 429 as well (back off and try again), not only what Stripe marks
    #: retryable; for callers that may sleep, never a web request.
    rate_limited: bool = False
    #: How the backoff between tries waits (injected by tests and by the pass).
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        if self.tries < 1:
            raise ValueError("a call makes at least one try")

    @classmethod
    def from_settings(cls, settings: Settings) -> "RetryPolicy":
        return cls(tries=1 + settings.stripe_max_network_retries)

    def retries(self, exc: stripe.StripeError) -> bool:
        """Whether a try that failed with ``exc`` may be tried again (tries left aside)."""
        if isinstance(exc, stripe.APIConnectionError):
            return exc.should_retry
        advice = next((str(v).lower() for k, v in (exc.headers or {}).items() if k.lower() == "stripe-should-retry"), None)
        if advice in ("true", "false"):
            return advice == "true"
        status = exc.http_status or 0
        return status == 409 or status >= 500 or (status == 429 and self.rate_limited)

    @staticmethod
    def delay(retry: int) -> float:
        """Seconds before retry number ``retry`` (1, 2, ...): 0.5 s doubling up to 8 s, +-20 %."""
        return min(8.0, 0.5 * 2.0 ** (retry - 1)) * random.uniform(0.8, 1.2)


class Page(NamedTuple):
    """One page of a listing and the second (of the caller's clock) taken just before the
    request that read it, after the rate limit let it go."""

    as_of: int
    items: list[dict[str, Any]]


class Listing:
    """One of Stripe's list calls, followed page after page with ``starting_after`` until
    ``has_more`` is false or a page comes back empty. Iterating it gives every item;
    :meth:`pages` gives them page by page. Each page is one call through the gateway:
    paced, retried and its errors translated like any other. Nothing is requested until
    it is iterated."""

    def __init__(
        self,
        gateway: "StripeGateway",
        list_page: Callable[[stripe.StripeClient, Any], stripe.StripeObject],
        params: Mapping[str, object],
    ) -> None:
        self._gateway = gateway
        self._list_page = list_page
        self._params = params

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for page in self.pages():
            yield from page.items

    def pages(self, clock: Callable[[], float] = time.time) -> Iterator[Page]:
        """The pages that hold items, each stamped by ``clock`` just before its request."""
        client = self._gateway._require_client()
        params = self._params
        while True:
            sent: list[float] = []
            page = self._gateway._call(
                lambda: self._list_page(client, params), before_send=lambda: sent.append(clock())
            )
            items: list[dict[str, Any]] = page.get("data", [])
            if not items:
                return
            yield Page(int(sent[-1]), items)
            if not page.get("has_more"):
                return
            params = {**params, "starting_after": items[-1]["id"]}


class StripeGateway:
    """Every Stripe call the service makes, returning plain dicts, under one call policy
    (the module docstring): one rate limiter for every caller, one retry loop."""

    def __init__(
        self,
        client: stripe.StripeClient | None,
        *,
        policy: RetryPolicy | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        """``policy`` defaults to one try per call; without ``limiter`` calls are not paced
        (:meth:`from_settings` gives both from the settings)."""
        self._client = client
        self._policy = policy or RetryPolicy()
        self._limiter = limiter

    @classmethod
    def from_settings(cls, settings: Settings, *, client: stripe.StripeClient | None = None) -> "StripeGateway":
        """The gateway the settings describe: their client (or ``client``, e.g. a test's,
        used instead), ``1 + STRIPE_MAX_NETWORK_RETRIES`` tries per call, and a limiter of
        ``STRIPE_RATE_LIMIT`` calls per second."""
        return cls(
            client if client is not None else build_stripe_client(settings),
            policy=RetryPolicy.from_settings(settings),
            limiter=RateLimiter(settings.stripe_rate_limit),
        )

    @property
    def policy(self) -> RetryPolicy:
        return self._policy

    def with_policy(self, policy: RetryPolicy) -> "StripeGateway":
        """This gateway under another retry policy: the same client and the same limiter,
        so its calls are paced together with every other caller's."""
        return StripeGateway(self._client, policy=policy, limiter=self._limiter)

    def patient(self, *, sleep: Callable[[float], None] = time.sleep) -> "StripeGateway":
        """This gateway for a caller that may wait (the refund path of a job):
        :data:`PATIENT_TRIES` tries per call, a 429 waited out as well, backing off with
        ``sleep``."""
        return self.with_policy(RetryPolicy(tries=PATIENT_TRIES, rate_limited=True, sleep=sleep))

    @property
    def configured(self) -> bool:
        return self._client is not None

    def retrieve_charge(self, charge_id: str, *, account: str | None = None) -> dict[str, Any]:
        client = self._require_client()
        return self._call(
            lambda: client.v1.charges.retrieve(charge_id, options=_options(account))
        )

    def retrieve_refund(self, refund_id: str, *, account: str | None = None) -> dict[str, Any]:
        client = self._require_client()
        return self._call(lambda: client.v1.refunds.retrieve(refund_id, options=_options(account)))

    def retrieve_payment_intent(
        self, payment_intent_id: str, *, account: str | None = None
    ) -> dict[str, Any]:
        client = self._require_client()
        return self._call(
            lambda: client.v1.payment_intents.retrieve(payment_intent_id, options=_options(account))
        )

    def list_charges(self, *, created_gte: int, page_size: int = 100) -> Listing:
        """Every charge created at or after ``created_gte``, following pages to the end.

        Pages with ``starting_after`` ourselves rather than ``auto_paging_iter`` so each page
        is one call we pace, retry and translate errors for (and so emulators that page
        oddly still work).
        """
        # created[gt] N-1 rather than created[gte] N: the same set for integer seconds, and
        # the one form every emulator implements.
        params: ChargeListParams = {"created": {"gt": created_gte - 1}, "limit": page_size}
        options = _options(None)
        return Listing(self, lambda c, p: c.v1.charges.list(params=p, options=options), params)

    # --- Refunds and backfill (reconciliation) ---

    def list_refunds(
        self,
        *,
        created_gte: int | None = None,
        charge_id: str | None = None,
        page_size: int = 100,
        account: str | None = None,
    ) -> Listing:
        """Refunds created at or after ``created_gte`` (or every refund of ``charge_id``),
        following pages to the end. ``account``: the connected account the charge lives on
        (its refunds are only visible with the ``Stripe-Account`` header)."""
        params: RefundListParams = {"limit": page_size}
        if created_gte is not None:
            params["created"] = {"gt": created_gte - 1}
        if charge_id is not None:
            params["charge"] = charge_id
        options = _options(account)
        return Listing(self, lambda c, p: c.v1.refunds.list(params=p, options=options), params)

    def list_disputes(self, *, created_gte: int, page_size: int = 100) -> Listing:
        params: DisputeListParams = {"limit": page_size, "created": {"gt": created_gte - 1}}
        options = _options(None)
        return Listing(self, lambda c, p: c.v1.disputes.list(params=p, options=options), params)

    def list_checkout_sessions(self, *, created_gte: int, page_size: int = 100) -> Listing:
        """Every Checkout Session created at or after ``created_gte``, following pages to
        the end (:class:`StripeNotFound` where an emulator does not serve sessions)."""
        params: SessionListParams = {"limit": page_size, "created": {"gt": created_gte - 1}}
        options = _options(None)
        return Listing(self, lambda c, p: c.v1.checkout.sessions.list(params=p, options=options), params)

    def list_undelivered_events(self, *, created_gte: int, page_size: int = 100) -> Listing:
        """Events Stripe could not deliver to a webhook endpoint (``delivery_success=false``;
        the Events API keeps 30 days)."""
        params: EventListParams = {
            "limit": page_size,
            "delivery_success": False,
            "created": {"gt": created_gte - 1},
        }
        options = _options(None)
        return Listing(self, lambda c, p: c.v1.events.list(params=p, options=options), params)

    def create_refund(
        self,
        *,
        charge_id: str,
        amount: int,
        idempotency_key: str,
        metadata: dict[str, str],
        reason: str = "duplicate",
        account: str | None = None,
    ) -> dict[str, Any]:
        """Refund ``amount`` of ``charge_id`` under our own idempotency key.

        The key comes from our refund attempt row, never from a random value: a retry
        within Stripe's 24 h replays the first result instead of refunding again."""
        client = self._require_client()
        options = _write_options(idempotency_key, account)
        params: RefundCreateParams = {"charge": charge_id, "amount": amount, "reason": reason, "metadata": metadata}
        return self._call(lambda: client.v1.refunds.create(params=params, options=options))

    def cancel_payment_intent(
        self,
        payment_intent_id: str,
        *,
        idempotency_key: str,
        cancellation_reason: str | None = None,
        account: str | None = None,
    ) -> dict[str, Any]:
        """Cancel a PaymentIntent (releases an uncaptured authorisation) under our own key."""
        client = self._require_client()
        params: PaymentIntentCancelParams = {}
        if cancellation_reason is not None:
            params["cancellation_reason"] = cancellation_reason
        options = _write_options(idempotency_key, account)
        return self._call(
            lambda: client.v1.payment_intents.cancel(payment_intent_id, params=params, options=options)
        )

    def update_payment_intent_amount(
        self,
        payment_intent_id: str,
        amount: int,
        *,
        idempotency_key: str,
        account: str | None = None,
    ) -> dict[str, Any]:
        """Change a not-yet-paid PaymentIntent's amount (Stripe allows it until it is
        processing, captured or canceled)."""
        client = self._require_client()
        options = _write_options(idempotency_key, account)
        return self._call(
            lambda: client.v1.payment_intents.update(payment_intent_id, params={"amount": amount}, options=options)
        )

    def _require_client(self) -> stripe.StripeClient:
        if self._client is None:
            raise StripeNotConfigured("STRIPE_API_KEY is not set")
        return self._client

    def _call(
        self, request: Callable[[], stripe.StripeObject], *, before_send: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """One logical call: at most ``policy.tries`` HTTP requests, each paced by the
        limiter (``before_send`` runs once the limiter let it go, just before the request);
        between tries the policy's backoff. The request is the same closure every time, so
        a write sends the same parameters and the same idempotency key on every try.
        Errors come out translated (:func:`_translate`), the SDK's as ``__cause__``."""
        policy = self._policy
        for attempt in range(1, policy.tries + 1):
            if self._limiter is not None:
                self._limiter.acquire()
            if before_send is not None:
                before_send()
            try:
                return request().to_dict()
            except stripe.StripeError as exc:
                error = _translate(exc)
                if attempt == policy.tries or not policy.retries(exc):
                    raise error from exc
                delay = policy.delay(attempt)
                log.warning("Stripe call failed (%s); retry %d in %.1fs", type(error).__name__, attempt, delay)
                policy.sleep(delay)
        raise AssertionError("unreachable: policy.tries is at least 1")

    # --- PaymentIntents (pay endpoint) ---

    def create_payment_intent(
        self,
        amount: int,
        currency: str,
        *,
        idempotency_key: str,
        metadata: dict[str, str],
        customer: str | None = None,
        payment_method: str | None = None,
        account: str | None = None,
    ) -> dict[str, Any]:
        """Create a PaymentIntent under our own idempotency key (never a random one), so a
        retry of the same attempt within Stripe's 24 h returns the same PaymentIntent.

        Only parameters every Stripe version (and the emulators) accept are sent; the
        same attempt must always send the same ones, or Stripe rejects the reused key.

        A definitive refusal raises :class:`StripeRejected` with ``payment_intent`` set to
        the PaymentIntent Stripe created anyway, if its error names one (a decline while
        confirming creates the intent and then fails it); ``None`` otherwise.
        """
        client = self._require_client()
        params: PaymentIntentCreateParams = {"amount": amount, "currency": currency, "metadata": dict(metadata)}
        if customer is not None:
            params["customer"] = customer
        if payment_method is not None:
            params["payment_method"] = payment_method
        options = _write_options(idempotency_key, account)
        try:
            return self._call(lambda: client.v1.payment_intents.create(params=params, options=options))
        except GatewayError as exc:
            error = getattr(exc.__cause__, "error", None)
            intent = getattr(error, "payment_intent", None) if error is not None else None
            exc.payment_intent = intent.to_dict() if intent is not None else None
            raise

    def list_payment_intents(
        self,
        *,
        created_gte: int,
        customer: str | None = None,
        page_size: int = 100,
        account: str | None = None,
    ) -> Listing:
        """Every PaymentIntent created at or after ``created_gte`` (optionally of one
        customer), following pages to the end. The list API, unlike search, is not
        eventually consistent: a PaymentIntent that exists is listed."""
        params: PaymentIntentListParams = {"created": {"gt": created_gte - 1}, "limit": page_size}
        if customer is not None:
            params["customer"] = customer
        options = _options(account)
        return Listing(self, lambda c, p: c.v1.payment_intents.list(params=p, options=options), params)


    # --- Checkout Sessions (checkout endpoint) ---

    def create_checkout_session(
        self,
        *,
        amount: int,
        currency: str,
        product_name: str,
        idempotency_key: str,
        client_reference_id: str,
        metadata: dict[str, str],
        success_url: str,
        cancel_url: str,
        expires_at: int,
        account: str | None = None,
    ) -> dict[str, Any]:
        """Create a Checkout Session (mode ``payment``, one line item priced inline) under
        our own idempotency key; the order rides on ``client_reference_id``, the session's
        metadata and its PaymentIntent's metadata. Every retry of one attempt must send the
        same parameters (Stripe rejects a reused key with others)."""
        client = self._require_client()
        params: SessionCreateParams = {
            "mode": "payment",
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": currency,
                        "unit_amount": amount,
                        "product_data": {"name": product_name},
                    },
                }
            ],
            "client_reference_id": client_reference_id,
            "metadata": dict(metadata),
            "payment_intent_data": {"metadata": dict(metadata)},
            "success_url": success_url,
            "cancel_url": cancel_url,
            "expires_at": expires_at,
        }
        options = _write_options(idempotency_key, account)
        return self._call(lambda: client.v1.checkout.sessions.create(params=params, options=options))

    def retrieve_checkout_session(self, session_id: str, *, account: str | None = None) -> dict[str, Any]:
        client = self._require_client()
        return self._call(lambda: client.v1.checkout.sessions.retrieve(session_id, options=_options(account)))

    def expire_checkout_session(
        self, session_id: str, *, idempotency_key: str, account: str | None = None
    ) -> dict[str, Any]:
        """Expire an open Checkout Session (``POST /v1/checkout/sessions/<id>/expire``);
        Stripe refuses (400) a session that is not open any more."""
        client = self._require_client()
        options = _write_options(idempotency_key, account)
        return self._call(lambda: client.v1.checkout.sessions.expire(session_id, options=options))


class _ErrorDetail(TypedDict):
    code: str | None
    http_status: int | None


def _translate(exc: stripe.StripeError) -> GatewayError:
    detail: _ErrorDetail = {"code": getattr(exc, "code", None), "http_status": exc.http_status}
    if isinstance(exc, stripe.RateLimitError):
        return StripeRateLimited(str(exc), **detail)
    if isinstance(exc, (stripe.APIConnectionError, stripe.APIError)):
        return StripeUnavailable(str(exc), **detail)
    if exc.http_status == 404:
        return StripeNotFound(str(exc), **detail)
    if exc.http_status is not None and exc.http_status >= 500:
        return StripeUnavailable(str(exc), **detail)
    return StripeRejected(str(exc), **detail)


def _options(account: str | None) -> RequestOptions:
    """Every request's options: the connected account, if any, and no retries by the SDK
    (the gateway's loop is the only one)."""
    options: RequestOptions = {"max_network_retries": 0}
    if account:
        options["stripe_account"] = account
    return options


def _write_options(idempotency_key: str, account: str | None) -> RequestOptions:
    """A write's options: our own key, sent unchanged on every try of the call."""
    if not idempotency_key:
        raise ValueError("every write to Stripe carries our own idempotency key")
    return {**_options(account), "idempotency_key": idempotency_key}
