"""Fixtures for the ``xen`` backend's tests (helpers in :mod:`xenhost`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.hang_guard import hang_guard
from fakes.xenstore_hosts import XenstoreHost  # the fixtures come from tests/conftest.py
from xenhost import TmemHost

__all__ = ["hang_guard"]


@pytest.fixture
def tmem_host(xenstore_host: XenstoreHost, tmp_path: Path) -> Iterator[TmemHost]:
    host = TmemHost(xenstore_host, tmp_path, capacity=64 << 20)
    host.start()
    try:
        yield host
    finally:
        host.clean()
