"""Fixtures for the ``xen`` backend's tests (helpers in :mod:`xenhost`)."""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.xenstore_hosts import XenstoreHost  # the fixtures come from tests/conftest.py
from xenhost import TmemHost

HANG_GUARD_S = 120


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(HANG_GUARD_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def tmem_host(xenstore_host: XenstoreHost, tmp_path: Path) -> Iterator[TmemHost]:
    host = TmemHost(xenstore_host, tmp_path, capacity=64 << 20)
    host.start()
    try:
        yield host
    finally:
        host.clean()
