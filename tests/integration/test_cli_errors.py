"""A database the command line cannot use is one line on stderr and a non-zero exit, never a
traceback: a wrong URL, a missing database, an unmigrated schema, a SQLite directory that
does not exist (and is not created). Configuration errors: one line, exit status 2, no
usage text. Real ``reconciler`` processes."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]

COMMANDS = {
    "reconcile": ["reconcile", "--mode", "review"],
    "review list": ["review", "list"],
    "report": ["report", "--since", "2026-01-01"],
    "runs": ["runs"],
    "serve": ["serve", "--no-migrate", "--port", "1"],  # port 1: it must never get that far
    "applier": ["applier"],
}


def cli(args: list[str], database_url: str | None, tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "DATABASE_URL", "LOG_", "REVIEW_", "SECRET_KEY"))}
    env.update({"PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING", **extra})
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *phrases: str, status: int = 1) -> str:
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cannot_connect(command: str, tmp_path: Path) -> None:
    result = cli(COMMANDS[command], "postgresql://postgres:hunter2@127.0.0.1:1/reconciler", tmp_path)
    line = assert_one_line(result, "cannot connect to the database", "127.0.0.1:1")
    assert "hunter2" not in line  # the password is never shown


@pytest.mark.parametrize("command", list(COMMANDS))
def test_missing_sqlite_database(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here.db"
    result = cli(COMMANDS[command], f"sqlite:///{missing}", tmp_path)
    assert_one_line(result, f"there is no database at {missing}", "reconciler db upgrade")
    assert not missing.exists()  # looking did not create an empty one


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unmigrated_database(command: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    result = cli(COMMANDS[command], f"sqlite:///{empty}", tmp_path)
    assert_one_line(result, "no schema yet", "run `reconciler db upgrade`")


@pytest.mark.parametrize("command", [*COMMANDS, "db upgrade", "db current", "serve (migrating)"])
def test_sqlite_directory_that_does_not_exist_is_not_created(command: str, tmp_path: Path) -> None:
    args = {"db upgrade": ["db", "upgrade"], "db current": ["db", "current"], "serve (migrating)": ["serve", "--port", "1"]}.get(
        command, COMMANDS.get(command)
    )
    where = tmp_path / "no" / "such" / "dir"
    result = cli(args, f"sqlite:///{where}/x.db", tmp_path)  # type: ignore[arg-type]
    assert_one_line(result, f"the directory {where} does not exist")
    assert not (tmp_path / "no").exists()


def test_absolute_path_outside_any_directory(tmp_path: Path) -> None:
    result = cli(COMMANDS["reconcile"], "sqlite:////nonexistent/dir/x.db", tmp_path)
    assert_one_line(result, "the directory /nonexistent/dir does not exist")
    assert not Path("/nonexistent").exists()


def test_schema_behind_the_code_says_to_upgrade(tmp_path: Path) -> None:
    from models.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0011")
    result = cli(COMMANDS["review list"], url, tmp_path)
    assert_one_line(result, "schema is at revision 0011", "run `reconciler db upgrade`")
    assert cli(["db", "upgrade"], url, tmp_path).returncode == 0
    assert cli(COMMANDS["review list"], url, tmp_path).returncode == 0


def test_configuration_error_is_one_line_without_usage(tmp_path: Path) -> None:
    result = cli(COMMANDS["reconcile"], None, tmp_path, STRIPE_WEBHOOK_TOLERANCE="soon")
    line = assert_one_line(result, "configuration error", "STRIPE_WEBHOOK_TOLERANCE", status=2)
    assert "Usage:" not in result.stderr + result.stdout and line.startswith("Error: ")


def test_review_users_without_a_secret_key_is_a_configuration_error(tmp_path: Path) -> None:
    from werkzeug.security import generate_password_hash

    users = f"dana:approver:{generate_password_hash('a long enough password')}"
    result = cli(["serve", "--port", "1"], f"sqlite:///{tmp_path / 'x.db'}", tmp_path, REVIEW_USERS=users)
    assert_one_line(result, "SECRET_KEY must be set", status=2)


@pytest.mark.postgres
@pytest.mark.parametrize("command", list(COMMANDS))
def test_missing_postgres_database(command: str, tmp_path: Path) -> None:
    server = os.environ["TEST_DATABASE_URL"]
    name = f"reconciler_missing_{uuid.uuid4().hex[:8]}"
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    result = cli(COMMANDS[command], url, tmp_path)
    assert_one_line(result, f'the database "{name}" does not exist', "reconciler db upgrade")


def test_default_database_folder_is_still_made(tmp_path: Path) -> None:
    """The one directory the command line makes: instance/ for the default URL."""
    result = cli(["db", "upgrade"], "", tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "instance" / "reconciler.db").exists()


def test_demo_database_in_a_directory_that_does_not_exist(tmp_path: Path) -> None:
    where = tmp_path / "missing"
    result = cli(["demo", "--stripe", "simulated", "--database", str(where / "demo.db")], None, tmp_path)
    assert_one_line(result, f"the directory {where} does not exist")
    assert not where.exists()
