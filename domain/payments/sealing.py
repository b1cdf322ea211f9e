"""Secrets at rest: values the service must give back later but should not keep in clear
(a PaymentIntent's ``client_secret``), sealed with a key derived from ``SECRET_KEY``.

Fernet (``cryptography``: AES-128-CBC with an HMAC-SHA256, a timestamp and a version
byte) with a key derived by HKDF-SHA256 from ``SECRET_KEY`` and a label of its own, so the
key that seals these is not the one that signs cookies. A sealed value is
``fernet:v1:<token>``. When it cannot be opened (``SECRET_KEY`` changed, or was never set
and each process made up its own) :meth:`Sealer.open` returns None and the caller reads the
value again from Stripe, which always has it.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "fernet:v1:"
_LABEL = b"stripe-reconciler: client secrets at rest v1"


class Sealer:
    def __init__(self, secret_key: str | bytes) -> None:
        material = secret_key.encode() if isinstance(secret_key, str) else secret_key
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL).derive(material)
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, value: str | None) -> str | None:
        if value is None:
            return None
        return PREFIX + self._fernet.encrypt(value.encode()).decode("ascii")

    def open(self, sealed: str | None) -> str | None:
        """The value, or None when there is none or it cannot be opened with this key."""
        if not sealed or not sealed.startswith(PREFIX):
            return None
        try:
            return self._fernet.decrypt(sealed[len(PREFIX) :].encode("ascii")).decode()
        except (InvalidToken, ValueError, UnicodeError):
            return None
