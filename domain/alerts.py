"""Alerts: the log always, a Slack incoming webhook and e-mail over SMTP when configured.

Each alert has a key (``run:<id>``, ``refund-failed:<attempt key>``,
``poison-event:<event id>``, ``signature-failures:<window>``). The key is claimed in ``alerts_sent`` before anything is
sent, so an alert goes out once however many passes see the same problem, and two passes
never both send it. A channel that fails is logged and recorded; it never fails the pass.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Callable

import requests
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from models import AlertSent, run_in_transaction
from models.db import insert_ignore

log = logging.getLogger(__name__)

CHANNEL_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Alert:
    key: str
    subject: str
    body: str


class Alerter:
    """Sends each alert once to every configured channel."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        http_post: Callable[..., Any] = requests.post,
        smtp_factory: Callable[..., smtplib.SMTP] = smtplib.SMTP,
        smtp_ssl_factory: Callable[..., smtplib.SMTP] = smtplib.SMTP_SSL,
    ) -> None:
        self._smtp_ssl_factory = smtp_ssl_factory
        self._settings = settings
        self._session_factory = session_factory
        self._http_post = http_post
        self._smtp_factory = smtp_factory

    def send(self, alert: Alert) -> bool:
        """Send ``alert`` unless its key was sent before. True when it went out now."""
        claimed = run_in_transaction(
            self._session_factory,
            lambda session: insert_ignore(
                session, AlertSent, {"key": alert.key, "subject": alert.subject[:1000], "channels": {}}
            ),
        )
        if not claimed:
            return False
        results = {"log": "ok"}
        log.warning("ALERT %s: %s\n%s", alert.key, alert.subject, alert.body)
        if self._settings.alert_slack_webhook_url:
            results["slack"] = self._try("slack", lambda: self._slack(alert))
        if self._settings.smtp_host:
            results["email"] = self._try("email", lambda: self._email(alert))

        def record(session: Session) -> None:
            row = session.get(AlertSent, alert.key, with_for_update=True)
            if row is not None:
                row.channels = results

        run_in_transaction(self._session_factory, record)
        return True

    @staticmethod
    def _try(channel: str, send: Callable[[], None]) -> str:
        try:
            send()
            return "ok"
        except Exception as exc:  # a broken channel must never fail the pass
            log.error("alert channel %s failed: %s", channel, exc)
            return f"error: {type(exc).__name__}: {exc}"[:500]

    def _slack(self, alert: Alert) -> None:
        response = self._http_post(
            self._settings.alert_slack_webhook_url,
            json={"text": f"*{alert.subject}*\n{alert.body}"},
            timeout=CHANNEL_TIMEOUT,
        )
        if response.status_code >= 300:
            raise RuntimeError(f"Slack answered {response.status_code}: {response.text[:200]}")

    def _email(self, alert: Alert) -> None:
        settings = self._settings
        message = EmailMessage()
        message["Subject"] = f"[reconciler] {alert.subject}"
        message["From"] = settings.alert_email_from
        message["To"] = ", ".join(settings.alert_email_to)
        message.set_content(alert.body)
        with self._connect() as smtp:
            if settings.smtp_user:
                # Belt and braces: SMTP_TLS=none with a user is refused at start.
                if not isinstance(smtp.sock, ssl.SSLSocket):
                    raise SmtpSecurityError("refusing to send the SMTP password over a connection without TLS")
                smtp.login(settings.smtp_user, settings.smtp_password or "")
            smtp.send_message(message)

    def _connect(self) -> smtplib.SMTP:
        """A connection in the mode SMTP_TLS asks for, the certificate verified against the
        system's CAs (plus SMTP_CA_FILE) and the host name: ``implicit`` (TLS from the first
        byte, usually port 465), ``starttls`` (required: a server that does not offer it
        gets nothing, not even the message) or ``none`` (plain, only without a password)."""
        settings = self._settings
        host, port = settings.smtp_host, settings.smtp_port
        if settings.smtp_tls == "implicit":
            return self._smtp_ssl_factory(host, port, timeout=CHANNEL_TIMEOUT, context=self._tls_context())
        smtp = self._smtp_factory(host, port, timeout=CHANNEL_TIMEOUT)
        try:
            smtp.ehlo()
            if settings.smtp_tls == "starttls":
                if not smtp.has_extn("starttls"):
                    raise SmtpSecurityError(
                        f"{host}:{port} does not offer STARTTLS; nothing was sent (SMTP_TLS=starttls)"
                    )
                smtp.starttls(context=self._tls_context())
                smtp.ehlo()
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _tls_context(self) -> ssl.SSLContext:
        # Verifies the chain and the host name (check_hostname), TLS 1.2 at least.
        context = ssl.create_default_context(cafile=self._settings.smtp_ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


class SmtpSecurityError(RuntimeError):
    """The SMTP server cannot be reached the way SMTP_TLS asks; nothing was sent."""
