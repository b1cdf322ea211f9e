"""Fuzz test of the JSON API and the pay endpoint from their OpenAPI document
(``/api/openapi.json``) with schemathesis: every operation gets generated requests (path
ids of any size, query strings, headers, bodies) with a full-scope token, and fails on a
5xx, a status the document does not list, a body that does not match its schema, or a
wrong content type. Bounded (a few dozen examples per operation, no shrinking deadline)
so it runs in the normal suite in seconds.

The database holds an order and an open case so that generated requests can reach them
(the document's examples point at them); Stripe is the FakeStripe double, so nothing leaves
the machine."""

from __future__ import annotations

import pytest
import schemathesis
from schemathesis import checks
from hypothesis import HealthCheck, Phase, given, settings

from app import create_app
from app.api_auth import ENDPOINT_SCOPES, PUBLIC_ENDPOINTS
from app.openapi import openapi_document
from tests.conftest import API_TOKEN
from tests.integration.test_duplicates_api import open_cases, review_settings  # noqa: F401 (fixtures)

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
MAX_EXAMPLES = 40


@pytest.fixture
def fuzz_app(review_settings, session_factory, open_cases):  # type: ignore[no-untyped-def]
    app = create_app(review_settings, session_factory=session_factory)
    return app


OPERATIONS = [
    (method.upper(), path) for path, operations in openapi_document()["paths"].items() for method in operations
]


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_operation_answers_5xx_or_off_schema(fuzz_app, method, path) -> None:  # type: ignore[no-untyped-def]
    # The schema as the app serves it; schemathesis's own pytest loader (from_fixture)
    # does not run under this pytest, so each operation's strategy is driven directly.
    api = schemathesis.openapi.from_wsgi("/api/openapi.json", fuzz_app)
    operation = api[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case) -> None:  # type: ignore[no-untyped-def]
        # What the document promises: no 5xx, a listed status, its schema and content
        # type. Not schemathesis's positive_data_acceptance: a schema-valid request may
        # still be refused for business reasons (422 note_required, 404 order_not_found).
        case.call_and_validate(headers=AUTH, checks=CHECKS)

    check()


def test_every_api_route_is_in_the_document(fuzz_app, client) -> None:  # type: ignore[no-untyped-def]
    document = client.get("/api/openapi.json").get_json()  # served without a token
    assert document["openapi"].startswith("3.")
    described = {
        (path, method.upper()) for path, operations in document["paths"].items() for method in operations
    }
    routes = set()
    for rule in fuzz_app.url_map.iter_rules():
        if rule.endpoint in ENDPOINT_SCOPES and rule.endpoint != "health.prometheus_metrics":
            path = rule.rule.replace("<path:", "{").replace("<id:", "{").replace("<", "{").replace(">", "}")
            routes |= {(path, m) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes == described
    assert PUBLIC_ENDPOINTS == {"api.openapi"}
