"""Fixtures built on the factory: settings, engine, session factory, app, client, runner,
and ``deliver`` which posts a Stripe event with a real ``Stripe-Signature`` header.

The database is SQLite by default. ``TEST_DATABASE_URL=postgresql://...`` runs the same
suite on PostgreSQL: a throwaway database is created on that server for the run and
dropped afterwards. The schema comes from the Alembic migrations, not ``create_all``, so
the migrations are what is tested.

Tests commit for real (ingest owns its transactions, and a failure is recorded in a
transaction of its own), so every table is emptied after each test instead of rolling
back an outer transaction.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import pytest
import responses
from sqlalchemy import func, select, text

from app import create_app
from config import Settings
from models import Base, make_engine, make_session_factory
from tests import stripe_payloads as payloads
from tests.databases import throwaway_database

WEBHOOK_SECRET = "whsec_test_primary_0123456789abcdef"
ROTATED_SECRET = "whsec_test_rotated_fedcba9876543210"
API_TOKEN = "test-api-token-0123456789abcdef"


def _postgres_url() -> str | None:
    return os.environ.get("TEST_DATABASE_URL") or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _postgres_url():
        return
    skip = pytest.mark.skip(reason="needs PostgreSQL: set TEST_DATABASE_URL")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def is_postgres() -> bool:
    return _postgres_url() is not None


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with throwaway_database(_postgres_url()) as url:
        yield url


@pytest.fixture(scope="session")
def engine(database_url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(database_url, pool_size=20)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine):  # type: ignore[no-untyped-def]
    yield make_session_factory(engine)
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text(f"TRUNCATE {', '.join(tables)}"))
        else:
            for table in tables:
                connection.execute(text(f"DELETE FROM {table}"))


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        stripe_api_key="sk_test_unit",
        stripe_webhook_secrets=(WEBHOOK_SECRET, ROTATED_SECRET),
        stripe_webhook_tolerance=300,
        stripe_livemode=False,
        webhook_max_bytes=64 * 1024,
        secret_key="test-secret-key",
        api_token=API_TOKEN,
    )


@pytest.fixture
def app(settings: Settings, session_factory):  # type: ignore[no-untyped-def]
    app = create_app(settings, session_factory=session_factory)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


@pytest.fixture
def api_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}"}


Deliver = Callable[..., Any]


@pytest.fixture
def deliver(client, app) -> Deliver:  # type: ignore[no-untyped-def]
    """Post ``event`` (a dict, or raw bytes) signed with the primary secret, as Stripe does,
    then wait for it to be applied: the applier drains the inbox before this returns
    (``apply=False`` leaves it in the inbox)."""

    def _deliver(event: dict | bytes, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None, headers: dict | None = None, apply: bool = True):  # type: ignore[no-untyped-def]
        body = event if isinstance(event, bytes) else payloads.encode(event)
        signature = payloads.sign(body, secret, timestamp=timestamp)
        response = client.post(
            "/webhooks/stripe",
            data=body,
            headers={"Stripe-Signature": signature, "Content-Type": "application/json", **(headers or {})},
        )
        if apply:
            app.extensions["reconciler"].applier.drain()
        return response

    return _deliver


class Ledger:
    """Reads for assertions, each in a short session of its own: on SQLite a session held
    open across a request would hold the database lock and block the app."""

    def __init__(self, session_factory) -> None:  # type: ignore[no-untyped-def]
        self._session_factory = session_factory

    def get(self, model: type, key: str):  # type: ignore[no-untyped-def]
        with self._session_factory() as session:
            return session.get(model, key)

    def all(self, model: type, *where: Any) -> list:
        with self._session_factory() as session:
            return list(session.scalars(select(model).where(*where)))

    def count(self, model: type, *where: Any) -> int:
        with self._session_factory() as session:
            return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

    def order(self, order_id: str) -> dict | None:
        from domain.orders import order_view

        with self._session_factory() as session:
            return order_view(session, order_id)


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    """`responses` intercepting the SDK's HTTP traffic for one test."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def stripe_api(mock):  # type: ignore[no-untyped-def]
    """A stateful Stripe behind `mock` (tests/stripe_fake/), at stripe_fake.API."""
    from tests.stripe_fake import FakeStripe

    return FakeStripe(mock)


@pytest.fixture
def ledger(session_factory) -> Ledger:  # type: ignore[no-untyped-def]
    return Ledger(session_factory)


@pytest.fixture(scope="session")
def stripe_double_server() -> Iterator[Any]:
    """The fake Stripe served on 127.0.0.1 (tests/stripe_fake/), for the whole session."""
    from tests.stripe_fake import StripeDouble

    with StripeDouble() as double:
        yield double


@pytest.fixture
def stripe_double(stripe_double_server):  # type: ignore[no-untyped-def]
    """The Stripe double, emptied for this test."""
    stripe_double_server.reset()
    return stripe_double_server
