"""Settings: every environment variable the service reads, read once, typed and frozen.

Nothing else in the project reads ``os.environ``; the composition roots (``app.create_app``
and the CLI) call :meth:`Settings.from_env` once and hand the object down. A missing or
malformed value fails at start with a :class:`SettingsError` that names the variable,
never later in the middle of a request.

This module imports only the standard library.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from . import security as _security  # stdlib only, like this module

__all__ = ["Settings", "SettingsError", "DEFAULT_SQLITE_PATH", "password_hash_problem"]

DEFAULT_SQLITE_PATH = Path("instance") / "reconciler.db"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_API_KEY = re.compile(r"^(sk|rk)_(test|live)_[A-Za-z0-9_]+$")
_WEBHOOK_SECRET = re.compile(r"^whsec_[A-Za-z0-9+/=_-]+$")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """The service's configuration. Immutable; build it with :meth:`from_env`.

    Its repr never shows a secret (see :data:`_SECRET_FIELDS`): only whether it is set.
    However it is built, the review page's security rules hold (:meth:`__post_init__`).
    """

    database_url: str
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    # Several secrets are accepted at once so a secret can be rotated without dropping events.
    stripe_webhook_secrets: tuple[str, ...] = ()
    stripe_webhook_tolerance: int = 300
    stripe_livemode: bool = False
    stripe_max_network_retries: int = 2
    webhook_max_bytes: int = 1024 * 1024
    secret_key: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    log_format: str = "auto"  # json | text | auto (text on a terminal)
    # Pay endpoint: how long a client Idempotency-Key is replayed, and how long a request
    # waits for another request's PaymentIntent creation before answering 409.
    idempotency_key_ttl_hours: int = 24
    pay_wait_seconds: float = 2.0
    # Checkout endpoint: where Stripe Checkout sends the customer back (a request may name
    # its own), and how long a session stays open (Stripe allows 30 min to 24 h).
    checkout_success_url: str | None = None
    checkout_cancel_url: str | None = None
    checkout_expires_minutes: int = 1440
    # Reconciliation.
    reconcile_cron: str = "0 2 * * *"
    backfill_days: int = 7
    refund_mode: str = "review"  # review | auto | dry-run
    duplicate_window_hours: int = 24
    # Charges naming no order: same card (or customer), amount and currency within this
    # many minutes of each other are a "possible duplicate, no order" case (review only).
    unlinked_window_minutes: int = 10
    auto_refund_unknown_total: bool = False
    stripe_rate_limit: float = 20.0  # requests per second, client side
    # Alerts (each channel optional; the log always gets them).
    alert_slack_webhook_url: str | None = field(default=None, repr=False)
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_user: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    alert_email_from: str | None = None
    alert_email_to: tuple[str, ...] = ()
    # Webhook signature failures per web process that raise an alert, within the window.
    signature_alert_threshold: int = 20
    signature_alert_window_seconds: int = 300
    # Review page users: (username, role, password hash); role is viewer or approver.
    review_users: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)
    # API security (README "Security"): scoped API tokens (name, scope, "sha256:<hex>"),
    # how alert e-mail reaches the SMTP server (starttls | implicit | none) and an extra CA
    # file to verify its certificate with. Parsed by config/security.py.
    api_tokens: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)
    smtp_tls: str = "starttls"
    smtp_ca_file: str | None = None

    # -- web security: review sessions, login throttling, cookies, proxies -----------------
    # Server-side review sessions end after this long without a request, and this long
    # after login whatever happens.
    session_idle_minutes: int = 30
    session_max_hours: int = 12
    # Failed logins: a username is locked after this many in a row, a client address after
    # LOGIN_ADDRESS_MAX_FAILURES; the lock lasts LOGIN_LOCK_SECONDS and doubles with each
    # further failure (at most an hour). This many failures across the service within
    # five minutes raise one alert.
    login_max_failures: int = 5
    login_address_max_failures: int = 20
    login_lock_seconds: int = 60
    login_alert_threshold: int = 20
    # Development only: no Secure flag on the session cookie for plain-http requests from a
    # loopback peer address (reconciler serve on http://127.0.0.1). Refused in live mode.
    dev_allow_http_loopback: bool = False
    # Reverse proxies in front of the service whose X-Forwarded-For/-Proto are trusted.
    trusted_proxies: int = 0

    # -- the event inbox and its applier (README "Ingest") ------------------------------
    # Events per applier transaction; an event that failed this many times raises one
    # alert; how long a reconcile pass waits for the inbox to drain before it goes on;
    # applier processes `reconciler serve` runs beside the web workers (0: none, for hosts
    # that only accept; run `reconciler applier` elsewhere); the applier's CPU niceness
    # (0-19: at a peak the accept path, which Stripe waits on, gets the cores first and
    # the applier catches up on what is left).
    applier_batch_size: int = 500
    applier_linger_ms: int = 250
    event_alert_attempts: int = 5
    inbox_drain_seconds: int = 60
    applier_processes: int = 1
    applier_nice: int = 10
    # PostgreSQL: the appliers' threads run at idle CPU priority (Linux SCHED_IDLE: they
    # get only the CPU time nothing else wants), so at a peak the web workers keep every
    # core; a guard thread at APPLIER_NICE applies whenever the oldest event waiting is
    # older than applier_lag_guard_seconds, so a machine that stays saturated still
    # applies (README "Ingest"). SQLite never: there the applier holds the one write lock
    # that the accept path needs too.
    applier_idle_cpu: bool = True
    applier_lag_guard_seconds: int = 10
    # One access-log line per request from the web server (WEB_ACCESS_LOG). Off by
    # default: at a webhook peak it cost 15% of the accept path's CPU, and /metrics counts
    # every webhook by type and outcome (every refused or failed one is also logged).
    access_log: bool = False

    # -- Checkout Sessions (README "Checkout Sessions and Payment Links") ------------------
    # A session names its order in client_reference_id, else in metadata[this key].
    checkout_order_metadata_key: str = "order_id"
    # Payment Links used one link per product: link id -> order key. A session of such a
    # link that names no order is linked to the order "<order key>:<customer>" (customer
    # id, else a hash of the e-mail Checkout collected). Empty: off.
    payment_link_orders: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.review_users:
            key = self.secret_key or ""
            if len(key.encode()) < MIN_SECRET_KEY_BYTES:
                raise SettingsError(
                    f"SECRET_KEY must be set to at least {MIN_SECRET_KEY_BYTES} bytes when REVIEW_USERS is set "
                    f"(it has {len(key.encode())}); make one with: python -c 'import secrets; print(secrets.token_hex(32))'"
                )
            for username, _, password_hash in self.review_users:
                problem = password_hash_problem(password_hash)
                if problem:
                    raise SettingsError(
                        f"REVIEW_USERS: the password hash for {username!r} {problem}; "
                        "make a new one with `reconciler users hash-password`"
                    )
        if self.dev_allow_http_loopback and self.stripe_livemode:
            raise SettingsError("DEV_ALLOW_HTTP_LOOPBACK is for development and cannot be true when STRIPE_LIVEMODE is true")

    def __repr__(self) -> str:
        parts = []
        for name, spec in self.__dataclass_fields__.items():
            value = getattr(self, name)
            if name in _SECRET_FIELDS or not spec.repr:  # field(repr=False) marks a secret too
                shown = "'<set>'" if value else repr(value)
            elif name == "database_url":
                shown = repr(_mask_url_password(value))
            else:
                shown = repr(value)
            parts.append(f"{name}={shown}")
        return f"Settings({', '.join(parts)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read and validate every setting from ``environ`` (default: ``os.environ``)."""
        env = _Env(os.environ if environ is None else environ)
        database_url = env.text("DATABASE_URL") or f"sqlite:///{DEFAULT_SQLITE_PATH.resolve()}"
        settings = cls(
            database_url=_normalise_database_url(database_url),
            secret_key=env.text("SECRET_KEY"),
            api_token=env.text("API_TOKEN"),
            log_level=(env.text("LOG_LEVEL") or "INFO").upper(),
            log_format=_parse_choice("LOG_FORMAT", env.text("LOG_FORMAT") or "auto", ("auto", "json", "text")),
            review_users=_parse_review_users(env.text("REVIEW_USERS")),
            **_stripe_fields(env),
            **_payment_fields(env),
            **_reconcile_fields(env),
            **_ingest_fields(env),
            **_alert_fields(env),
            **_web_fields(env),
        )
        if settings.smtp_host and not (settings.alert_email_from and settings.alert_email_to):
            raise SettingsError("SMTP_HOST needs ALERT_EMAIL_FROM and ALERT_EMAIL_TO")
        if settings.log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError("LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR")
        settings = replace(settings, **_security.from_env(env.text, settings))  # API tokens, SMTP TLS
        _check_live(settings)
        if settings.api_token is not None and len(settings.api_token) < 16:
            raise SettingsError("API_TOKEN must be at least 16 characters")
        return settings

    def warnings(self) -> list[str]:
        """What works but is probably not what was meant; ``reconciler serve`` prints these
        at start. (``REVIEW_USERS`` without a ``SECRET_KEY`` of at least 32 bytes is not a
        warning but an error: :meth:`__post_init__`.)"""
        found: list[str] = []
        if not self.secret_key:
            found.append(
                "SECRET_KEY is not set: each process makes up its own key, lost at every restart, so "
                "REVIEW_USERS cannot be used (review logins need a persistent key) and sealed client "
                "secrets are read again from Stripe; set a persistent SECRET_KEY "
                "(python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        return found

    def with_overrides(self, **changes: Any) -> "Settings":
        """A copy with some fields changed (tests and the CLI use this)."""
        return replace(self, **changes)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


# -- web security helpers ------------------------------------------------------------------

MIN_SECRET_KEY_BYTES = 32
# Fields whose value never appears in repr (nor, through it, in logs or tracebacks).
_SECRET_FIELDS = frozenset(
    {
        "stripe_api_key",
        "stripe_webhook_secrets",
        "secret_key",
        "api_token",
        "alert_slack_webhook_url",
        "smtp_password",
        "review_users",
    }
)
# Werkzeug password hashes: "method$salt$hexdigest". The floors are werkzeug's own scrypt
# default (N=2^15, r=8, p=1) and OWASP's PBKDF2 minimums (600,000 for SHA-256, 210,000 for
# SHA-512); anything weaker, or another method, is refused.
_SCRYPT = re.compile(r"^scrypt:(\d{1,10}):(\d{1,4}):(\d{1,4})\$([^$]{8,})\$([0-9a-f]{128})$")
_PBKDF2 = re.compile(r"^pbkdf2:(sha256|sha512):(\d{1,10})\$([^$]{8,})\$([0-9a-f]+)$")
_PBKDF2_MIN_ITERATIONS = {"sha256": 600_000, "sha512": 210_000}
_PBKDF2_HEX_LENGTH = {"sha256": 64, "sha512": 128}
SCRYPT_MIN_N = 2**15


def password_hash_problem(password_hash: str) -> str | None:
    """Why ``password_hash`` may not be used for a review user, or None when it is fine."""
    scrypt = _SCRYPT.match(password_hash)
    if scrypt:
        n, r, p = (int(scrypt.group(i)) for i in (1, 2, 3))
        if n < SCRYPT_MIN_N or n & (n - 1) or r < 8 or p < 1:
            return f"is too weak (scrypt N={n}, r={r}, p={p}; at least N={SCRYPT_MIN_N}, r=8, p=1)"
        return None
    pbkdf2 = _PBKDF2.match(password_hash)
    if pbkdf2:
        digest, iterations = pbkdf2.group(1), int(pbkdf2.group(2))
        if len(pbkdf2.group(4)) != _PBKDF2_HEX_LENGTH[digest]:
            return "is malformed (a pbkdf2 digest of the wrong length)"
        if iterations < _PBKDF2_MIN_ITERATIONS[digest]:
            return (
                f"is too weak (pbkdf2:{digest} with {iterations} iterations; "
                f"at least {_PBKDF2_MIN_ITERATIONS[digest]})"
            )
        return None
    method = password_hash.split("$", 1)[0][:40]
    if method.startswith(("scrypt", "pbkdf2")) and "$" in password_hash:
        return "is malformed (expected scrypt:N:r:p$salt$hex or pbkdf2:sha256:iterations$salt$hex)"
    return "is not a werkzeug scrypt or pbkdf2 hash"


def _mask_url_password(url: str) -> str:
    return re.sub(r"^([a-z0-9+]+://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _normalise_database_url(url: str) -> str:
    # psycopg 3 is the driver we ship; a bare postgres:// URL (as many hosts hand out) would
    # otherwise make SQLAlchemy look for psycopg2.
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith("postgresql+psycopg://") or url.startswith("sqlite"):
        return url
    raise SettingsError("DATABASE_URL must be a postgresql:// or sqlite:/// URL")



class _Env:
    """The environment as settings read it: values stripped, empty meaning unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        return _parse_int(name, self.text(name), default, minimum=minimum, maximum=maximum)

    def number(self, name: str, default: float, *, minimum: float) -> float:
        return _parse_float(name, self.text(name), default, minimum=minimum)

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean; ``default`` when unset."""
        return _parse_bool(name, self.text(name) or str(default).lower())


def _stripe_fields(env: _Env) -> dict[str, Any]:
    """The Stripe account: API key (matching STRIPE_LIVEMODE), API base, webhook secrets."""
    api_key = env.text("STRIPE_API_KEY")
    livemode = env.flag("STRIPE_LIVEMODE")
    if api_key is not None:
        match = _API_KEY.match(api_key)
        if match is None:
            raise SettingsError("STRIPE_API_KEY must be a secret or restricted key (sk_test_..., sk_live_..., rk_...)")
        if (match.group(2) == "live") != livemode:
            raise SettingsError(f"STRIPE_API_KEY is a {match.group(2)} key but STRIPE_LIVEMODE is {str(livemode).lower()}")
    api_base = env.text("STRIPE_API_BASE")
    if api_base is not None and not re.match(r"^https?://[^\s/]+(:\d+)?/?$", api_base):
        raise SettingsError("STRIPE_API_BASE must be a URL such as http://127.0.0.1:8420")
    secrets = tuple(s.strip() for s in (env.text("STRIPE_WEBHOOK_SECRET") or "").split(",") if s.strip())
    if any(not _WEBHOOK_SECRET.match(secret) for secret in secrets):
        raise SettingsError("STRIPE_WEBHOOK_SECRET must be one or more comma-separated whsec_... secrets")
    return {
        "stripe_api_key": api_key,
        "stripe_api_base": api_base.rstrip("/") if api_base else None,
        "stripe_webhook_secrets": secrets,
        "stripe_webhook_tolerance": env.integer("STRIPE_WEBHOOK_TOLERANCE", 300, minimum=1),
        "stripe_livemode": livemode,
        "stripe_max_network_retries": env.integer("STRIPE_MAX_NETWORK_RETRIES", 2, minimum=0),
        "stripe_rate_limit": env.number("STRIPE_RATE_LIMIT", 20.0, minimum=0.1),
    }


def _payment_fields(env: _Env) -> dict[str, Any]:
    """The pay and checkout endpoints, Checkout Sessions and Payment Links."""
    return {
        "idempotency_key_ttl_hours": env.integer("IDEMPOTENCY_KEY_TTL_HOURS", 24, minimum=1),
        "pay_wait_seconds": env.number("PAY_WAIT_SECONDS", 2.0, minimum=0.0),
        "checkout_success_url": _parse_http_url("CHECKOUT_SUCCESS_URL", env.text("CHECKOUT_SUCCESS_URL")),
        "checkout_cancel_url": _parse_http_url("CHECKOUT_CANCEL_URL", env.text("CHECKOUT_CANCEL_URL")),
        "checkout_expires_minutes": min(1440, env.integer("CHECKOUT_EXPIRES_MINUTES", 1440, minimum=30)),
        "checkout_order_metadata_key": _parse_metadata_key(
            "CHECKOUT_ORDER_METADATA_KEY", env.text("CHECKOUT_ORDER_METADATA_KEY") or "order_id"
        ),
        "payment_link_orders": _parse_payment_link_orders(env.text("PAYMENT_LINK_ORDERS")),
    }


def _reconcile_fields(env: _Env) -> dict[str, Any]:
    """The reconciliation pass: schedule, backfill, the rule's windows, refund mode."""
    return {
        "reconcile_cron": _parse_cron(env.text("RECONCILE_CRON") or "0 2 * * *"),
        "backfill_days": env.integer("BACKFILL_DAYS", 7, minimum=1),
        "refund_mode": _parse_choice("REFUND_MODE", env.text("REFUND_MODE") or "review", ("review", "auto", "dry-run")),
        "duplicate_window_hours": env.integer("DUPLICATE_WINDOW_HOURS", 24, minimum=1),
        "unlinked_window_minutes": env.integer("UNLINKED_WINDOW_MINUTES", 10, minimum=1),
        "auto_refund_unknown_total": env.flag("AUTO_REFUND_UNKNOWN_TOTAL"),
        "inbox_drain_seconds": env.integer("INBOX_DRAIN_SECONDS", 60, minimum=0),
    }


def _ingest_fields(env: _Env) -> dict[str, Any]:
    """The webhook endpoint and the appliers."""
    return {
        "webhook_max_bytes": env.integer("WEBHOOK_MAX_BYTES", 1024 * 1024, minimum=1024),
        "applier_batch_size": env.integer("APPLIER_BATCH_SIZE", 500, minimum=1),
        "applier_linger_ms": env.integer("APPLIER_LINGER_MS", 250, minimum=0, maximum=5000),
        "event_alert_attempts": env.integer("EVENT_ALERT_ATTEMPTS", 5, minimum=1),
        "applier_processes": env.integer("APPLIER_PROCESSES", 1, minimum=0),
        "applier_nice": env.integer("APPLIER_NICE", 10, minimum=0, maximum=19),
        "applier_idle_cpu": env.flag("APPLIER_IDLE_CPU", default=True),
        "applier_lag_guard_seconds": env.integer("APPLIER_LAG_GUARD_SECONDS", 10, minimum=1),
        "signature_alert_threshold": env.integer("SIGNATURE_ALERT_THRESHOLD", 20, minimum=1),
        "signature_alert_window_seconds": env.integer("SIGNATURE_ALERT_WINDOW_SECONDS", 300, minimum=10),
    }


def _alert_fields(env: _Env) -> dict[str, Any]:
    """Where alerts go: Slack and SMTP."""
    return {
        "alert_slack_webhook_url": _parse_http_url("ALERT_SLACK_WEBHOOK_URL", env.text("ALERT_SLACK_WEBHOOK_URL")),
        "smtp_host": env.text("SMTP_HOST"),
        "smtp_port": env.integer("SMTP_PORT", 587, minimum=1),
        "smtp_user": env.text("SMTP_USER"),
        "smtp_password": env.text("SMTP_PASSWORD"),
        "alert_email_from": env.text("ALERT_EMAIL_FROM"),
        "alert_email_to": tuple(a.strip() for a in (env.text("ALERT_EMAIL_TO") or "").split(",") if a.strip()),
    }


def _web_fields(env: _Env) -> dict[str, Any]:
    """Web security (review sessions, login throttling, cookies, proxies) and the access log."""
    return {
        "access_log": env.flag("WEB_ACCESS_LOG"),
        "session_idle_minutes": env.integer("SESSION_IDLE_MINUTES", 30, minimum=1),
        "session_max_hours": env.integer("SESSION_MAX_HOURS", 12, minimum=1),
        "login_max_failures": env.integer("LOGIN_MAX_FAILURES", 5, minimum=1),
        "login_address_max_failures": env.integer("LOGIN_ADDRESS_MAX_FAILURES", 20, minimum=1),
        "login_lock_seconds": env.integer("LOGIN_LOCK_SECONDS", 60, minimum=1),
        "login_alert_threshold": env.integer("LOGIN_ALERT_THRESHOLD", 20, minimum=1),
        "dev_allow_http_loopback": env.flag("DEV_ALLOW_HTTP_LOOPBACK"),
        "trusted_proxies": env.integer("TRUSTED_PROXIES", 0, minimum=0),
    }


def _check_live(settings: Settings) -> None:
    """A live deployment without these would accept forged webhooks or expose the API."""
    if not settings.stripe_livemode:
        return
    for name, value in (
        ("STRIPE_API_KEY", settings.stripe_api_key),
        ("STRIPE_WEBHOOK_SECRET", settings.stripe_webhook_secrets),
        ("SECRET_KEY", settings.secret_key),
        ("API_TOKEN or API_TOKENS", settings.api_token or settings.api_tokens),
    ):
        if not value:
            raise SettingsError(f"{name} is required when STRIPE_LIVEMODE is true")


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name} must be true or false, not {raw!r}")


_USERNAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


def _parse_review_users(raw: str | None) -> tuple[tuple[str, str, str], ...]:
    """``name:role:hash`` entries separated by commas or newlines (the hash is what
    ``reconciler users hash-password`` prints; it may itself contain colons)."""
    if raw is None:
        return ()
    users: list[tuple[str, str, str]] = []
    for entry in re.split(r"[,\n]", raw):
        entry = entry.strip()
        if not entry:
            continue
        parts = entry.split(":", 2)
        if len(parts) != 3 or not _USERNAME.match(parts[0]) or parts[1] not in ("viewer", "approver") or not parts[2]:
            raise SettingsError("REVIEW_USERS entries are name:viewer|approver:password-hash")
        if any(u[0] == parts[0] for u in users):
            raise SettingsError(f"REVIEW_USERS names {parts[0]!r} twice")
        users.append((parts[0], parts[1], parts[2]))
    return tuple(users)


def _parse_float(name: str, raw: str | None, default: float, *, minimum: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, not {raw!r}") from None
    if not value >= minimum or value == float("inf"):
        raise SettingsError(f"{name} must be a finite number of at least {minimum}")
    return value


def _parse_choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
    return value


def _parse_cron(raw: str) -> str:
    # Shape only (five fields); APScheduler validates the values when the scheduler starts.
    if len(raw.split()) != 5:
        raise SettingsError(f"RECONCILE_CRON must be a five-field cron expression, not {raw!r}")
    return raw


def _parse_http_url(name: str, raw: str | None) -> str | None:
    if raw is None:
        return None
    if not re.match(r"^https?://[^\s/]+", raw):
        raise SettingsError(f"{name} must be an http(s) URL")
    return raw


def _parse_metadata_key(name: str, raw: str) -> str:
    # Stripe metadata keys are at most 40 characters and may not contain square brackets.
    if len(raw) > 40 or "[" in raw or "]" in raw:
        raise SettingsError(f"{name} must be a Stripe metadata key (at most 40 characters, no brackets)")
    return raw


_PAYMENT_LINK_ID = re.compile(r"^plink_[A-Za-z0-9]{1,250}$")
_ORDER_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:#/-]{0,127}$")


def _parse_payment_link_orders(raw: str | None) -> tuple[tuple[str, str], ...]:
    """``plink_A=KEY,plink_B=OTHER``: Payment Link id -> order key (one link per product)."""
    if raw is None:
        return ()
    pairs: list[tuple[str, str]] = []
    for item in raw.split(","):
        if not item.strip():
            continue
        link, sep, key = (part.strip() for part in item.partition("="))
        if not sep or not _PAYMENT_LINK_ID.match(link) or not _ORDER_KEY.match(key):
            raise SettingsError(
                "PAYMENT_LINK_ORDERS must be comma-separated plink_...=ORDER_KEY pairs "
                "(order keys: letters, digits and _.:#/-, at most 128 characters)"
            )
        if any(link == seen for seen, _ in pairs):
            raise SettingsError(f"PAYMENT_LINK_ORDERS names {link} twice")
        pairs.append((link, key))
    return tuple(pairs)


def _parse_int(name: str, raw: str | None, default: int, *, minimum: int, maximum: int | None = None) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, not {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be at most {maximum}")
    return value
