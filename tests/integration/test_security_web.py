"""Issue 12, points 1, 2 and 4 through the review page: sessions that end, logins that
resist guessing, cookies that stay Secure behind a proxy, HSTS over https.

Each test here failed on the code before the change (signed-cookie sessions, no
throttling, Secure decided from the Host) and passes now.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy import select, update
from werkzeug.security import generate_password_hash

from app import create_app
import models
from models import AlertSent, AuditEntry, DuplicateCase, utcnow
from tests.integration.test_review_page import (  # noqa: F401  (fixtures)
    APPROVER,
    PASSWORD,
    SECRET_KEY,
    VIEWER,
    case_id,
    csrf_in,
    login,
    post,
    review_app,
    review_settings,
    token,
    web,
)

COOKIE = "session"
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{43}$")


def session_cookie(client) -> str | None:  # type: ignore[no-untyped-def]
    cookie = client.get_cookie(COOKIE)
    return cookie.value if cookie else None


def client_from(app, address: str):  # type: ignore[no-untyped-def]
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def fresh_client_with(app, value: str):  # type: ignore[no-untyped-def]
    client = app.test_client()
    client.set_cookie(COOKIE, value)
    return client


def login_attempts(web, username: str, password: str, count: int, **kwargs):  # type: ignore[no-untyped-def]
    return [login(web, username, password, **kwargs).status_code for _ in range(count)]


# -- point 1: sessions -----------------------------------------------------------------------


def test_the_old_cookie_after_logout_gets_the_login_page_and_changes_nothing(web, review_app, ledger, case_id) -> None:  # type: ignore[no-untyped-def]
    assert login(web).status_code == 303
    old_cookie, old_csrf = session_cookie(web), token(web)
    assert web.get("/review").status_code == 200
    assert post(web, "/review/logout").status_code == 303
    replay = fresh_client_with(review_app, old_cookie)
    response = replay.get("/review")
    assert response.status_code == 302 and response.headers["Location"].startswith("/review/login")
    dismissed = replay.post(f"/review/cases/{case_id}/dismiss", data={"csrf_token": old_csrf, "note": "replayed"})
    assert dismissed.status_code == 302
    assert ledger.get(DuplicateCase, case_id).status == "open"


def test_a_cookie_forged_with_the_secret_key_opens_nothing(review_app, case_id) -> None:  # type: ignore[no-untyped-def]
    # What a holder of SECRET_KEY could mint before: Flask's signed session for an approver.
    serializer = SecureCookieSessionInterface().get_signing_serializer(review_app)
    assert serializer is not None
    forged_payload = {"user": APPROVER, "login_at": int(time.time()), "csrf": "x" * 43, "_user_id": f"{APPROVER}/0", "_fresh": True}
    forged = fresh_client_with(review_app, serializer.dumps(forged_payload))
    response = forged.get("/review")
    assert response.status_code == 302 and response.headers["Location"].startswith("/review/login")
    # Nor a Flask-Login "remember me" cookie signed with the key.
    from flask_login.utils import encode_cookie

    with review_app.test_request_context():
        user_id = review_app.extensions["review_users"].get(APPROVER).get_id()
        remember = encode_cookie(user_id)
    client = review_app.test_client()
    client.set_cookie("remember_token", remember)
    assert client.get("/review").status_code == 302
    # Nor a well-formed random id that no session has.
    assert fresh_client_with(review_app, "A" * 43).get("/review").status_code == 302


def test_the_cookie_is_only_a_random_id_and_the_database_keeps_no_usable_copy(web, session_factory, case_id) -> None:  # type: ignore[no-untyped-def]
    web.get("/review/login")
    before = session_cookie(web)
    assert login(web).status_code == 303
    value = session_cookie(web)
    assert value and SESSION_ID.match(value) and value != before  # rotated at login
    with session_factory() as db:
        rows = list(db.scalars(select(models.WebSession)))
    assert [r.username for r in rows] == [APPROVER]  # the pre-login session is gone
    assert all(value not in (r.id_hash, str(r.data)) for r in rows)


def test_a_session_ends_after_the_idle_timeout_and_the_absolute_one(web, session_factory, case_id) -> None:  # type: ignore[no-untyped-def]
    login(web)
    assert web.get("/review").status_code == 200
    with session_factory.begin() as db:
        db.execute(update(models.WebSession).values(last_seen_at=utcnow() - timedelta(minutes=31)))
    assert web.get("/review").status_code == 302
    with session_factory() as db:
        assert db.scalar(select(models.WebSession).where(models.WebSession.username == APPROVER)) is None  # deleted
    login(web)
    with session_factory.begin() as db:  # active all along, but logged in 12 h ago
        db.execute(update(models.WebSession).values(created_at=utcnow() - timedelta(hours=12, minutes=1), last_seen_at=utcnow()))
    assert web.get("/review").status_code == 302


def test_log_out_everywhere_ends_every_session_of_the_user_only(review_app, case_id) -> None:  # type: ignore[no-untyped-def]
    laptop, phone, colleague = review_app.test_client(), review_app.test_client(), review_app.test_client()
    for client, name in ((laptop, APPROVER), (phone, APPROVER), (colleague, VIEWER)):
        assert login(client, name).status_code == 303
    phone_csrf = token(phone)
    response = post(laptop, "/review/logout-everywhere")
    assert response.status_code == 303 and response.headers["Location"] == "/review/login"
    assert "logged out everywhere (2 session(s) ended)" in laptop.get("/review/login").get_data(as_text=True)
    assert laptop.get("/review").status_code == 302
    assert phone.get("/review").status_code == 302
    assert colleague.get("/review").status_code == 200
    # A request of the ended session that writes to it does not bring it back.
    assert phone.post(f"/review/cases/{case_id}/dismiss", data={"csrf_token": phone_csrf, "note": "x"}).status_code == 302
    assert phone.get("/review").status_code == 302


def test_a_password_change_ends_the_sessions_opened_with_the_old_one(review_settings, session_factory, case_id) -> None:  # type: ignore[no-untyped-def]
    app = create_app(review_settings, session_factory=session_factory)
    client = app.test_client()
    login(client)
    assert client.get("/review").status_code == 200
    new_hash = generate_password_hash("a new password 0123")
    users = tuple((n, r, new_hash if n == APPROVER else h) for n, r, h in review_settings.review_users)
    restarted = create_app(review_settings.with_overrides(review_users=users), session_factory=session_factory)
    again = restarted.test_client()
    again.set_cookie(COOKIE, session_cookie(client))
    assert again.get("/review").status_code == 302


# -- point 2: login throttling ---------------------------------------------------------------


def test_the_sixth_wrong_password_within_a_minute_is_429_with_retry_after_and_audited(web, ledger, case_id) -> None:  # type: ignore[no-untyped-def]
    assert login_attempts(web, APPROVER, "wrong", 5) == [401] * 5
    sixth = login(web, APPROVER, "wrong")
    assert sixth.status_code == 429
    retry = int(sixth.headers["Retry-After"])
    assert 1 <= retry <= 60
    assert "Too many failed logins" in sixth.get_data(as_text=True)
    # Even the right password is not checked while the name is locked.
    assert login(web, APPROVER, PASSWORD).status_code == 429
    entries = ledger.all(AuditEntry, AuditEntry.actor == "review-login")
    assert [e.action for e in entries] == ["login_failed"] * 5 + ["login_locked"] * 2
    assert all(e.details["username"] == APPROVER and e.details["address"] == "127.0.0.1" for e in entries)
    assert entries[-1].details["retry_after"] >= 1


def test_the_lock_grows_and_a_success_starts_the_name_afresh(web, session_factory, case_id) -> None:  # type: ignore[no-untyped-def]
    login_attempts(web, APPROVER, "wrong", 5)

    def expire_locks() -> None:
        with session_factory.begin() as db:
            db.execute(update(models.LoginThrottle).values(locked_until=utcnow() - timedelta(seconds=1)))

    expire_locks()
    assert login(web, APPROVER, "wrong").status_code == 401  # the 6th failure: locked again, longer
    assert 60 < int(login(web, APPROVER, "wrong").headers["Retry-After"]) <= 120
    expire_locks()
    login(web, APPROVER, "wrong")
    assert 120 < int(login(web, APPROVER, "wrong").headers["Retry-After"]) <= 240
    expire_locks()
    assert login(web, APPROVER, PASSWORD).status_code == 303
    post(web, "/review/logout")
    assert login_attempts(web, APPROVER, "wrong", 4) == [401] * 4  # counting from zero again


def test_unknown_names_are_throttled_and_hashed_exactly_like_known_ones(web, monkeypatch, case_id) -> None:  # type: ignore[no-untyped-def]
    import app.services.auth as auth

    checks: list[str] = []
    real = auth.check_password_hash
    monkeypatch.setattr(auth, "check_password_hash", lambda h, p: checks.append(h.split("$")[0]) or real(h, p))
    known = login_attempts(web, VIEWER, "wrong", 6)
    unknown = login_attempts(web, "nobody-by-that-name", "wrong", 6)
    assert known == unknown == [401] * 5 + [429]
    assert checks == ["scrypt:32768:8:1"] * 10  # one hash of the same cost each, none once locked


def test_many_names_from_one_address_lock_the_address(review_settings, session_factory, case_id) -> None:  # type: ignore[no-untyped-def]
    app = create_app(review_settings.with_overrides(login_address_max_failures=8), session_factory=session_factory)
    sprayer = app.test_client()
    statuses = [login(sprayer, f"name-{i}", "guess").status_code for i in range(9)]
    assert statuses == [401] * 8 + [429]
    assert login(sprayer, APPROVER, PASSWORD).status_code == 429  # the address is locked
    elsewhere = client_from(app, "192.0.2.7")
    assert login(elsewhere, APPROVER, PASSWORD).status_code == 303  # others are not


def test_a_burst_of_failed_logins_alerts_once(review_settings, session_factory, ledger, case_id) -> None:  # type: ignore[no-untyped-def]
    app = create_app(review_settings.with_overrides(login_alert_threshold=6), session_factory=session_factory)
    guard = app.extensions["login_guard"]
    clients = [client_from(app, f"192.0.2.{i}") for i in range(1, 4)]
    for client in clients[:2]:
        login_attempts(client, f"user-{id(client)}", "wrong", 2)
    assert guard.last_alert is None  # 4 failures: below the threshold
    for client in clients:
        login_attempts(client, APPROVER, "wrong", 2)
    assert guard.last_alert is not None
    guard.last_alert.join(5)
    (sent,) = [a for a in ledger.all(AlertSent) if a.key.startswith("login-failures:")]  # once, though 10 failed
    assert "failed review logins" in sent.subject


def test_login_input_of_any_shape_is_a_4xx(web, case_id) -> None:  # type: ignore[no-untyped-def]
    csrf = csrf_in(web.get("/review/login").get_data(as_text=True))
    for data in (
        {"csrf_token": csrf},
        {"csrf_token": csrf, "username": "x" * 100_000, "password": "y"},
        {"csrf_token": csrf, "username": "\x00\u202e", "password": "\x00"},
        {"csrf_token": csrf, "username": APPROVER, "password": "p" * 10_000},
    ):
        assert web.post("/review/login", data=data).status_code in (400, 401, 413, 429)


# -- point 4: cookies and headers ------------------------------------------------------------


def _cookie(app, base_url: str, peer: str, headers: dict[str, str] | None = None) -> str:  # type: ignore[no-untyped-def]
    response = app.test_client().get("/review/login", base_url=base_url, environ_base={"REMOTE_ADDR": peer}, headers=headers or {})
    return response.headers["Set-Cookie"]


def test_host_127_0_0_1_behind_a_proxy_still_gets_a_secure_cookie(review_app, review_settings, session_factory) -> None:  # type: ignore[no-untyped-def]
    review_app.config["TESTING"] = False
    # A proxy on another machine forwards Host: 127.0.0.1:8000 over plain http.
    assert "Secure" in _cookie(review_app, "http://127.0.0.1:8000", peer="10.1.2.3")
    # ... or on this machine: without the development setting the cookie is Secure still.
    assert "Secure" in _cookie(review_app, "http://127.0.0.1:8000", peer="127.0.0.1")
    dev = create_app(review_settings.with_overrides(dev_allow_http_loopback=True), session_factory=session_factory)
    assert "Secure" in _cookie(dev, "http://127.0.0.1:8000", peer="10.1.2.3")
    assert "Secure" not in _cookie(dev, "http://127.0.0.1:8000", peer="127.0.0.1")
    # Behind a trusted proxy the client's address decides, never a spoofed header alone.
    proxied = create_app(review_settings.with_overrides(dev_allow_http_loopback=True, trusted_proxies=1), session_factory=session_factory)
    assert "Secure" in _cookie(proxied, "http://127.0.0.1:8000", peer="127.0.0.1", headers={"X-Forwarded-For": "203.0.113.9"})


def test_hsts_and_security_headers_over_https(review_app, review_settings, session_factory) -> None:  # type: ignore[no-untyped-def]
    client = review_app.test_client()
    over_https = client.get("/review/login", base_url="https://review.example.com")
    assert over_https.headers["Strict-Transport-Security"].startswith("max-age=31536000")
    for response in (over_https, client.get("/healthz", base_url="https://review.example.com")):
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "same-origin"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert "Strict-Transport-Security" not in client.get("/review/login", base_url="http://review.example.com").headers
    # Behind a TLS-terminating proxy that the settings trust.
    proxied = create_app(review_settings.with_overrides(trusted_proxies=1), session_factory=session_factory).test_client()
    forwarded = proxied.get("/review/login", headers={"X-Forwarded-Proto": "https"})
    assert "Strict-Transport-Security" in forwarded.headers and "Secure" in forwarded.headers["Set-Cookie"]


def test_an_operator_ends_every_session_of_a_user_from_the_command_line(review_app, database_url, monkeypatch, case_id) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from cli import main

    client = review_app.test_client()
    login(client)
    assert client.get("/review").status_code == 200
    monkeypatch.delenv("REVIEW_USERS", raising=False)
    result = CliRunner().invoke(main, ["users", "logout", APPROVER], env={"DATABASE_URL": database_url})
    assert result.exit_code == 0 and f"1 session(s) of {APPROVER} ended" in result.output
    assert client.get("/review").status_code == 302


def test_parallel_guesses_cannot_slip_past_the_limit(review_app, case_id) -> None:  # type: ignore[no-untyped-def]
    """Each attempt is counted, under a row lock, before its password is checked: ten
    wrong passwords sent at once get five 401s and five 429s, on SQLite and PostgreSQL."""
    from concurrent.futures import ThreadPoolExecutor

    clients = [review_app.test_client() for _ in range(10)]
    tokens = [csrf_in(c.get("/review/login").get_data(as_text=True)) for c in clients]

    def guess(i: int) -> int:
        data = {"username": APPROVER, "password": f"guess-{i}", "csrf_token": tokens[i]}
        return clients[i].post("/review/login", data=data).status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = sorted(pool.map(guess, range(10)))
    assert statuses == [401] * 5 + [429] * 5
