"""The NBD tests' server (``fakes/nbd_served.py``) and libnbd as its client."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.libnbd_peer import LibNbd, unavailable_reason
from fakes.nbd_served import WAIT_S, Served, serve
from fakes.required import unavailable


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a Unix socket's path is at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="xtnbd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def served(short_dir: Path) -> Iterator[Served]:
    s = serve(short_dir)
    yield s
    assert s.server.stop(WAIT_S)
    s.swap.close()


@pytest.fixture(scope="session")
def libnbd() -> Iterator[LibNbd]:
    reason = unavailable_reason()
    if reason is not None:
        unavailable("NBD", "libnbd (python3-libnbd)", reason)
    peer = LibNbd()
    yield peer
    peer.close()
