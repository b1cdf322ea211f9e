"""What the blueprints use, built once per app by :func:`app.factory.create_app` and
reached through :func:`services` (blueprints import this module, never the factory)."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app
from sqlalchemy.orm import Session, sessionmaker

from app.services.signature_watch import SignatureFailureWatch
from config import Settings
from domain.cases.refunds import RefundService
from domain.ledger.applier import Applier
from domain.ledger.inbox import Inbox
from domain.stripe.gateway import StripeGateway


@dataclass(frozen=True)
class Services:
    """What the blueprints need, built once per app."""

    settings: Settings
    session_factory: sessionmaker[Session]
    read_session_factory: sessionmaker[Session]
    gateway: StripeGateway
    inbox: Inbox
    applier: Applier
    refunds: RefundService
    signature_watch: SignatureFailureWatch


def services() -> Services:
    """The current app's :class:`Services`."""
    return current_app.extensions["reconciler"]
