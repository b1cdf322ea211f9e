"""Settings of the API's security: scoped API tokens and alert e-mail's TLS.

Kept apart from :mod:`config` so that module stays a plain list of settings; like it,
this module imports only the standard library. :func:`from_env` is called once by
:meth:`config.Settings.from_env` and returns the fields to set.

``API_TOKENS`` is a list of ``name:scope:hash`` entries (commas or newlines), like
``REVIEW_USERS``. The hash is ``sha256:<64 hex digits>`` of the token, which
``reconciler api-tokens create`` prints together with a new random token. A fast hash is
enough because the tokens are 256-bit random strings made by that command (nobody can
guess one from its hash), and it is computed on every API request, where a password hash
(deliberately slow) would cost each pay request hundreds of milliseconds and make the
API easy to overload.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Callable, TypedDict

if TYPE_CHECKING:  # config imports this module; the import is for the type checker only
    from config import Settings

#: What each scope opens (the table per endpoint is app/api_auth.py).
API_SCOPES = ("pay", "finance", "read", "metrics")
SMTP_TLS_MODES = ("starttls", "implicit", "none")

_TOKEN_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def _error(message: str) -> Exception:
    from config import SettingsError  # at call time: config has finished importing

    return SettingsError(message)


class SecurityFields(TypedDict):
    """The fields :func:`from_env` sets on :class:`config.Settings`."""

    api_tokens: tuple[tuple[str, str, str], ...]
    smtp_tls: str
    smtp_ca_file: str | None


def from_env(text: Callable[[str], str | None], settings: Settings) -> SecurityFields:
    """The security fields of :class:`config.Settings`, read with ``text`` (the stripped
    value of an environment variable, or None)."""
    tokens = parse_api_tokens(text("API_TOKENS"))
    smtp_tls = (text("SMTP_TLS") or "starttls").lower()
    if smtp_tls not in SMTP_TLS_MODES:
        raise _error(f"SMTP_TLS must be one of {', '.join(SMTP_TLS_MODES)}, not {smtp_tls!r}")
    if smtp_tls == "none" and (settings.smtp_user or settings.smtp_password):
        raise _error("SMTP_TLS=none cannot be used with SMTP_USER/SMTP_PASSWORD: the password would travel in clear")
    ca_file = text("SMTP_CA_FILE")
    if ca_file is not None and not os.path.isfile(ca_file):
        raise _error(f"SMTP_CA_FILE {ca_file!r} is not a readable file")
    return {"api_tokens": tokens, "smtp_tls": smtp_tls, "smtp_ca_file": ca_file}


def parse_api_tokens(raw: str | None) -> tuple[tuple[str, str, str], ...]:
    """``name:scope:sha256:<hex>`` entries separated by commas or newlines."""
    if raw is None:
        return ()
    tokens: list[tuple[str, str, str]] = []
    for entry in re.split(r"[,\n]", raw):
        entry = entry.strip()
        if not entry:
            continue
        parts = entry.split(":", 2)
        if (
            len(parts) != 3
            or not _TOKEN_NAME.fullmatch(parts[0])
            or parts[1] not in API_SCOPES
            or not _TOKEN_HASH.fullmatch(parts[2].lower())
        ):
            raise _error(
                f"API_TOKENS entries are name:scope:sha256:<64 hex> with a lowercase name and a scope among "
                f"{', '.join(API_SCOPES)} (make one with `reconciler api-tokens create`)"
            )
        name, scope, digest = parts[0], parts[1], parts[2].lower()
        if any(t[0] == name for t in tokens):
            raise _error(f"API_TOKENS names {name!r} twice")
        if any(t[2] == digest for t in tokens):
            raise _error(f"API_TOKENS has the same token twice ({name!r}); give each client its own")
        tokens.append((name, scope, digest))
    return tuple(tokens)
