"""Fixtures the end-to-end modules share."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.emulator import LocalStripe


@pytest.fixture(scope="module")
def localstripe() -> Iterator[LocalStripe]:
    """localstripe as a real process on 127.0.0.1, one per test module."""
    with LocalStripe() as emulator:
        yield emulator
