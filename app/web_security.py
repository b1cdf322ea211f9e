"""Web security wiring, installed by the app factory: who is logged in, where sessions
live, which headers every response carries, and which proxies are believed.

* **Sessions** are server-side (:class:`DatabaseSessionInterface` over
  :class:`app.services.web_sessions.SessionStore`): the cookie is a random id and nothing
  else, the data is a row in the service's database, deleted at logout, ended by idle and
  absolute timeouts, replaced by a new id at login. A cookie that names no live row (an
  old one after logout, one signed with ``SECRET_KEY`` in Flask's format, anything else)
  opens an empty session.
* **Users** are kept by Flask-Login (``login_user``, ``logout_user``, ``current_user``);
  its user loader answers only for the user id stored in the server-side session, never
  for a "remember me" cookie (which would be signed with ``SECRET_KEY`` alone).
* **Cookies** are HttpOnly, SameSite=Lax and Secure. The only exception is a development
  setting, ``DEV_ALLOW_HTTP_LOOPBACK``: then a plain-http request whose *peer address* is a
  loopback address gets a cookie without Secure (``reconciler serve`` on
  http://127.0.0.1). The request's Host header never decides it.
* **Headers**: Flask-Talisman sets the Content-Security-Policy, X-Frame-Options,
  Referrer-Policy, X-Content-Type-Options and Permissions-Policy on every response, and
  Strict-Transport-Security on responses served over https. It does not redirect http to
  https (the TLS-terminating proxy does; health checks and loopback development use http).
* **Proxies**: with ``TRUSTED_PROXIES=n`` werkzeug's ProxyFix takes the client address
  and scheme from the last ``n`` X-Forwarded-For/-Proto entries; without it those headers
  are ignored (the peer address is the client, the connection's scheme is the scheme).
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Any, Callable

from flask import Flask, Response, has_request_context, request, session
from flask.sessions import SessionInterface, SessionMixin
from flask_login import LoginManager
from flask_talisman import Talisman
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.datastructures import CallbackDict
from werkzeug.middleware.proxy_fix import ProxyFix

from domain.alerts import Alerter
from app.services.auth import UserDirectory
from app.services.login_guard import LoginGuard
from app.services.web_sessions import SessionStore
from config import Settings

CONTENT_SECURITY_POLICY = {
    "default-src": "'self'",
    "style-src": "'self' 'unsafe-inline'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
}
HSTS_MAX_AGE = 365 * 24 * 3600


class ServerSession(CallbackDict, SessionMixin):  # type: ignore[type-arg]
    """A session whose data lives in ``web_sessions``; ``sid`` is None until stored."""

    def __init__(self, initial: dict[str, Any] | None = None, sid: str | None = None) -> None:
        def on_update(self: ServerSession) -> None:
            self.modified = True

        super().__init__(initial, on_update)
        self.sid = sid
        self.new = sid is None
        self.modified = False
        self.rotated = False

    def rotate(self) -> None:
        """Drop this session's id (its row is deleted when the response goes out) and store
        what remains under a new one: done at login and logout."""
        self.rotated = True
        self.modified = True


def session_owner(data: dict[str, Any]) -> str | None:
    """The username of a session's logged-in user (Flask-Login's ``_user_id``: name/tag)."""
    user_id = data.get("_user_id")
    return user_id.split("/", 1)[0] if isinstance(user_id, str) and user_id else None


class DatabaseSessionInterface(SessionInterface):
    def __init__(self, store: SessionStore, *, dev_allow_http_loopback: bool, owner: Callable[[dict[str, Any]], str | None] = session_owner) -> None:
        self.store = store
        self._dev_http = dev_allow_http_loopback
        self._owner = owner

    def get_cookie_secure(self, app: Flask) -> bool:  # type: ignore[override]
        if self._dev_http and has_request_context() and not request.is_secure and is_loopback(request.remote_addr):
            return False
        return True

    def open_session(self, app: Flask, request: Any) -> ServerSession:  # type: ignore[override]
        sid = request.cookies.get(self.get_cookie_name(app))
        stored = self.store.load(sid)
        if stored is None:
            return ServerSession()
        return ServerSession(stored.data, sid)

    def save_session(self, app: Flask, session: ServerSession, response: Response) -> None:  # type: ignore[override]
        name, domain, path = self.get_cookie_name(app), self.get_cookie_domain(app), self.get_cookie_path(app)
        old_sid = session.sid
        if session.rotated and old_sid is not None:
            self.store.delete(old_sid)
            session.sid = None
        data = dict(session)
        if not data:
            if old_sid is not None and session.modified:
                if session.sid is not None:
                    self.store.delete(session.sid)
                response.delete_cookie(name, domain=domain, path=path, secure=self.get_cookie_secure(app), httponly=True, samesite=self.get_cookie_samesite(app))
            return
        if session.sid is not None and session.modified and self.store.save(session.sid, data, self._owner(data)):
            return
        if session.sid is not None and not session.modified:
            return
        # New, rotated, or its row vanished meanwhile (logged out elsewhere): a new id.
        if session.sid is not None and session.modified:
            # The row is gone: never bring back a session ended elsewhere (a logged-in
            # user stays logged out); anything else (a CSRF token) starts afresh.
            data.pop("_user_id", None)
            data.pop("_fresh", None)
        session.sid = self.store.create(data, self._owner(data))
        response.set_cookie(
            name,
            session.sid,
            domain=domain,
            path=path,
            secure=self.get_cookie_secure(app),
            httponly=True,
            samesite=self.get_cookie_samesite(app),
        )
        response.vary.add("Cookie")


class ServerSessionLoginManager(LoginManager):
    """Flask-Login, minus its "remember me" cookie: that cookie is signed with
    ``SECRET_KEY`` alone, so honouring it would let whoever holds the key log in as anyone
    without a server-side session. Users are only ever loaded from the server session."""

    def _load_user_from_remember_cookie(self, cookie: str) -> None:
        return None


def is_loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address((address or "").strip()).is_loopback
    except ValueError:
        return False


def init_web_security(app: Flask, settings: Settings, session_factory: sessionmaker[Session], secret_key: str) -> None:
    """Install sessions, logins, the login guard, headers and proxy trust on ``app``."""
    if settings.trusted_proxies:
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)  # type: ignore[method-assign]
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax")
    store = SessionStore(
        session_factory,
        secret_key,
        idle=timedelta(minutes=settings.session_idle_minutes),
        absolute=timedelta(hours=settings.session_max_hours),
    )
    app.session_interface = DatabaseSessionInterface(store, dev_allow_http_loopback=settings.dev_allow_http_loopback)
    directory = UserDirectory(settings.review_users)
    app.extensions["review_users"] = directory
    app.extensions["review_sessions"] = store
    app.extensions["login_guard"] = LoginGuard(
        session_factory,
        max_failures=settings.login_max_failures,
        address_max_failures=settings.login_address_max_failures,
        lock_seconds=settings.login_lock_seconds,
        alert_threshold=settings.login_alert_threshold,
        send_alert=Alerter(settings, session_factory).send,
    )

    login_manager = ServerSessionLoginManager()
    login_manager.session_protection = None  # the session is server-side and rotated at login
    login_manager.init_app(app)

    @login_manager.user_loader
    def _load_user(user_id: str):  # type: ignore[no-untyped-def]
        # Only the id kept in the server-side session (never a "remember me" cookie).
        if session.get("_user_id") != user_id:
            return None
        return directory.from_session_id(user_id)

    Talisman(
        app,
        force_https=False,
        session_cookie_secure=False,  # decided per request by DatabaseSessionInterface
        session_cookie_http_only=True,
        session_cookie_samesite="Lax",
        content_security_policy=CONTENT_SECURITY_POLICY,
        frame_options="DENY",
        referrer_policy="same-origin",
        strict_transport_security=True,
        strict_transport_security_max_age=HSTS_MAX_AGE,
        strict_transport_security_include_subdomains=False,
        x_xss_protection=False,
    )
