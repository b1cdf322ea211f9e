"""API clients and what they may do: scoped bearer tokens (``API_TOKENS``) and the legacy
full-scope ``API_TOKEN``.

A token is looked up by the SHA-256 of what the client sent, compared with every
configured hash in constant time (no early exit, so the time does not tell which entry
came close). Scopes: ``pay`` (the pay endpoint and orders), ``finance`` (duplicate cases:
read, refund, dismiss; passes), ``read`` (GET only), ``metrics`` (``/metrics``). The
legacy ``API_TOKEN`` has every scope (``full``) for one more release.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

FULL = "full"
#: The actor of the legacy token in the audit log, as before scoped tokens ("api").
LEGACY_NAME = "api"


@dataclass(frozen=True, slots=True)
class ApiClient:
    """Who called: the token's name (the actor in the audit log) and its scope."""

    name: str
    scope: str
    legacy: bool = False

    def may(self, scopes: frozenset[str]) -> bool:
        return self.scope == FULL or self.scope in scopes


def hash_token(token: str) -> str:
    """The ``sha256:<hex>`` form API_TOKENS stores."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A new random token (256 bits), safe to store only as its SHA-256."""
    return "rt_" + secrets.token_urlsafe(32)


class TokenDirectory:
    """The configured tokens."""

    def __init__(self, tokens: tuple[tuple[str, str, str], ...], legacy_token: str | None) -> None:
        self._tokens = tuple((name, scope, digest.encode()) for name, scope, digest in tokens)
        self._legacy = legacy_token.encode() if legacy_token else None

    @property
    def configured(self) -> bool:
        return bool(self._tokens) or self._legacy is not None

    def can_grant(self, scope: str) -> bool:
        """Whether any configured token has ``scope`` (or is the full legacy token)."""
        return self._legacy is not None or any(s == scope for _, s, _ in self._tokens)

    def authenticate(self, presented: str) -> ApiClient | None:
        if not presented or len(presented) > 512:
            return None
        digest = hash_token(presented).encode()
        found: ApiClient | None = None
        for name, scope, expected in self._tokens:
            if hmac.compare_digest(digest, expected) and found is None:
                found = ApiClient(name, scope)
        if self._legacy is not None and hmac.compare_digest(presented.encode(), self._legacy) and found is None:
            found = ApiClient(LEGACY_NAME, FULL, legacy=True)
        return found
