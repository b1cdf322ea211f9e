"""The command line's shared context: nothing read or opened before a command asks, each
thing made once, the engine disposed of when the command line ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine

import cli.context
from cli import main
from cli.context import CliContext
from config import Settings
from models.migrate import head_revision, upgrade


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """Reading the settings configures logging; the next tests get the root logger back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_help_and_commands_without_a_database_need_no_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRIPE_WEBHOOK_TOLERANCE", "soon")
    helped = CliRunner().invoke(main, ["review", "list", "--help"])
    assert helped.exit_code == 0 and "Cases, open and failed first." in helped.output
    token = CliRunner().invoke(main, ["api-tokens", "create", "checkout", "pay"])
    assert token.exit_code == 0 and "API_TOKENS entry: checkout:pay:" in token.output
    refused = CliRunner().invoke(main, ["runs"])
    assert refused.exit_code == 2 and "STRIPE_WEBHOOK_TOLERANCE" in refused.output


def test_each_thing_is_made_once_and_the_engine_disposed_of_at_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'context.db'}"
    upgrade(url)
    monkeypatch.setenv("DATABASE_URL", url)
    opened: list[Engine] = []
    disposed: list[Engine] = []

    def open_engine(settings: Settings, **kwargs: str) -> Engine:
        engine = real_open_engine(settings, **kwargs)  # type: ignore[arg-type]

        def dispose(close: bool = True) -> None:
            disposed.append(engine)
            Engine.dispose(engine, close)

        engine.dispose = dispose  # type: ignore[method-assign]
        opened.append(engine)
        return engine

    real_open_engine = cli.context.open_engine
    monkeypatch.setattr(cli.context, "open_engine", open_engine)
    with CliContext() as context:
        assert context.settings is context.settings
        assert context.session_factory is context.session_factory and context.gateway is context.gateway
        assert context.refund_service is context.refund_service
        assert context.open_database() is context.engine is opened[0]
        with pytest.raises(RuntimeError, match="opened with schema='head'"):
            context.open_database(schema="any")
        assert disposed == []
    assert opened == disposed and len(opened) == 1

    context = CliContext()
    result = CliRunner().invoke(main, ["db", "current"], obj=context)
    assert result.exit_code == 0 and f"current: {head_revision()}" in result.output
    assert opened == disposed and len(opened) == 2  # the group's context closed it
