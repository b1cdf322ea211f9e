"""The WSGI entry point for servers that import the app by name: ``app.wsgi:create``
(a factory: settings are read in each worker process, after the fork)."""

from __future__ import annotations

from flask import Flask

from app import create_app


def create() -> Flask:
    return create_app()
