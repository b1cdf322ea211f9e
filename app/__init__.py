"""The web application and the services it shares with the jobs.

``create_app`` is imported lazily so that ``app.services`` and ``domain.stripe.gateway`` stay
importable without Flask: the jobs and the scheduler use them directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def create_app(*args: Any, **kwargs: Any) -> "Flask":
    """Build the Flask app; see :func:`app.factory.create_app`."""
    from app.factory import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
