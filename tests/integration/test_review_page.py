"""The finance review page (/review): login, roles, CSRF, escaping, and decisions through
the same refund path as the job, with Stripe played by the FakeStripe double (the real
stripe-python SDK behind `responses`).

AC1 anonymous access, identical login failures, viewers cannot decide;
AC2 CSRF; AC3 escaping of hostile data; AC4 approve twice refunds once, dismiss needs a
note, chosen amounts in major units.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from sqlalchemy import update
from werkzeug.security import generate_password_hash

from app import create_app
from app.blueprints.review import parse_major_plan
from domain.stripe.gateway import StripeGateway
from app.services.auth import UserDirectory
from app.errors import status_of
from domain.cases.review import CaseActionError
from jobs.reconcile import run_reconciliation
from models import AuditEntry, CaseCharge, Charge, DuplicateCase, Order, RefundAttempt, run_in_transaction, utcnow
from tests.stripe_fake import API
from tests.integration.test_reconcile import NOW, _double_click, make_order

PASSWORD = "correct horse battery staple"
APPROVER = "finance-approver"
VIEWER = "finance-viewer"
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'


SECRET_KEY = "review-page-test-secret-key-0123456789abcdef"  # REVIEW_USERS needs >= 32 bytes


def _hash(password: str) -> str:
    # werkzeug's default (scrypt N=2^15): weaker hashes are refused at start.
    return generate_password_hash(password)


@pytest.fixture
def review_settings(settings):  # type: ignore[no-untyped-def]
    return settings.with_overrides(
        review_users=((APPROVER, "approver", _hash(PASSWORD)), (VIEWER, "viewer", _hash(PASSWORD))),
        secret_key=SECRET_KEY,
        stripe_api_base=API,
        stripe_max_network_retries=0,
        refund_mode="review",
    )


@pytest.fixture
def review_app(review_settings, session_factory):  # type: ignore[no-untyped-def]
    app = create_app(review_settings, session_factory=session_factory)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def web(review_app):  # type: ignore[no-untyped-def]
    return review_app.test_client()


@pytest.fixture
def case_id(stripe_api, session_factory, review_settings, ledger) -> int:  # type: ignore[no-untyped-def]
    """One open case: a double click of 49.99 on ord_dc (keeper first, one duplicate)."""
    _double_click(stripe_api, session_factory)
    run_reconciliation(session_factory, StripeGateway.from_settings(review_settings), review_settings, sleep=lambda s: None)
    (case,) = ledger.all(DuplicateCase)
    assert case.status == "open"
    return case.id


def charges_of(ledger, case_id: int) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    case = ledger.get(DuplicateCase, case_id)
    members = ledger.all(CaseCharge, CaseCharge.case_id == case_id)
    duplicate = next(m.charge_id for m in members if m.charge_id != case.keeper_charge_id)
    return case.keeper_charge_id, duplicate


def csrf_in(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF field in the page"
    return match.group(1)


def login(web, username: str = APPROVER, password: str = PASSWORD, next_url: str | None = None):  # type: ignore[no-untyped-def]
    token = csrf_in(web.get("/review/login").get_data(as_text=True))
    data = {"username": username, "password": password, "csrf_token": token}
    if next_url is not None:
        data["next"] = next_url
    return web.post("/review/login", data=data)


def token(web) -> str:  # type: ignore[no-untyped-def]
    with web.session_transaction() as session:
        return session["csrf"]


def post(web, path: str, **data: str):  # type: ignore[no-untyped-def]
    return web.post(path, data={"csrf_token": token(web), **data})


def unchanged(ledger, stripe_api, case_id: int) -> None:  # type: ignore[no-untyped-def]
    case = ledger.get(DuplicateCase, case_id)
    assert case.status == "open" and case.decided_by is None and case.note is None
    assert ledger.count(AuditEntry, AuditEntry.actor.in_([APPROVER, VIEWER])) == 0
    assert ledger.count(RefundAttempt) == 0
    assert stripe_api.refund_creates == 0 and stripe_api.refund_requests == []


ACTIONS = ["approve", "refund", "dismiss", "reopen"]


# -- AC1: login, anonymous access, roles ---------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/review"),
        ("get", "/review/"),
        ("get", "/review/cases/1"),
        ("get", "/review/report.csv?since=2024-01-01"),
        ("get", "/review/no-such-page"),
        ("post", "/review/logout"),
        *[("post", f"/review/cases/1/{action}") for action in ACTIONS],
    ],
)
def test_every_review_route_sends_anonymous_users_to_the_login_page(web, method, path) -> None:  # type: ignore[no-untyped-def]
    response = getattr(web, method)(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/review/login?next=")


def test_login_redirects_back_to_where_the_user_was_going(web, case_id) -> None:  # type: ignore[no-untyped-def]
    first = web.get(f"/review/cases/{case_id}?x=1")
    assert first.headers["Location"] == f"/review/login?next=/review/cases/{case_id}?x%3D1"
    response = login(web, next_url=f"/review/cases/{case_id}?x=1")
    assert response.status_code == 303 and response.headers["Location"] == f"/review/cases/{case_id}?x=1"
    assert web.get(f"/review/cases/{case_id}").status_code == 200


@pytest.mark.parametrize(
    "target",
    ["https://attacker.example/", "//attacker.example/review", "/\\attacker.example", "/api/duplicates", "javascript:alert(1)", "/review\r\nX: y"],
)
def test_next_never_leaves_the_review_pages(web, target) -> None:  # type: ignore[no-untyped-def]
    response = login(web, next_url=target)
    assert response.status_code == 303 and response.headers["Location"] == "/review"


def test_wrong_password_and_unknown_user_get_the_identical_answer(web) -> None:  # type: ignore[no-untyped-def]
    wrong_password = login(web, APPROVER, "not the password")
    unknown_user = login(web, "nobody-here", PASSWORD)
    empty = login(web, APPROVER, "")
    for response in (wrong_password, unknown_user, empty):
        assert response.status_code == 401
        html = response.get_data(as_text=True)
        assert re.findall(r'role="alert">([^<]*)<', html) == ["Invalid username or password"]
    # nothing else differs between the two pages but the echoed username
    strip = lambda r, name: re.sub(r'value="[^"]*"', "", r.get_data(as_text=True))  # noqa: E731
    assert strip(wrong_password, APPROVER) == strip(unknown_user, "nobody-here")
    assert web.get("/review").status_code == 302  # still not logged in


def test_unknown_users_are_checked_against_a_dummy_hash_of_the_same_method() -> None:
    directory = UserDirectory([("someone", "approver", _hash(PASSWORD))])
    assert directory.authenticate("someone", PASSWORD).role == "approver"
    assert directory.authenticate("someone", "nope") is None
    assert directory.authenticate("nobody", PASSWORD) is None
    assert directory._dummy().startswith("scrypt:32768:8:1$")
    assert directory.authenticate(None, None) is None
    assert directory.authenticate("someone", "x" * 5000) is None
    with pytest.raises(ValueError):
        UserDirectory([("someone", "admin", _hash(PASSWORD))])
    with pytest.raises(ValueError, match="too weak"):  # however the directory is built
        UserDirectory([("someone", "approver", generate_password_hash(PASSWORD, method="pbkdf2:sha256:1000"))])


def test_login_rotates_the_session_and_logout_ends_it(web, case_id) -> None:  # type: ignore[no-untyped-def]
    web.get("/review/login")
    before = token(web)
    assert login(web).status_code == 303
    assert token(web) != before
    assert web.get("/review").status_code == 200
    response = post(web, "/review/logout")
    assert response.status_code == 303 and response.headers["Location"] == "/review/login"
    assert web.get("/review").status_code == 302


def test_a_login_expires_and_a_removed_user_is_out_at_once(web, review_app, session_factory, case_id) -> None:  # type: ignore[no-untyped-def]
    # The login's age is the server-side session's (SESSION_MAX_HOURS, 12 by default);
    # the browser cannot make it younger.
    from models import WebSession

    login(web)
    with session_factory.begin() as db:
        db.execute(update(WebSession).values(created_at=utcnow() - timedelta(hours=13)))
    assert web.get("/review").status_code == 302
    login(web)
    with web.session_transaction() as session:
        session["_user_id"] = "someone-not-configured/0123456789abcdef"
    assert web.get("/review").status_code == 302


@pytest.mark.parametrize("action", ACTIONS)
def test_a_viewer_reads_but_cannot_decide(web, stripe_api, ledger, case_id, action) -> None:  # type: ignore[no-untyped-def]
    assert login(web, VIEWER).status_code == 303
    page = web.get(f"/review/cases/{case_id}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "Approve the proposed refund" not in html and "only approvers can decide" in html
    _, duplicate = charges_of(ledger, case_id)
    response = post(web, f"/review/cases/{case_id}/{action}", note="viewer tried", **{f"amount-{duplicate}": "49.99"})
    assert response.status_code == 403
    assert "Only approvers" in response.get_data(as_text=True)
    unchanged(ledger, stripe_api, case_id)


def test_session_cookie_is_httponly_lax_and_secure_unless_the_dev_setting_allows_loopback_http(review_app, review_settings, session_factory) -> None:  # type: ignore[no-untyped-def]
    # Secure by default, whatever the Host (issue 12, point 4): plain http only for a
    # loopback peer when DEV_ALLOW_HTTP_LOOPBACK is on. tests/integration/test_security_web.py
    # has the proxy cases.
    review_app.config["TESTING"] = False

    def cookie(app, base_url: str, peer: str = "127.0.0.1") -> str:  # type: ignore[no-untyped-def]
        response = app.test_client().get("/review/login", base_url=base_url, environ_base={"REMOTE_ADDR": peer})
        return response.headers["Set-Cookie"]

    local = cookie(review_app, "http://127.0.0.1:8000")
    assert "HttpOnly" in local and "SameSite=Lax" in local and "Secure" in local
    assert "Secure" in cookie(review_app, "http://localhost:8000")
    assert "Secure" in cookie(review_app, "https://127.0.0.1:8000")
    assert "Secure" in cookie(review_app, "http://review.example.com")
    assert "Secure" in cookie(review_app, "https://review.example.com")
    dev = create_app(review_settings.with_overrides(dev_allow_http_loopback=True), session_factory=session_factory)
    assert "Secure" not in cookie(dev, "http://127.0.0.1:8000")
    assert "Secure" not in cookie(dev, "http://localhost:8000", peer="::1")
    assert "Secure" in cookie(dev, "https://127.0.0.1:8000")
    assert "Secure" in cookie(dev, "http://127.0.0.1:8000", peer="192.0.2.10")  # not a loopback peer


def test_review_responses_carry_the_security_headers(web, case_id) -> None:  # type: ignore[no-untyped-def]
    login(web)
    for response in (web.get("/review/login"), web.get("/review"), web.get(f"/review/cases/{case_id}"), web.get("/review/cases/999999")):
        assert response.headers["Content-Security-Policy"] == (
            "default-src 'self'; style-src 'self' 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
        )
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "same-origin"
        assert "no-store" in response.headers["Cache-Control"]


# -- AC2: CSRF -----------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [None, "", "wrong-token-0123456789abcdef0123456789"])
@pytest.mark.parametrize("action", ACTIONS)
def test_a_post_without_the_right_csrf_token_changes_nothing(web, stripe_api, ledger, case_id, action, sent) -> None:  # type: ignore[no-untyped-def]
    login(web)
    _, duplicate = charges_of(ledger, case_id)
    data = {"note": "looks fine", f"amount-{duplicate}": "49.99"}
    if sent is not None:
        data["csrf_token"] = sent
    response = web.post(f"/review/cases/{case_id}/{action}", data=data)
    assert response.status_code == 400
    assert "security token" in response.get_data(as_text=True)
    unchanged(ledger, stripe_api, case_id)


def test_a_token_from_another_session_is_refused(review_app, stripe_api, ledger, case_id) -> None:  # type: ignore[no-untyped-def]
    attacker, victim = review_app.test_client(), review_app.test_client()
    login(attacker)
    login(victim)
    response = victim.post(f"/review/cases/{case_id}/approve", data={"csrf_token": token(attacker)})
    assert response.status_code == 400
    unchanged(ledger, stripe_api, case_id)


def test_login_and_logout_need_the_token_too(web) -> None:  # type: ignore[no-untyped-def]
    web.get("/review/login")
    refused = web.post("/review/login", data={"username": APPROVER, "password": PASSWORD})
    assert refused.status_code == 400
    assert web.get("/review").status_code == 302
    login(web)
    assert web.post("/review/logout", data={"csrf_token": "nope"}).status_code == 400
    assert web.get("/review").status_code == 200


# -- AC3: escaping -------------------------------------------------------------------------


def test_hostile_data_is_escaped_on_the_list_and_case_pages(web, stripe_api, session_factory, review_settings, ledger) -> None:  # type: ignore[no-untyped-def]
    make_order(session_factory, "ord_xss", 4999)
    for _ in range(2):
        stripe_api.add_charge(amount=4999, customer=f"cus_{SCRIPT}", brand=IMG, metadata={"order_id": "ord_xss", "note": SCRIPT}, created=NOW - 30)
    run_reconciliation(session_factory, StripeGateway.from_settings(review_settings), review_settings, sleep=lambda s: None)
    (case,) = ledger.all(DuplicateCase)
    hostile_order = f"ord_{SCRIPT}{IMG}"

    def poison(session) -> None:  # type: ignore[no-untyped-def]
        # Our doors refuse such an order id; a row from elsewhere must still render safely.
        session.add(Order(id=hostile_order, amount=4999, currency="usd", amount_source="api"))
        session.flush()
        session.execute(update(Charge).where(Charge.order_id == "ord_xss").values(order_id=hostile_order))
        session.execute(
            update(DuplicateCase).where(DuplicateCase.id == case.id).values(order_id=hostile_order, review_reasons=[f"reason {SCRIPT}", IMG])
        )

    run_in_transaction(session_factory, poison)
    login(web)
    assert post(web, f"/review/cases/{case.id}/dismiss", note=f"{SCRIPT} {IMG}").status_code == 303

    for path in ("/review", f"/review/cases/{case.id}"):
        html = web.get(path).get_data(as_text=True)
        assert "<script>" not in html and "<img" not in html, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path
        assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html, path
    case_html = web.get(f"/review/cases/{case.id}").get_data(as_text=True)
    assert f"cus_&lt;script&gt;" in case_html  # the customer, escaped
    assert case_html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 4  # order, customer x2, reason, note


# -- AC4: decisions ------------------------------------------------------------------------


def test_approving_twice_refunds_once(web, stripe_api, ledger, case_id) -> None:  # type: ignore[no-untyped-def]
    login(web)
    csrf = token(web)
    first = web.post(f"/review/cases/{case_id}/approve", data={"csrf_token": csrf})
    second = web.post(f"/review/cases/{case_id}/approve", data={"csrf_token": csrf})  # a double click, or a second tab
    assert first.status_code == 303 and first.headers["Location"] == f"/review/cases/{case_id}"
    assert second.status_code == 409
    second_html = second.get_data(as_text=True)
    assert f"case {case_id} is refunded; nothing to approve" in second_html
    # the first action's confirmation is shown on the next page rendered
    assert "Approved: 1 refund(s) issued; case is now refunded." in second_html
    assert stripe_api.refund_creates == 1
    _, duplicate = charges_of(ledger, case_id)
    (request,) = stripe_api.refund_requests
    assert request["charge"] == duplicate and request["amount"] == "4999"
    case = ledger.get(DuplicateCase, case_id)
    assert case.status == "refunded" and case.decided_by == APPROVER
    page = web.get(first.headers["Location"]).get_data(as_text=True)
    assert APPROVER in page and "49.99 USD" in page


def test_dismiss_needs_a_note_and_records_who_when_and_why(web, stripe_api, ledger, case_id) -> None:  # type: ignore[no-untyped-def]
    login(web)
    refused = post(web, f"/review/cases/{case_id}/dismiss", note="   ")
    assert refused.status_code == 422
    assert "A note saying why is required." in refused.get_data(as_text=True)
    assert ledger.get(DuplicateCase, case_id).status == "open"

    done = post(web, f"/review/cases/{case_id}/dismiss", note="customer asked to keep both")
    assert done.status_code == 303
    case = ledger.get(DuplicateCase, case_id)
    assert case.status == "dismissed" and case.decided_by == APPROVER and case.note == "customer asked to keep both"
    (entry,) = ledger.all(AuditEntry, AuditEntry.case_id == case_id, AuditEntry.action == "dismiss")
    assert entry.actor == APPROVER and entry.note == "customer asked to keep both" and entry.at is not None
    html = web.get(f"/review/cases/{case_id}").get_data(as_text=True)
    audit = html.split("Audit log", 1)[1]
    assert APPROVER in audit and "dismiss" in audit and "customer asked to keep both" in audit
    assert entry.at.strftime("%Y-%m-%d %H:%M") in audit
    assert stripe_api.refund_creates == 0

    reopened = post(web, f"/review/cases/{case_id}/reopen", note="second look")
    assert reopened.status_code == 303
    assert ledger.get(DuplicateCase, case_id).status == "open"
    assert [e.action for e in ledger.all(AuditEntry, AuditEntry.case_id == case_id, AuditEntry.actor == APPROVER)] == ["dismiss", "reopen"]
    assert post(web, f"/review/cases/{case_id}/reopen").status_code == 409


def test_refund_more_than_held_or_on_the_keeper_is_refused(web, stripe_api, ledger, case_id) -> None:  # type: ignore[no-untyped-def]
    login(web)
    keeper, duplicate = charges_of(ledger, case_id)
    too_much = post(web, f"/review/cases/{case_id}/refund", **{f"amount-{duplicate}": "50.00"})
    assert too_much.status_code == 422
    on_keeper = post(web, f"/review/cases/{case_id}/refund", **{f"amount-{keeper}": "10.00"})
    assert on_keeper.status_code == 422
    unchanged(ledger, stripe_api, case_id)
    # the typed amount is kept in the form for correcting
    assert 'value="50.00"' in too_much.get_data(as_text=True)


@pytest.mark.parametrize("typed", ["49.999", "-1", "-0.01", "abc", "1e3", "0", "0.00", "4,999", "NaN", "Infinity", ""])
def test_amounts_that_are_not_plain_money_are_refused_before_stripe(web, stripe_api, ledger, case_id, typed) -> None:  # type: ignore[no-untyped-def]
    login(web)
    _, duplicate = charges_of(ledger, case_id)
    response = post(web, f"/review/cases/{case_id}/refund", **{f"amount-{duplicate}": typed})
    assert response.status_code == 422
    unchanged(ledger, stripe_api, case_id)


def test_a_partial_refund_typed_in_major_units(web, stripe_api, ledger, case_id) -> None:  # type: ignore[no-untyped-def]
    login(web)
    _, duplicate = charges_of(ledger, case_id)
    response = post(web, f"/review/cases/{case_id}/refund", note="partial, agreed", **{f"amount-{duplicate}": " 10.5 "})
    assert response.status_code == 303
    (request,) = stripe_api.refund_requests
    assert request["charge"] == duplicate and request["amount"] == "1050"
    assert stripe_api.refund_creates == 1
    (attempt,) = ledger.all(RefundAttempt)
    assert attempt.amount == 1050 and attempt.requested_by == APPROVER


def test_major_units_follow_the_currency_decimals() -> None:
    charges = [
        {"id": "ch_usd", "currency": "usd"},
        {"id": "ch_jpy", "currency": "jpy"},
        {"id": "ch_kwd", "currency": "kwd"},
    ]
    plan = parse_major_plan(charges, {"amount-ch_usd": "49.99", "amount-ch_jpy": "5000", "amount-ch_kwd": "1.230"})
    assert [(p.charge_id, p.amount) for p in plan] == [("ch_usd", 4999), ("ch_jpy", 5000), ("ch_kwd", 1230)]
    assert parse_major_plan(charges, {"amount-ch_usd": "7"})[0].amount == 700
    for bad in ({"amount-ch_jpy": "49.5"}, {"amount-ch_usd": "0.001"}, {"amount-ch_kwd": "1.235"}, {}, {"amount-ch_other": "1"}):
        with pytest.raises(CaseActionError) as caught:
            parse_major_plan(charges, bad)
        assert status_of(caught.value) == 422


# -- the list, filters, report -------------------------------------------------------------


def test_the_list_shows_what_finance_needs(web, ledger, case_id) -> None:  # type: ignore[no-untyped-def]
    login(web, VIEWER)
    html = web.get("/review").get_data(as_text=True)
    keeper, duplicate = charges_of(ledger, case_id)
    # The queue: one row per case (the charges are on the case's page, below).
    assert "ord_dc" in html and "49.99 USD" in html and "visa ···· 4242" in html
    assert "Clear duplicate: refunding 49.99 USD leaves the order holding its total of 49.99 USD; ready to approve." in html
    assert f'href="/review/cases/{case_id}"' in html
    assert "Totals over every matching case" in html and "USD" in html
    assert "/review/report.csv?since=" in html
    case_html = web.get(f"/review/cases/{case_id}").get_data(as_text=True)
    assert "keeper" in case_html and keeper in case_html and duplicate in case_html
    assert "https://dashboard.stripe.com/test/payments/" in case_html


def test_filters_and_pages(web, stripe_api, session_factory, review_settings, ledger) -> None:  # type: ignore[no-untyped-def]
    for order in ("ord_a", "ord_b"):
        _double_click(stripe_api, session_factory, order_id=order)
    run_reconciliation(session_factory, StripeGateway.from_settings(review_settings), review_settings, sleep=lambda s: None)
    login(web)
    first = web.get("/review?status=open&per_page=1").get_data(as_text=True)
    assert "Page 1 of 2" in first and "page=2" in first and "status=open" in first
    assert web.get("/review?status=dismissed").get_data(as_text=True).count('<tr class="case ') == 0
    assert web.get("/review?currency=usd").get_data(as_text=True).count('<tr class="case ') == 2
    for bad in ("status=closed", "currency=dollars", "from=yesterday", "until=2024-13-01", "page=0", "per_page=x"):
        response = web.get(f"/review?{bad}")
        assert response.status_code == 400, bad
        assert response.mimetype == "text/html" and 'role="alert"' in response.get_data(as_text=True)


def test_report_csv_download(web, ledger, case_id) -> None:  # type: ignore[no-untyped-def]
    login(web, VIEWER)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    response = web.get(f"/review/report.csv?since=2000-01-01&until={today}")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert response.headers["Content-Disposition"] == f'attachment; filename="duplicate-cases-2000-01-01-to-{today}.csv"'
    lines = response.get_data(as_text=True).splitlines()
    assert lines[0].startswith("case_id,case_status,") and len(lines) == 3
    assert "49.99" in lines[1]
    assert web.get("/review/report.csv").status_code == 400
    assert web.get("/review/report.csv?since=soon").status_code == 400


def test_an_unknown_case_is_a_404_page(web) -> None:  # type: ignore[no-untyped-def]
    login(web)
    response = web.get("/review/cases/424242")
    assert response.status_code == 404 and response.mimetype == "text/html"
    assert post(web, "/review/cases/424242/approve").status_code == 404


def test_authorisation_case_is_shown_and_released_from_the_page(stripe_api, session_factory, review_settings, ledger, web) -> None:  # type: ignore[no-untyped-def]
    make_order(session_factory, "ord_auth_page", 4999)
    paid = stripe_api.add_charge(amount=4999, metadata={"order_id": "ord_auth_page"}, created=NOW - 60)
    auth = stripe_api.add_authorization(amount=4999, metadata={"order_id": "ord_auth_page"}, created=NOW - 50, with_intent=True)
    run_reconciliation(session_factory, StripeGateway.from_settings(review_settings), review_settings, sleep=lambda s: None)
    (case,) = ledger.all(DuplicateCase)
    assert case.kind == "authorization" and case.status == "open"
    login(web)
    html = web.get(f"/review/cases/{case.id}").get_data(as_text=True)
    assert "duplicate authorisation" in html and "Approve the proposed release" in html
    response = post(web, f"/review/cases/{case.id}/approve")
    assert response.status_code in (200, 302, 303)
    (cancel,) = stripe_api.cancel_requests
    assert cancel["_intent"] == auth["payment_intent"] and stripe_api.refund_requests == []
    assert ledger.get(DuplicateCase, case.id).status == "refunded"
    assert stripe_api.charge(paid["id"])["amount_refunded"] == 0
