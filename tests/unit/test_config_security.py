"""Issue 12 at start: the service refuses REVIEW_USERS without a strong SECRET_KEY or with
a weak or malformed password hash, and the repr of Settings shows no secret."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from werkzeug.security import generate_password_hash

from config import Settings, SettingsError

STRONG_KEY = "k" * 32
GOOD_HASH = generate_password_hash("a password")  # werkzeug's default: scrypt:32768:8:1


def users(password_hash: str = GOOD_HASH) -> str:
    return f"alice:approver:{password_hash}"


@pytest.mark.parametrize("secret_key", [None, "", "a", "k" * 31, "é" * 15])
def test_review_users_need_a_secret_key_of_32_bytes(secret_key: str | None) -> None:
    environ = {"REVIEW_USERS": users()}
    if secret_key is not None:
        environ["SECRET_KEY"] = secret_key
    with pytest.raises(SettingsError, match=r"SECRET_KEY must be set to at least 32 bytes when REVIEW_USERS is set"):
        Settings.from_env(environ)


def test_a_strong_key_and_hash_are_accepted_and_no_users_need_no_key() -> None:
    assert Settings.from_env({"REVIEW_USERS": users(), "SECRET_KEY": STRONG_KEY}).review_users[0][0] == "alice"
    assert Settings.from_env({"SECRET_KEY": "short"}).secret_key == "short"  # nobody logs in
    assert Settings.from_env({"REVIEW_USERS": users(generate_password_hash("x", method="pbkdf2:sha256")), "SECRET_KEY": STRONG_KEY})


def test_settings_built_directly_are_checked_too(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = Settings(database_url=f"sqlite:///{tmp_path}/x.db", secret_key="short")
    with pytest.raises(SettingsError, match="SECRET_KEY"):
        base.with_overrides(review_users=(("alice", "approver", GOOD_HASH),))


@pytest.mark.parametrize(
    ("password_hash", "why"),
    [
        (generate_password_hash("x", method="pbkdf2:sha256:1"), "too weak"),
        (generate_password_hash("x", method="pbkdf2:sha256:1000"), "too weak"),
        (generate_password_hash("x", method="pbkdf2:sha512:1000"), "too weak"),
        (generate_password_hash("x", method="scrypt:1024:8:1"), "too weak"),
        (generate_password_hash("x", method="scrypt:32768:1:1"), "too weak"),
        ("scrypt:32768:8:1$salt$nothex", "malformed"),
        ("pbkdf2:sha256:600000$abcdefgh$abc", "malformed"),
        ("pbkdf2:sha1:600000$abcdefgh$" + "0" * 40, "malformed"),
        ("$2b$12$abcdefghijklmnopqrstuvabcdefghijklmnopqrstuvwxyz01234", "not a werkzeug"),
        ("plaintext-password", "not a werkzeug"),
    ],
)
def test_weak_or_malformed_review_user_hashes_are_refused_at_start(password_hash: str, why: str) -> None:
    with pytest.raises(SettingsError, match=rf"REVIEW_USERS: the password hash for 'alice' is {why}"):
        Settings.from_env({"REVIEW_USERS": users(password_hash), "SECRET_KEY": STRONG_KEY})


def test_the_service_refuses_to_start_naming_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import cli.serve as cli  # the module whose serve command calls _ensure_schema
    from cli import main

    def would_start(*args: object, **kwargs: object) -> None:
        raise AssertionError("the service went on to start")

    monkeypatch.setattr(cli, "_ensure_schema", would_start)  # never serve from a test
    for key in ("SECRET_KEY", "REVIEW_USERS", "STRIPE_LIVEMODE", "API_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    base = {"DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    short = CliRunner().invoke(main, ["serve"], env={**base, "REVIEW_USERS": users(), "SECRET_KEY": "short"})
    assert short.exit_code == 2 and "SECRET_KEY must be set to at least 32 bytes" in short.output
    weak = CliRunner().invoke(
        main, ["serve"], env={**base, "REVIEW_USERS": users(generate_password_hash("x", method="pbkdf2:sha256:1")), "SECRET_KEY": STRONG_KEY}
    )
    assert weak.exit_code == 2 and "REVIEW_USERS: the password hash for 'alice' is too weak" in weak.output


def test_repr_shows_no_secret() -> None:
    secrets = {
        "STRIPE_API_KEY": "sk_test_reprsecret123",
        "STRIPE_WEBHOOK_SECRET": "whsec_reprsecretone,whsec_reprsecrettwo",
        "SMTP_PASSWORD": "smtp-repr-secret",
        "SECRET_KEY": "secret-key-repr-0123456789abcdef0123",
        "API_TOKEN": "api-token-repr-0123456789",
        "ALERT_SLACK_WEBHOOK_URL": "https://hooks.example/services/reprsecret",
        "DATABASE_URL": "postgresql://reconciler:db-repr-secret@127.0.0.1/db",
        "REVIEW_USERS": users(),
    }
    settings = Settings.from_env({**secrets, "SMTP_HOST": "mail.example", "ALERT_EMAIL_FROM": "a@example.com", "ALERT_EMAIL_TO": "b@example.com"})
    text = repr(settings) + str(settings)
    for value in [*secrets.values(), "reprsecretone", "reprsecrettwo", "db-repr-secret", GOOD_HASH.split("$")[2]]:
        assert value not in text
    assert "stripe_api_key='<set>'" in text and "smtp_host='mail.example'" in text
    assert "postgresql+psycopg://reconciler:***@127.0.0.1/db" in text


def test_the_dev_http_setting_is_refused_in_live_mode() -> None:
    with pytest.raises(SettingsError, match="DEV_ALLOW_HTTP_LOOPBACK"):
        Settings(database_url="sqlite://", stripe_livemode=True, dev_allow_http_loopback=True)
    assert Settings.from_env({"DEV_ALLOW_HTTP_LOOPBACK": "true", "TRUSTED_PROXIES": "1"}).dev_allow_http_loopback


@pytest.mark.parametrize(
    "variable", ["SESSION_IDLE_MINUTES", "SESSION_MAX_HOURS", "LOGIN_MAX_FAILURES", "LOGIN_ADDRESS_MAX_FAILURES", "LOGIN_LOCK_SECONDS", "LOGIN_ALERT_THRESHOLD", "TRUSTED_PROXIES", "DEV_ALLOW_HTTP_LOOPBACK"]
)
def test_new_settings_fail_naming_the_variable(variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: "-1" if variable != "DEV_ALLOW_HTTP_LOOPBACK" else "maybe"})
