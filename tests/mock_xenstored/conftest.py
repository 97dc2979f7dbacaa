"""A hang guard for the xenstore tests (the peers' fixtures are registered in tests/conftest.py).

pyxs has calls that can block forever (a dead router thread, ``Monitor.wait()``); a test
here that hangs is killed with a traceback instead of stalling the run.
"""

from __future__ import annotations

from fakes.hang_guard import hang_guard

__all__ = ["hang_guard"]
