"""Alert e-mail never authenticates over clear text, and its TLS is verified: local SMTP
servers (aiosmtpd) without STARTTLS, with STARTTLS and a certificate nobody vouches for,
with one SMTP_CA_FILE vouches for, and with implicit TLS. Every server records each AUTH
it receives (its authenticator, which would accept any), with the password and whether the
connection was TLS, so "no password sent" is what the server saw, not what the client says."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from domain.alerts import Alert, Alerter
from config import Settings, SettingsError
from models import AlertSent

PASSWORD = "smtp-password-that-must-not-leak"


class Server:
    """What one local SMTP server saw."""

    def __init__(self) -> None:
        self.logins: list[tuple[str, bytes, bool]] = []  # (user, password, over TLS)
        self.messages: list[str] = []

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.messages.append(envelope.content.decode("utf-8", "replace"))
        return "250 OK"

    def authenticator(self, server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
        over_tls = server.transport.get_extra_info("ssl_object") is not None
        self.logins.append((auth_data.login.decode(), auth_data.password, over_tls))
        return AuthResult(success=True)


class _RecordingController(Controller):
    def __init__(self, server: Server, **kwargs: Any) -> None:
        self.server_record = server
        super().__init__(server, authenticator=server.authenticator, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """A self-signed certificate for 127.0.0.1 (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("smtp-tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def _server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def _run(server: Server, **kwargs: Any) -> Iterator[int]:
    port = _free_port()
    controller = _RecordingController(server, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def _send(settings: Settings, session_factory, port: int, **overrides: Any) -> dict:  # type: ignore[no-untyped-def]
    alerter = Alerter(
        settings.with_overrides(
            smtp_host="127.0.0.1",
            smtp_port=port,
            smtp_user="alerts@merchant.test",
            smtp_password=PASSWORD,
            alert_email_from="reconciler@merchant.test",
            alert_email_to=("finance@merchant.test",),
            **overrides,
        ),
        session_factory,
    )
    assert alerter.send(Alert(key="tls-test", subject="refund failed", body="case 7"))
    with session_factory() as session:
        return dict(session.get(AlertSent, "tls-test").channels)


def test_a_server_without_starttls_never_receives_the_password(settings, session_factory) -> None:  # type: ignore[no-untyped-def]
    server = Server()
    # The server would even accept AUTH in clear (auth_require_tls=False): the client must refuse.
    for port in _run(server, auth_require_tls=False):
        channels = _send(settings, session_factory, port)
    assert server.logins == []
    assert server.messages == []  # STARTTLS required: not even the alert goes out in clear
    assert channels["email"].startswith("error: SmtpSecurityError") and "STARTTLS" in channels["email"]


def test_starttls_with_a_certificate_nobody_vouches_for_is_refused(settings, session_factory, certificate) -> None:  # type: ignore[no-untyped-def]
    server = Server()
    for port in _run(server, tls_context=_server_context(certificate), auth_require_tls=False):
        channels = _send(settings, session_factory, port)
    assert server.logins == [] and server.messages == []
    assert "CERTIFICATE_VERIFY_FAILED" in channels["email"]


def test_starttls_verified_with_smtp_ca_file_logs_in_over_tls(settings, session_factory, certificate) -> None:  # type: ignore[no-untyped-def]
    server = Server()
    for port in _run(server, tls_context=_server_context(certificate), require_starttls=True):
        channels = _send(settings, session_factory, port, smtp_ca_file=str(certificate[0]))
    assert channels["email"] == "ok"
    assert server.logins == [("alerts@merchant.test", PASSWORD.encode(), True)]
    assert len(server.messages) == 1 and "case 7" in server.messages[0]


def test_implicit_tls_verified_logs_in_over_tls(settings, session_factory, certificate) -> None:  # type: ignore[no-untyped-def]
    server = Server()
    # aiosmtpd only counts STARTTLS as TLS for its auth_require_tls; the socket is TLS here.
    for port in _run(server, ssl_context=_server_context(certificate), auth_require_tls=False):
        channels = _send(settings, session_factory, port, smtp_tls="implicit", smtp_ca_file=str(certificate[0]))
    assert channels["email"] == "ok"
    assert server.logins == [("alerts@merchant.test", PASSWORD.encode(), True)]
    assert len(server.messages) == 1


def test_plain_smtp_with_a_password_is_refused_at_start() -> None:
    env = {
        "SMTP_HOST": "mail.merchant.test",
        "SMTP_USER": "alerts",
        "SMTP_PASSWORD": PASSWORD,
        "ALERT_EMAIL_FROM": "reconciler@merchant.test",
        "ALERT_EMAIL_TO": "finance@merchant.test",
        "SMTP_TLS": "none",
    }
    with pytest.raises(SettingsError, match="SMTP_TLS=none"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "SMTP_TLS": "implicit"}).smtp_tls == "implicit"
    assert Settings.from_env({k: v for k, v in env.items() if k != "SMTP_TLS"}).smtp_tls == "starttls"
