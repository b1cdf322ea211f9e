"""Settings are read once from the environment; bad values fail at start, naming the variable."""

from __future__ import annotations

import dataclasses

import pytest

from config import Settings, SettingsError


def test_defaults_use_sqlite_under_instance() -> None:
    settings = Settings.from_env({})
    assert settings.database_url.startswith("sqlite:///")
    assert settings.database_url.endswith("instance/reconciler.db")
    assert settings.stripe_webhook_tolerance == 300
    assert settings.webhook_max_bytes == 1024 * 1024
    assert settings.stripe_livemode is False
    assert settings.stripe_webhook_secrets == ()
    assert (settings.applier_nice, settings.access_log) == (10, False)
    assert (settings.applier_batch_size, settings.applier_linger_ms) == (500, 250)
    assert (settings.applier_idle_cpu, settings.applier_lag_guard_seconds) == (True, 10)


def test_reads_every_variable() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgres://u:p@127.0.0.1:5432/db",
            "STRIPE_API_KEY": "sk_test_abc123",
            "STRIPE_API_BASE": "http://127.0.0.1:12111/",
            "STRIPE_WEBHOOK_SECRET": "whsec_one, whsec_two",
            "STRIPE_WEBHOOK_TOLERANCE": "120",
            "STRIPE_LIVEMODE": "false",
            "WEBHOOK_MAX_BYTES": "2048",
            "SECRET_KEY": "s3cret",
            "API_TOKEN": "0123456789abcdef",
            "APPLIER_NICE": "0",
            "APPLIER_IDLE_CPU": "false",
            "APPLIER_LAG_GUARD_SECONDS": "30",
            "WEB_ACCESS_LOG": "true",
        }
    )
    assert (settings.applier_nice, settings.access_log) == (0, True)
    assert (settings.applier_idle_cpu, settings.applier_lag_guard_seconds) == (False, 30)
    assert settings.database_url == "postgresql+psycopg://u:p@127.0.0.1:5432/db"
    assert settings.stripe_api_base == "http://127.0.0.1:12111"
    assert settings.stripe_webhook_secrets == ("whsec_one", "whsec_two")
    assert settings.stripe_webhook_tolerance == 120
    assert settings.webhook_max_bytes == 2048


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.api_token = "x"  # type: ignore[misc]


def test_secrets_are_not_in_repr() -> None:
    settings = Settings.from_env({"API_TOKEN": "a-very-secret-token", "SECRET_KEY": "k"})
    assert "a-very-secret-token" not in repr(settings)


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"STRIPE_WEBHOOK_TOLERANCE": "five"}, "STRIPE_WEBHOOK_TOLERANCE"),
        ({"STRIPE_WEBHOOK_TOLERANCE": "0"}, "STRIPE_WEBHOOK_TOLERANCE"),
        ({"WEBHOOK_MAX_BYTES": "1MB"}, "WEBHOOK_MAX_BYTES"),
        ({"STRIPE_LIVEMODE": "maybe"}, "STRIPE_LIVEMODE"),
        ({"STRIPE_WEBHOOK_SECRET": "not-a-secret"}, "STRIPE_WEBHOOK_SECRET"),
        ({"STRIPE_API_KEY": "pk_test_publishable"}, "STRIPE_API_KEY"),
        ({"STRIPE_API_KEY": "sk_live_abc"}, "STRIPE_API_KEY"),  # live key, test mode
        ({"STRIPE_API_BASE": "ftp://x"}, "STRIPE_API_BASE"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"API_TOKEN": "short"}, "API_TOKEN"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"APPLIER_NICE": "20"}, "APPLIER_NICE"),
        ({"APPLIER_LINGER_MS": "5001"}, "APPLIER_LINGER_MS"),
        ({"APPLIER_NICE": "-5"}, "APPLIER_NICE"),
        ({"APPLIER_IDLE_CPU": "sometimes"}, "APPLIER_IDLE_CPU"),
        ({"APPLIER_LAG_GUARD_SECONDS": "0"}, "APPLIER_LAG_GUARD_SECONDS"),
        ({"WEB_ACCESS_LOG": "loud"}, "WEB_ACCESS_LOG"),
        ({"STRIPE_LIVEMODE": "true"}, "STRIPE_API_KEY"),  # live needs its secrets
        (
            {"STRIPE_LIVEMODE": "true", "STRIPE_API_KEY": "sk_live_abc", "SECRET_KEY": "k", "API_TOKEN": "0123456789abcdef"},
            "STRIPE_WEBHOOK_SECRET",
        ),
    ],
)
def test_bad_values_fail_naming_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(environ)
