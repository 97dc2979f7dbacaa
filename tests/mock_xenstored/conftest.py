"""A hang guard for the xenstore tests (the peers' fixtures are registered in tests/conftest.py).

pyxs has calls that can block forever (a dead router thread, ``Monitor.wait()``); a test
here that hangs is killed with a traceback instead of stalling the run.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator

import pytest

HANG_GUARD_S = 120


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    faulthandler.dump_traceback_later(HANG_GUARD_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
