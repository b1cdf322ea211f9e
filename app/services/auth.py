"""Who may use the finance review page: users, password checks and roles.

Users come from settings (``REVIEW_USERS``: name, role, werkzeug password hash); nothing
is stored in the database. No Flask here: the blueprint keeps the session and the cookie.

Guarantees:

* :meth:`UserDirectory.authenticate` answers ``None`` for a wrong password and for an
  unknown user alike, and spends the same work on both: an unknown name is checked
  against a dummy hash made with the same method as the configured users' hashes, so the
  response time does not tell which names exist.
* Only the roles ``viewer`` (reads) and ``approver`` (reads and decides) exist; an
  unknown role in the configuration is refused when the directory is built, and so is a
  weak or malformed password hash (:func:`config.password_hash_problem`).
* A user is what Flask-Login calls a user (``get_id``, ``is_authenticated``...) without
  importing it. The id kept in a session is ``name/tag``, the tag being derived from the
  user's password hash: after a password change (a new hash in ``REVIEW_USERS``) every
  session opened with the old password no longer finds its user.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass
from typing import Iterable

from werkzeug.security import check_password_hash, generate_password_hash

from config import password_hash_problem

VIEWER = "viewer"
APPROVER = "approver"
ROLES = (VIEWER, APPROVER)
# Longer input is refused before hashing: nobody types this much, and hashing it is work.
MAX_PASSWORD_LENGTH = 1024
MAX_USERNAME_LENGTH = 255


@dataclass(frozen=True)
class ReviewUser:
    username: str
    role: str
    credential_tag: str = ""

    @property
    def can_decide(self) -> bool:
        """Approve, refund, dismiss and reopen: approvers only."""
        return self.role == APPROVER

    # Flask-Login's user protocol.
    is_authenticated = True
    is_active = True
    is_anonymous = False

    def get_id(self) -> str:
        return f"{self.username}/{self.credential_tag}"


class UserDirectory:
    """The configured review users, looked up by exact username."""

    def __init__(self, users: Iterable[tuple[str, str, str]]) -> None:
        self._users: dict[str, tuple[ReviewUser, str]] = {}
        for username, role, password_hash in users:
            if role not in ROLES:
                raise ValueError(f"unknown review role {role!r} for {username!r}")
            problem = password_hash_problem(password_hash)
            if problem:
                raise ValueError(f"the password hash for review user {username!r} {problem}")
            tag = hashlib.sha256(password_hash.encode()).hexdigest()[:16]
            self._users[username] = (ReviewUser(username, role, tag), password_hash)
        self._dummy_hash: str | None = None
        self._dummy_lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._users)

    def get(self, username: object) -> ReviewUser | None:
        """The user as configured now (a role change or removal applies at once)."""
        if not isinstance(username, str):
            return None
        entry = self._users.get(username)
        return entry[0] if entry else None

    def from_session_id(self, user_id: object) -> ReviewUser | None:
        """The user a session's ``name/tag`` id stands for, if the tag is still current."""
        if not isinstance(user_id, str) or "/" not in user_id:
            return None
        username, tag = user_id.split("/", 1)
        user = self.get(username)
        return user if user is not None and tag and secrets.compare_digest(tag, user.credential_tag) else None

    def authenticate(self, username: object, password: object) -> ReviewUser | None:
        """The user when ``password`` is theirs; ``None`` otherwise, with no hint why."""
        name = username.strip() if isinstance(username, str) else ""
        secret = password if isinstance(password, str) else ""
        if len(name) > MAX_USERNAME_LENGTH or len(secret) > MAX_PASSWORD_LENGTH:
            name, secret = "", ""
        entry = self._users.get(name) if name else None
        if entry is None:
            # Same work as a real check, so timing does not reveal unknown names.
            check_password_hash(self._dummy(), secret)
            return None
        user, password_hash = entry
        if not secret:
            check_password_hash(password_hash, "\x00not-a-password")
            return None
        return user if check_password_hash(password_hash, secret) else None

    def _dummy(self) -> str:
        with self._dummy_lock:
            if self._dummy_hash is None:
                self._dummy_hash = generate_password_hash(secrets.token_urlsafe(16), method=self._method())
            return self._dummy_hash

    def _method(self) -> str:
        # A werkzeug hash is "method$salt$digest"; the method carries the cost parameters
        # ("scrypt:32768:8:1", "pbkdf2:sha256:600000"). Use the configured users' method.
        for _, password_hash in self._users.values():
            method = password_hash.split("$", 1)[0]
            if method.startswith(("scrypt", "pbkdf2")):
                return method
        return "scrypt"
